"Property tests for the test-time sampling estimators and votes (posttrain_nb.infer.sampling)."
from math import comb

from hypothesis import given, strategies as st

from posttrain_nb.infer.sampling import pass_at_k, majority_vote, weighted_vote, bon_at_k, best_of_n

@st.composite
def n_c_k(draw, max_n=60):
    n = draw(st.integers(1, max_n))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))

@given(n_c_k())
def test_pass_at_k_is_a_probability(nck):
    assert 0.0 <= pass_at_k(*nck) <= 1.0

@given(n_c_k())
def test_pass_at_k_matches_binomial_form(nck):
    n, c, k = nck
    assert abs(pass_at_k(n, c, k) - (1 - comb(n - c, k) / comb(n, k))) < 1e-12

@given(n_c_k())
def test_pass_at_k_non_decreasing_in_k(nck):
    n, c, k = nck
    if k < n: assert pass_at_k(n, c, k) <= pass_at_k(n, c, k + 1) + 1e-15

@given(n_c_k())
def test_pass_at_k_non_decreasing_in_c(nck):
    n, c, k = nck
    if c < n: assert pass_at_k(n, c, k) <= pass_at_k(n, c + 1, k) + 1e-15

answers = st.lists(st.one_of(st.none(), st.integers(-3, 3)), max_size=30)

@given(answers, st.floats(min_value=1e-6, max_value=1e6, allow_nan=False))
def test_equal_weights_is_majority(ans, w):
    assert weighted_vote(ans, [w] * len(ans)) == majority_vote(ans)

@given(answers)
def test_majority_is_the_first_most_frequent_answer(ans):
    valid = [a for a in ans if a is not None]
    if not valid: assert majority_vote(ans) is None; return
    top = max(valid.count(a) for a in valid)
    assert majority_vote(ans) == next(a for a in valid if valid.count(a) == top)

@given(st.lists(st.tuples(st.booleans(), st.sampled_from([-1.0, 0.0, 0.5, 2.0])), min_size=1, max_size=20),
       st.data())
def test_bon_at_k_bounded_by_pass_at_k(pool, data):
    correct, scores = [c for c, _ in pool], [s for _, s in pool]
    n, k = len(pool), data.draw(st.integers(1, len(pool)))
    assert bon_at_k(correct, scores, k) <= pass_at_k(n, sum(correct), k) + 1e-12
    assert abs(bon_at_k(correct, [float(c) for c in correct], k) - pass_at_k(n, sum(correct), k)) < 1e-12
    i = best_of_n(pool, scores)
    assert scores[i] == max(scores) and scores.index(max(scores)) == i
