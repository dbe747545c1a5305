"""Engine error isolation and input validation (issue 13, items 1, 2 and 11).

One `LLM` is reused after malformed requests, after a step that raises, and after a KeyboardInterrupt in the middle
of `generate`: the other requests of each call are served correctly, the KV pool returns to full every time, and
the next call gives the same tokens as a fresh engine. `SamplingParams` and `LLM` refuse every malformed number.
"""
import math

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain_nb.serve.engine import LLM, SamplingParams

V = 61


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42, 43, 44]]
SP = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(model):
    return [o.outputs[0].token_ids for o in LLM(model, block_size=4, num_gpu_blocks=64, enable_prefix_caching=False).generate(PROMPTS, SP)]


def test_one_engine_survives_bad_requests_step_errors_and_interrupts(model, reference):
    llm = LLM(model, block_size=4, num_gpu_blocks=24)
    full = llm.block_manager.num_blocks

    bad = [[99999], [-1], [V], [1.5, 2], [], [True, 2], ["a"], None, "text but no tokenizer", {"ids": [1]}]
    res = llm.generate(PROMPTS[:2] + bad + PROMPTS[2:], SP)
    assert [r.ok for r in res] == [True, True] + [False] * len(bad) + [True, True]
    assert [r.outputs[0].token_ids for r in res if r.ok] == reference
    assert all(r.outputs[0].finish_reason == "abort" and r.error for r in res[2:-2])
    assert "outside the model's vocabulary" in res[2].error and "outside" in res[3].error and "outside" in res[4].error
    assert "integers" in res[5].error and "integers" in res[7].error and "empty" in res[6].error
    assert llm.block_manager.num_free_blocks == full

    real_forward = llm.runner.forward
    calls = [0]

    def failing(at, exc):
        def fwd(*a):
            calls[0] += 1
            if calls[0] == at: raise exc
            return real_forward(*a)
        return fwd

    llm.runner.forward = failing(3, RuntimeError("device fell over"))  # a decode step of the two running requests
    llm.scheduler.max_num_seqs = 2  # two at a time, so the failing step holds only some of the requests
    res = llm.generate(PROMPTS, SP)
    llm.scheduler.max_num_seqs = 256
    failed = [i for i, r in enumerate(res) if not r.ok]
    assert failed == [0, 1] and all("device fell over" in res[i].error for i in failed)
    assert all(res[i].outputs[0].token_ids == reference[i] for i in range(len(PROMPTS)) if i not in failed)
    assert llm.block_manager.num_free_blocks == full

    calls[0] = 0
    llm.runner.forward = failing(4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, SP)
    assert llm.block_manager.num_free_blocks == full and not llm.has_unfinished_requests()

    llm.runner.forward = real_forward
    assert [r.outputs[0].token_ids for r in llm.generate(PROMPTS, SP)] == reference  # no half-written KV served from the cache
    assert llm.block_manager.num_free_blocks == full
    llm.block_manager.check([])


def test_interrupt_during_prefill_leaves_no_poisoned_prefix_cache(model, reference):
    "Prompt blocks enter the prefix cache only once their KV is computed: an interrupted prefill leaves nothing to hit."
    llm = LLM(model, block_size=4, num_gpu_blocks=24)
    real_forward = llm.runner.forward

    def interrupted(*a): raise KeyboardInterrupt()
    llm.runner.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, SP)
    llm.runner.forward = real_forward
    res = llm.generate(PROMPTS, SP)
    assert [r.metrics.num_cached_tokens for r in res][0] == 0
    assert [r.outputs[0].token_ids for r in res] == reference


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=True), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(max_tokens=2.5), "max_tokens"), (dict(max_tokens=True), "max_tokens"), (dict(max_tokens=0), "max_tokens"),
    (dict(n=1.0), "n must be"), (dict(seed=1.5), "seed"), (dict(stop_token_ids=[1.0]), "stop_token_ids"),
    (dict(stop_token_ids="2"), "stop_token_ids"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_sampling_params_refuse_malformed_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


@settings(max_examples=200, deadline=None)
@example(t=float("nan"), p=0.5)
@example(t=1.0, p=float("nan"))
@example(t=float("inf"), p=1.0)
@given(t=st.one_of(st.floats(0, 10), st.floats(allow_nan=True, allow_infinity=True)),
       p=st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)))
def test_sampling_params_accept_exactly_the_valid_floats(t, p):
    ok = math.isfinite(t) and t >= 0 and math.isfinite(p) and 0 < p <= 1
    if ok: SamplingParams(temperature=t, top_p=p)
    else:
        with pytest.raises(ValueError): SamplingParams(temperature=t, top_p=p)


@pytest.mark.parametrize("kw", [dict(block_size=0), dict(block_size=2.5), dict(num_gpu_blocks=0), dict(max_num_seqs=0),
                                dict(max_num_batched_tokens=-1), dict(max_model_len=0), dict(block_size=True)])
def test_llm_refuses_malformed_sizes(model, kw):
    with pytest.raises(ValueError, match="must be a positive integer"):
        LLM(model, **kw)


def test_repo_id_is_not_downloaded_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing can be found locally
    with pytest.raises(ValueError, match=r"download=True"):
        LLM("some-owner/some-model-that-is-not-here")


def test_local_folder_loads_by_default():
    from posttrain_nb import zoo
    llm = LLM(str(zoo.model_path("draft")), max_num_seqs=2)  # local_files_only: a folder on disk needs no network
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))[0].ok


def test_other_architectures_are_refused_before_any_allocation(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
    from posttrain_nb.serve import engine
    def no_alloc(*a, **k): raise AssertionError("the KV pool was allocated before the refusal")
    monkeypatch.setattr(engine.ModelRunner, "__init__", no_alloc)
    monkeypatch.setattr(engine, "BlockManager", no_alloc)
    for m in (GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)),
              GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32))):
        with pytest.raises(ValueError, match=r"llama, mistral, qwen2, qwen3.*core.generate"):
            LLM(m)


def test_step_api_ids_abort_and_stream(model, reference):
    llm = LLM(model, block_size=4, num_gpu_blocks=24)
    full = llm.block_manager.num_free_blocks
    llm.add_request("x", PROMPTS[0], SP)
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("x", PROMPTS[1], SP)
    with pytest.raises(ValueError, match="outside"):
        llm.add_request("y", [V + 5], SP)
    llm.add_request("z", PROMPTS[2], SP)
    outs = llm.step() + llm.step()
    assert {o.request_id for o in outs} == {"x", "z"} and not any(o.finished for o in outs)
    llm.abort_request(["x", "unknown"])
    done = [o for _ in range(20) for o in llm.step() if o.finished]
    assert [o.request_id for o in done] == ["z"] and done[0].outputs[0].token_ids == reference[2]
    assert not llm.has_unfinished_requests() and llm.block_manager.num_free_blocks == full
    chunks = list(llm.stream(PROMPTS[3], SP))
    assert [len(c.outputs[0].token_ids) for c in chunks] == list(range(1, 9)) and chunks[-1].outputs[0].token_ids == reference[3]


def test_a_checkpoint_missing_weights_is_refused_not_served_random(tmp_path):
    "transformers fills missing weights with random ones and only logs it; LLM(path) and zoo-free loads refuse instead."
    from safetensors.torch import load_file, save_file
    from posttrain_nb import zoo
    from posttrain_nb.core import load_pretrained
    m, tok = zoo.load("draft")
    m.save_pretrained(tmp_path); tok.save_pretrained(tmp_path)
    assert LLM(str(tmp_path), max_num_seqs=2).generate([[3, 4, 5]], SP, use_tqdm=False)[0].ok   # the intact folder serves
    f = tmp_path / "model.safetensors"; sd = load_file(f)
    gone = next(k for k in sd if "layers.0.mlp.up_proj" in k); del sd[gone]; save_file(sd, f, metadata={"format": "pt"})
    for load in (lambda: LLM(str(tmp_path), max_num_seqs=2), lambda: load_pretrained(tmp_path)):
        with pytest.raises(ValueError, match=f"missing keys: {gone}.*random"): load()


def test_core_generate_and_the_engine_stop_at_the_same_generation_config_eos_ids():
    "A generation_config eos list ends core.generate (HF generate) and LLM.generate at the same token, same completion."
    from posttrain_nb import zoo
    from posttrain_nb.core import generate, eos_token_ids
    m, tok = zoo.load("teacher")
    prompts = ["12+7=", "3*4+5="]
    free = generate(m, tok, prompts, max_new_tokens=12).completion_ids
    j = next(j for j in range(1, len(free[0])) if free[0][j] not in free[0][:j] and free[0][j] != tok.eos_token_id)
    stop = free[0][j]                                    # a token the model emits early: now it ends the sequence
    m.generation_config.eos_token_id = [tok.eos_token_id, stop]
    assert eos_token_ids(m, tok) == sorted({tok.eos_token_id, stop})
    hf = generate(m, tok, prompts, max_new_tokens=12).completion_ids
    ours = [o.outputs[0].token_ids for o in LLM(m, tok, max_num_seqs=2).generate(prompts, SamplingParams(max_tokens=12), use_tqdm=False)]
    assert hf[0] == free[0][:j + 1] and ours == hf           # cut at the new eos, and the engine agrees token for token
    for row in hf: assert all(t != stop for t in row[:-1])
