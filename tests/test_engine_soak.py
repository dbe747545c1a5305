"""Soak test for the serving engine (posttrain_nb.serve.engine): 1,000 random greedy requests through a KV pool small
enough to force preemption by recompute, with prefix caching on, duplicated prompts (so cache hits, evictions and
preemptions interleave), a token budget small enough to chunk every prompt's prefill, and stop strings on a fifth of
the requests. No request may be lost, failures must stay with their own request, and every output must equal
sequential greedy decoding: the engine with a roomy pool (no preemption, no prefix cache, no chunking) for all
requests (cut at the stop string where one was given), the engine at max_num_seqs=1 for a subset, and Hugging Face
`generate` (batch 1) for a spot check.
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
    llm = LLM(model, tok, max_num_seqs=512, num_gpu_blocks=4096, enable_prefix_caching=False, max_num_batched_tokens=65536)
    outs = llm.generate(ids, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions == 0
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].text for o in outs]


def test_soak_preemption_no_loss_same_outputs(workload, reference):
    model, tok, ids, params = workload
    ref_ids, ref_text = reference
    rng = random.Random(3)
    stops = {}  # a fifth of the requests get a 2-character stop string taken from their own reference text
    for i in rng.sample(range(N_REQUESTS), N_REQUESTS // 5):
        if len(ref_text[i]) >= 3:
            j = rng.randrange(len(ref_text[i]) - 1)
            stops[i] = ref_text[i][j:j + 2]
    sp = [SamplingParams(max_tokens=p.max_tokens, stop=[stops[i]]) if i in stops else p for i, p in enumerate(params)]
    bad = [list(range(4, 4 + 300)), list(range(4, 4 + 256))]  # longer than max_model_len=256: must fail alone
    llm = LLM(model, tok, block_size=4, num_gpu_blocks=96, max_num_seqs=64, enable_prefix_caching=True,
              max_num_batched_tokens=48)  # below most prompt lengths: prefills are chunked and mixed with decodes
    outs = llm.generate(ids[:500] + bad + ids[500:], sp[:500] + [SamplingParams(max_tokens=4)] * 2 + sp[500:], use_tqdm=False)
    assert len(outs) == N_REQUESTS + 2 and len({o.request_id for o in outs}) == N_REQUESTS + 2
    failed = outs[500:502]
    assert all(o.outputs[0].finish_reason == "abort" and "max_model_len" in o.error for o in failed)
    outs = outs[:500] + outs[502:]
    assert all(o.ok and o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert all(1 <= len(o.outputs[0].token_ids) <= p.max_tokens for o, p in zip(outs, params))
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert sum(o.metrics.num_preemptions > 0 for o in outs) > 0
    assert llm.block_manager.num_hits > 0, "duplicated prompts were meant to hit the prefix cache"
    mismatches = []
    for i, o in enumerate(outs):
        c = o.outputs[0]
        if i in stops:  # the reference text cut before the first occurrence; the tokens a prefix of the reference
            ok = (c.text == ref_text[i][:ref_text[i].find(stops[i])] and c.stop_reason == stops[i]
                  and c.token_ids == ref_ids[i][:len(c.token_ids)])
        else: ok = c.token_ids == ref_ids[i]
        if not ok: mismatches.append(i)
    assert not mismatches, f"{len(mismatches)} outputs differ from the reference, e.g. request {mismatches[:5]}"
    assert len(stops) > 100
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
    outs = seq.generate([ids[i] for i in sub], [params[i] for i in sub], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [reference[0][i] for i in sub]


def test_reference_spot_check_against_hf(workload, reference):
    "Hugging Face generate, one prompt at a time (no padding), agrees on a spot-check subset."
    model, tok, ids, params = workload
    sub = random.Random(2).sample(range(N_REQUESTS), 15)
    for i in sub:
        text = tok.decode(ids[i])
        g = generate(model, tok, [text], max_new_tokens=params[i].max_tokens, batch_size=1, chat=False)
        assert g.prompt_ids[0] == ids[i]
        assert g.completion_ids[0] == reference[0][i], f"request {i}"
