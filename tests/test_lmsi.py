"LMSI's vote and curation against brute force."
from collections import Counter
import pytest
from hypothesis import given, settings, strategies as st
from posttrain_nb.train.lmsi import majority, vote_paths, curate, mixed_formats, Vote

answers = st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", "4"])), min_size=1, max_size=12)

@settings(max_examples=300, deadline=None)
@given(answers)
def test_majority_brute_force(xs):
    top, share = majority(xs)
    counts = Counter(a for a in xs if a is not None)
    if not counts: assert (top, share) == (None, 0.0); return
    best = max(counts.values())
    first = next(a for a in xs if a is not None and counts[a] == best)  # first seen among the tied
    assert top == first and share == best / len(xs)

def test_spec_example():
    assert majority(["7", "7", "3", None]) == ("7", 0.5)

@settings(max_examples=100, deadline=None)
@given(st.lists(answers, min_size=1, max_size=6))
def test_curate_counts(groups):
    qs = [f"q{i}" for i in range(len(groups))]
    paths = [[f"... Answer: {a}" if a is not None else "no answer" for a in g] for g in groups]
    n_empty = sum(all(a is None for a in g) for g in groups)
    if n_empty == len(groups):
        with pytest.raises(ValueError, match="nothing to train on"): curate(qs, paths)
        return
    d = curate(qs, paths)
    assert d.dropped == n_empty
    for v in d.votes:
        assert len(v.kept) == round(v.share * len(v.paths))
    assert len(d.rows) == 4 * sum(len(v.kept) for v in d.votes)
    by_fmt = Counter(r["format"] for r in d.rows)
    assert len(set(by_fmt.values())) == 1
