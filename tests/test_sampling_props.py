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

# --- the one adaptive self-consistency rule (AdaptiveVote), shared by self-calibration and routing ---
from fractions import Fraction
from posttrain_nb.infer.sampling import AdaptiveVote, adaptive_vote

streams = st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 3)), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])),
                   min_size=1, max_size=16)
taus = st.sampled_from([Fraction(k, 20) for k in range(23)])

def _brute(stream, tau, t_min):
    for t in range(1, len(stream) + 1):
        W = {}
        for a, w in stream[:t]:
            if a is not None: W[a] = W.get(a, 0) + Fraction(w).limit_denominator(1000)
        if t >= t_min and sum(W.values()) > 0 and max(W.values()) >= tau * sum(W.values()): return t
    return len(stream)

@given(streams, taus, st.integers(1, 4))
def test_adaptive_vote_stops_where_the_definition_says(s, tau, t_min):
    assert adaptive_vote(s, float(tau), t_min)[1] == _brute(s, tau, t_min)

@given(streams, taus, taus)
def test_adaptive_vote_stopping_time_is_monotone_in_tau(s, t1, t2):
    lo, hi = sorted((t1, t2))
    assert adaptive_vote(s, float(lo))[1] <= adaptive_vote(s, float(hi))[1]

@given(streams, taus, st.floats(min_value=1e-3, max_value=1e3))
def test_equal_weights_give_the_count_rule(s, tau, w):
    counts = adaptive_vote([(a, 1.0) for a, _ in s], float(tau))
    assert adaptive_vote([(a, w) for a, _ in s], float(tau)) == counts
    assert counts[0] == majority_vote([a for a, _ in s[:counts[1]]])

@given(streams, taus)
def test_adaptive_vote_pulls_only_what_it_uses(s, tau):
    pulled = []
    def gen():
        for x in s: pulled.append(x); yield x
    _, used = adaptive_vote(gen(), float(tau))
    assert len(pulled) == used
