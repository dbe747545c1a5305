"""Generative self-aggregation: prompt construction, training rows, and that aggregation decodes the prompt it builds."""
import random
import pytest, torch
from transformers import AutoTokenizer

from posttrain_nb import zoo
from posttrain_nb.core import generate
from posttrain_nb.infer.aggregate import aggregation_prompt, aggregation_sft_rows, self_aggregate, strip_final_answer
from posttrain_nb.infer.sampling import majority_vote
from posttrain_nb.tasks import ArithTask, extract_answer


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(zoo.model_path("base"))


@pytest.fixture(scope="module")
def model(tok, tiny_llama):
    return tiny_llama(tok)


def test_strip_and_prompt():
    assert strip_final_answer("3+4=7. Answer: 7") == "3+4=7."
    assert strip_final_answer("3+4=7. Answer: -2 ") == "3+4=7."
    assert strip_final_answer("Answer: 7 is my guess. 3+4=7.") == "Answer: 7 is my guess. 3+4=7."  # not trailing
    c = ["1+1=2. Answer: 2", "1+1=3. Answer: 3"]
    p = aggregation_prompt("Q?", c)
    assert p.startswith("Q?\n1: 1+1=2. Answer: 2\n2: 1+1=3. Answer: 3\n")
    hidden = aggregation_prompt("Q?", c, show_answers=False)
    assert "Answer" not in hidden and "1: 1+1=2.\n2: 1+1=3.\n" in hidden
    assert majority_vote([extract_answer(strip_final_answer(x)) for x in c]) is None


def test_sft_rows_draw_own_samples():
    items = ArithTask().sample(300, seed=0, split="train")
    samples = [[f"{j}+1={j + 1}. {it.solution}" for j in range(4)] for it in items]  # distinct, answer-terminated
    rows = aggregation_sft_rows(items, samples, ks=(0, 2, 4), open_ended=0.5, seed=3)
    assert rows == aggregation_sft_rows(items, samples, ks=(0, 2, 4), open_ended=0.5, seed=3)
    counts = {0: 0, 2: 0, 4: 0}
    hidden = shown = 0
    for it, s, (p, target) in zip(items, samples, rows):
        assert target == it.solution
        lines = p[len(it.prompt):].split("\n")[1:-1] if p != it.prompt else []
        counts[len(lines)] += 1
        for j, line in enumerate(lines):
            num, text = line.split(": ", 1)
            assert num == str(j + 1)
            assert any(text == x or text == strip_final_answer(x) for x in s)
        if lines: hidden += "Answer" not in p; shown += "Answer" in p
        assert len(set(lines)) == len(lines)  # sampled without replacement
    assert all(n > 60 for n in counts.values())  # about 100 each
    assert 0.35 < hidden / (hidden + shown) < 0.65
    with pytest.raises(ValueError, match="samples"):
        aggregation_sft_rows(items[:1], [samples[0][:2]], ks=(0, 4))
    with pytest.raises(ValueError, match="fraction"):
        aggregation_sft_rows(items, samples, open_ended=1.5)


def test_self_aggregate_decodes_its_prompt(tok, model):
    "GSA with given candidates = greedy decoding of the aggregation prompt; sampling k when none are given."
    items = ArithTask().sample(3, seed=1, split="val")
    prompts = [it.prompt for it in items]
    cands = [[it.solution, it.solution.replace("Answer: ", "Answer: 1")] for it in items]
    out, used = self_aggregate(model, tok, prompts, k=2, candidates=cands, max_new_tokens=8)
    ref = generate(model, tok, [aggregation_prompt(p, c) for p, c in zip(prompts, cands)], max_new_tokens=8).texts
    assert out == ref and used == cands
    out2, used2 = self_aggregate(model, tok, prompts, k=3, seed=5, max_new_tokens=8)
    assert [len(c) for c in used2] == [3, 3, 3]
    with pytest.raises(ValueError, match="exactly k"): self_aggregate(model, tok, prompts, k=3, candidates=cands)
    with pytest.raises(ValueError, match="context"):
        self_aggregate(model, tok, prompts[:1], k=20, candidates=[[items[0].solution * 2] * 20], max_new_tokens=8)
