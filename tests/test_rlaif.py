"""RLAIF judge: verdict reading against core.sequence_logprobs, refusals, the swap filter and bias decomposition."""
import pytest, torch
from transformers import AutoTokenizer

from posttrain_nb import zoo
from posttrain_nb.core import encode_for_training, sequence_logprobs, render_prompts
from posttrain_nb.train.rlaif import (SwapVerdicts, choice_token_ids, judge_both_orders, judge_margins, judge_prompt,
                                      label_bias, likelihood_margins, preference_rows, CandidatePair, verifier_winner)
from posttrain_nb.tasks import ArithTask


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(zoo.model_path("teacher"))


@pytest.fixture(scope="module")
def judge(tok, tiny_llama):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def pairs():
    items = ArithTask().sample(6, seed=1, split="val")
    return [(it.prompt, it.solution, it.solution.replace("Answer: ", "Answer: 9")) for it in items]


def test_refuses_multi_token_labels(tok):
    with pytest.raises(ValueError, match="single token"): choice_token_ids(tok, ("Yes", "No"))
    with pytest.raises(ValueError, match="single token"): choice_token_ids(tok, ("Response A", "Response B"))
    with pytest.raises(ValueError, match="same token"): choice_token_ids(tok, ("A", "A"))
    with pytest.raises(ValueError, match="exactly two"): choice_token_ids(tok, ("A", "B", "C"))
    a, b = choice_token_ids(tok)
    assert tok.decode([a]) == "A" and tok.decode([b]) == "B"


def test_margin_matches_sequence_logprobs(tok, judge, pairs):
    "log p(A) - log p(B) read from the last position equals core's log-prob of the one-token responses 'A' and 'B'."
    P, Y1, Y2 = map(list, zip(*pairs))
    margin, mass = judge_margins(judge, tok, P, Y1, Y2, batch_size=4)  # two batches, left padding inside each
    texts = [judge_prompt(p, a, b) for p, a, b in pairs]
    b = encode_for_training(tok, texts + texts, ["A"] * len(texts) + ["B"] * len(texts), add_eos=False)
    with torch.no_grad(): lp = sequence_logprobs(judge, b["input_ids"], b["attention_mask"], b["response_mask"])
    ref = lp[:len(texts)] - lp[len(texts):]
    torch.testing.assert_close(margin, ref, atol=1e-4, rtol=0)  # float32 logits of magnitude ~1
    assert ((mass > 0) & (mass <= 1)).all()


def test_planted_bias_moves_bias_not_score(tok, judge, pairs):
    P, Y1, Y2 = map(list, zip(*pairs))
    v0 = judge_both_orders(judge, tok, P, Y1, Y2)
    with label_bias(judge, choice_token_ids(tok)[0], 2.5):
        v1 = judge_both_orders(judge, tok, P, Y1, Y2)
    assert abs((v1.bias - v0.bias) - 2.5) < 1e-4
    torch.testing.assert_close(v1.score, v0.score, atol=1e-4, rtol=0)
    v2 = judge_both_orders(judge, tok, P, Y1, Y2)  # the hook is gone after the block
    torch.testing.assert_close(v2.margin_ab, v0.margin_ab)
    with label_bias(judge, choice_token_ids(tok)[0], 1e4):
        v3 = judge_both_orders(judge, tok, P, Y1, Y2)
    assert v3.a_rate == 1.0 and not v3.consistent.any()


def test_swap_filter_brute_force():
    "winner agrees with a direct reading of the two verdicts on random margins (including exact ties)."
    g = torch.Generator().manual_seed(0)
    m_ab, m_ba = torch.randint(-3, 4, (500,), generator=g).float(), torch.randint(-3, 4, (500,), generator=g).float()
    v = SwapVerdicts(m_ab, m_ba)
    for w, x, y in zip(v.winner.tolist(), m_ab.tolist(), m_ba.tolist()):
        says_first_1, says_first_2 = x > 0, y < 0  # order AB: first is A; order BA: first is B
        says_second_1, says_second_2 = x < 0, y > 0
        assert w == (1 if says_first_1 and says_first_2 else -1 if says_second_1 and says_second_2 else 0)
    a = ((m_ab > 0).sum() + (m_ba > 0).sum()).item() / 1000
    assert abs(v.a_rate - a) < 1e-6  # a_rate averages in float32
    # on consistent pairs exactly one of the two verdicts says A
    c = v.consistent
    assert ((m_ab[c] > 0).long() + (m_ba[c] > 0).long()).eq(1).all()


def test_likelihood_margins_antisymmetric(tok, judge, pairs):
    P, Y1, Y2 = map(list, zip(*pairs))
    m12, m21 = likelihood_margins(judge, tok, P, Y1, Y2), likelihood_margins(judge, tok, P, Y2, Y1)
    torch.testing.assert_close(m12, -m21, atol=1e-5, rtol=0)
    b = encode_for_training(tok, P, Y1)
    with torch.no_grad(): l1 = sequence_logprobs(judge, b["input_ids"], b["attention_mask"], b["response_mask"], average=True)
    b = encode_for_training(tok, P, Y2)
    with torch.no_grad(): l2 = sequence_logprobs(judge, b["input_ids"], b["attention_mask"], b["response_mask"], average=True)
    torch.testing.assert_close(m12, l1 - l2, atol=1e-5, rtol=0)


def test_preference_rows_orientation():
    it = ArithTask().sample(3, seed=2, split="val")
    right, wrong = it[0].solution, it[0].solution.replace("Answer: ", "Answer: 9")
    ps = [CandidatePair(it[0], right, wrong), CandidatePair(it[0], wrong, right), CandidatePair(it[0], wrong, wrong + ".")]
    w = verifier_winner(ps)
    assert w.tolist() == [1, -1, 0]
    rows = preference_rows(ps, w)
    assert len(rows) == 2 and all(r["chosen"][0]["content"] == right for r in rows)
    assert all(r["rejected"][0]["content"] == wrong for r in rows)
    with pytest.raises(ValueError, match="verdicts"): preference_rows(ps, w[:2])


def test_rlaif_stage_runs_and_refuses_unknown_options():
    "The registered stage trains on judge-labelled pairs; options are checked against its signature (no **kwargs)."
    from posttrain_nb.pipeline import run_pipeline
    import posttrain_nb.train.rlaif  # noqa: F401 (registers the stage)
    st = run_pipeline(["rlaif"], n_test=8, progress=False,
                      options={"rlaif": {"n_prompts": 24, "steps": 1, "batch_size": 4}})
    row = st.rows[-1]
    assert row["stage"] == "rlaif" and row["pairs"] > 0 and 0 <= row["judge_agreement"] <= 1
    with pytest.raises(ValueError, match="has no option"):
        run_pipeline(["rlaif"], n_test=4, progress=False, options={"rlaif": {"no_such_option": 1}})
