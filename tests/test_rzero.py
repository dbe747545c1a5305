"R-Zero's pieces against the task generator and brute force; the stage's contract with the pipeline."
import inspect
import pytest
from hypothesis import given, settings, strategies as st
from posttrain_nb.tasks import ArithTask
from posttrain_nb.train.rzero import (arith_truth, band_filter, challenger_rewards, round_data, uncertainty_reward,
                                      _rzero_stage)
from posttrain_nb.pipeline import STAGES, PipelineError, check_options

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 3), st.integers(0, 3), st.sampled_from(["+", "-", "+-"]))
def test_truth_matches_generator(seed, hi, digits, dist, ops):
    items = ArithTask(n_operands=(2, hi), max_digits=digits, distractors=(0, dist), ops=ops).sample(20, seed=seed, split="train")
    assert [arith_truth(i.prompt) for i in items] == [i.answer for i in items]

@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_truth_on_noise_is_none_or_int(s):
    assert arith_truth(s) is None or isinstance(arith_truth(s), int)

@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=30), st.sampled_from([0.1, 0.25, 0.4]))
def test_round_data_keeps_the_band(votes, delta):
    q = "<question>Bob had 12 apples. He ate 5. How many apples does Bob have now?</question>"
    fake = lambda qs: [[0] * v + list(range(1, 11 - v)) for v in votes]
    in_band = [v for v in votes if abs(v / 10 - 0.5) <= delta + 1e-12]  # brute force on the shares
    if not in_band:
        with pytest.raises(ValueError, match="band"): round_data([q] * len(votes), fake, delta)
        return
    d = round_data([q] * len(votes) + ["junk"], fake, delta)
    assert [round(it.p_hat * 10) for it in d.kept] == in_band
    assert all(band_filter(round(it.p_hat * 10), 10, delta) for it in d.kept)

@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["<question>a b c d</question>", "<question>e f g h i</question>", "junk", ""]),
                          st.lists(st.sampled_from(["1", "2", None]), max_size=10)), min_size=1, max_size=8))
def test_challenger_reward_bounds(batch):
    outs, answers = zip(*batch)
    r = challenger_rewards(list(outs), list(answers))
    assert all(0 <= x <= 1 for x in r)
    assert all(x == 0 for x, o in zip(r, outs) if "<question>" not in o)
    for x, o, a in zip(r, outs, answers):  # never above the uncertainty term
        if "<question>" in o and a:
            share = max(a.count(v) for v in set(a) if v is not None) / len(a) if any(v is not None for v in a) else 0
            assert x <= uncertainty_reward(share) + 1e-12

def test_stage_contract():
    assert STAGES["rzero"].run is _rzero_stage
    kinds = {p.kind for p in inspect.signature(_rzero_stage).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    check_options(["rzero"], {"rzero": {"iterations": 1, "m": 4}}, STAGES)
    with pytest.raises(PipelineError, match="no option 'steps'"): check_options(["rzero"], {"rzero": {"steps": 3}}, STAGES)
    with pytest.raises(PipelineError, match="iterations"): check_options(["rzero"], {"rzero": {"iterations": 0}}, STAGES)

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(0, 50))
def test_band_filter_matches_exact_arithmetic(m, k):
    "The band at delta = k/100 (the explorer's slider values) keeps exactly the vote counts with |v/m - 1/2| <= delta."
    from fractions import Fraction
    delta = Fraction(k, 100)
    want = [v for v in range(m + 1) if abs(Fraction(v, m) - Fraction(1, 2)) <= delta]
    assert [v for v in range(m + 1) if band_filter(v, m, float(delta))] == want
