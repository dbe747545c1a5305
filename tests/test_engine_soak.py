"""Soak test for the serving engine (posttrain_nb.serve.engine): 1,000 random greedy requests through a KV pool small
enough to force preemption by recompute, with prefix caching on and duplicated prompts (so cache hits, evictions and
preemptions interleave). No request may be lost, failures must stay with their own request, and every output must
equal sequential greedy decoding: the engine with a roomy pool (no preemption, no prefix cache) for all requests,
the engine at max_num_seqs=1 for a subset, and Hugging Face `generate` (batch 1) for a spot check.
"""
import random

import pytest
import torch

from posttrain_nb import zoo
from posttrain_nb.core import generate, render_prompts, encode_texts
from posttrain_nb.tasks import ArithTask
from posttrain_nb.serve.engine import LLM, SamplingParams

N_REQUESTS = 1000


@pytest.fixture(scope="module")
def workload():
    torch.set_num_threads(1)
    model, tok = zoo.load("teacher")
    rng = random.Random(0)
    items = (ArithTask(n_operands=(2, 2)).sample(300, seed=11, split="test")
             + ArithTask(n_operands=(3, 3)).sample(300, seed=11, split="test")
             + ArithTask(n_operands=(2, 3), distractors=(1, 2)).sample(200, seed=11, split="test"))
    prompts = [i.prompt for i in items]
    prompts += [rng.choice(prompts) for _ in range(N_REQUESTS - len(prompts))]  # 200 duplicates: prefix-cache hits
    rng.shuffle(prompts)
    ids = encode_texts(tok, render_prompts(tok, prompts))
    params = [SamplingParams(max_tokens=rng.randint(1, 12)) for _ in prompts]
    return model, tok, ids, params


@pytest.fixture(scope="module")
def reference(workload):
    "Greedy outputs from a roomy engine: every request fits at once, nothing is preempted, no prefix cache."
    model, tok, ids, params = workload
    llm = LLM(model, tok, max_num_seqs=512, num_blocks=4096, enable_prefix_caching=False)
    outs = llm.generate(ids, params)
    assert llm.scheduler.num_preemptions == 0
    return [o.token_ids for o in outs]


def test_soak_preemption_no_loss_same_outputs(workload, reference):
    model, tok, ids, params = workload
    bad = [list(range(4, 4 + 300)), list(range(4, 4 + 256))]  # longer than max_model_len=256: must fail alone
    llm = LLM(model, tok, block_size=16, num_blocks=48, max_num_seqs=64, enable_prefix_caching=True)
    outs = llm.generate(ids[:500] + bad + ids[500:], params[:500] + [SamplingParams(max_tokens=4)] * 2 + params[500:])
    assert len(outs) == N_REQUESTS + 2
    assert [o.request_id for o in outs] == list(range(N_REQUESTS + 2))
    failed = outs[500:502]
    assert all(o.finish_reason == "error" and "max_model_len" in o.error for o in failed)
    outs = outs[:500] + outs[502:]
    assert all(o.ok and o.finish_reason in ("stop", "length") for o in outs)
    assert all(1 <= len(o.token_ids) <= p.max_tokens for o, p in zip(outs, params))
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert sum(o.metrics.num_preemptions > 0 for o in outs) > 0
    assert llm.block_manager.num_hits > 0, "duplicated prompts were meant to hit the prefix cache"
    mismatches = [i for i, (o, r) in enumerate(zip(outs, reference)) if o.token_ids != r]
    assert not mismatches, f"{len(mismatches)} outputs differ from the reference, e.g. request {mismatches[:5]}"
    # the pool is whole again: nothing leaked
    bm = llm.block_manager
    bm.check([])
    assert bm.num_free_blocks == bm.num_blocks
    for o in outs:
        m = o.metrics
        assert m.ttft >= 0 and m.e2el >= m.ttft and m.tpot >= 0


def test_reference_equals_sequential_engine(workload, reference):
    "The roomy batched reference equals one-request-at-a-time decoding on a random subset."
    model, tok, ids, params = workload
    sub = random.Random(1).sample(range(N_REQUESTS), 60)
    seq = LLM(model, tok, max_num_seqs=1, enable_prefix_caching=False)
    outs = seq.generate([ids[i] for i in sub], [params[i] for i in sub])
    assert [o.token_ids for o in outs] == [reference[i] for i in sub]


def test_reference_spot_check_against_hf(workload, reference):
    "Hugging Face generate, one prompt at a time (no padding), agrees on a spot-check subset."
    model, tok, ids, params = workload
    sub = random.Random(2).sample(range(N_REQUESTS), 15)
    for i in sub:
        text = tok.decode(ids[i])
        g = generate(model, tok, [text], max_new_tokens=params[i].max_tokens, batch_size=1, chat=False)
        assert g.prompt_ids[0] == ids[i]
        assert g.completion_ids[0] == reference[i], f"request {i}"
