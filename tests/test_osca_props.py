"""Property tests for posttrain_nb.infer.osca (hypothesis)."""
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from posttrain_nb.infer.osca import hill_climb, pass_at_budget

probs = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)

@st.composite
def instances(draw, max_configs=6, max_problems=8):
    "A success-rate matrix [configs, problems], with 0s and 1s as likely as anything in between."
    S = draw(st.integers(1, max_configs)); D = draw(st.integers(1, max_problems))
    elems = st.one_of(st.just(0.0), st.just(1.0), probs)
    return draw(arrays(np.float64, (S, D), elements=elems))

@settings(max_examples=150, deadline=None)
@given(instances(), st.integers(0, 40), st.integers(1, 4), st.integers(0, 2**16))
def test_allocation_sums_to_budget_and_is_nonnegative(p, budget, restarts, seed):
    alloc = hill_climb(p, budget, restarts=restarts, seed=seed)
    assert alloc.shape == (p.shape[0],)
    assert np.issubdtype(alloc.dtype, np.integer)
    assert (alloc >= 0).all()
    assert int(alloc.sum()) == budget

@settings(max_examples=200, deadline=None)
@given(instances(), st.data())
def test_one_more_sample_never_lowers_pass_at_budget(p, data):
    S = p.shape[0]
    alloc = np.array(data.draw(st.lists(st.integers(0, 30), min_size=S, max_size=S)))
    i = data.draw(st.integers(0, S - 1))
    more = alloc.copy(); more[i] += 1
    assert pass_at_budget(p, more) >= pass_at_budget(p, alloc)

@settings(max_examples=150, deadline=None)
@given(instances(), st.integers(0, 40), st.integers(0, 2**16))
def test_hill_climb_beats_every_pure_allocation(p, budget, seed):
    S = p.shape[0]
    learned = pass_at_budget(p, hill_climb(p, budget, restarts=2, seed=seed))
    best_pure = max(pass_at_budget(p, np.eye(S, dtype=np.int64)[i] * budget) for i in range(S))
    assert learned >= best_pure - 1e-12
