"""`LLM(..., enforce_eager=False)`: pure decode steps run as one torch.compile'd graph, and steps with prefill run
piecewise (compiled between the eager attentions) (serve.model_runner).

The compiled graphs must give the same greedy tokens as the eager engine, must really be the paths that ran, must
keep reading live weights (a colocated trainer updates them in place: a graph that froze them would serve the old
model silently), and must not recompile as the batch shrinks and contexts grow.
"""
import random

import pytest
import torch

from posttrain_nb import zoo
from posttrain_nb.core import encode_texts, render_prompts
from posttrain_nb.serve.engine import LLM, SamplingParams
from posttrain_nb.serve.model_runner import ModelRunner
from posttrain_nb.tasks import ArithTask


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = zoo.load("teacher")
    items = ArithTask(n_operands=(2, 3)).sample(24, seed=3, split="test")
    ids = encode_texts(tok, render_prompts(tok, [i.prompt for i in items]))
    rng = random.Random(0)
    params = [SamplingParams(max_tokens=rng.randint(4, 40), ignore_eos=True) for _ in ids]
    return model, tok, ids, params


def _tokens(llm, ids, params): return [r.outputs[0].token_ids for r in llm.generate(ids, params, use_tqdm=False)]


def test_compiled_decode_equals_eager_and_follows_live_weights(setup, monkeypatch):
    model, tok, ids, params = setup
    calls, pieces = [], []
    orig, orig_layers = ModelRunner._forward_decode_compiled, ModelRunner._layers
    monkeypatch.setattr(ModelRunner, "_forward_decode_compiled", lambda self, *a: calls.append(len(a[0])) or orig(self, *a))
    monkeypatch.setattr(ModelRunner, "_layers", lambda self, h, pos, attend, p=None: pieces.append((len(h), p is not None))
                        or orig_layers(self, h, pos, attend, p))
    compiled = LLM(model, tok, enforce_eager=False, enable_prefix_caching=False)
    eager = LLM(model, tok, enable_prefix_caching=False)
    assert _tokens(compiled, ids, params) == _tokens(eager, ids, params)
    # the compiled graph did the decoding, at many batch sizes (requests finish at different lengths)
    assert len(calls) > 20 and len(set(calls)) > 5, calls
    # the prefill steps ran piecewise (compiled around the attention); the compiled decode graph does not take this path
    assert any(p for _, p in pieces) and all(n > 1 for n, p in pieces if p), pieces
    # live weights: change the model in place after the graph was compiled; both engines must serve the new model
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.02 * torch.randn_like(p))
    try:
        after_c, after_e = _tokens(compiled, ids, params), _tokens(eager, ids, params)
        assert after_c == after_e
        assert after_e != _tokens(LLM(zoo.load("teacher")[0], tok, enable_prefix_caching=False), ids, params)  # it did change
    finally:
        with torch.no_grad():  # restore for other tests in this module
            for p, q in zip(model.parameters(), zoo.load("teacher")[0].parameters()): p.copy_(q)


def test_compiled_decode_does_not_recompile_per_batch_size(setup):
    import torch._dynamo
    model, tok, ids, params = setup
    llm = LLM(model, tok, enforce_eager=False, enable_prefix_caching=False)
    llm.generate(ids[:5], SamplingParams(max_tokens=20), use_tqdm=False)  # compiles once (batch 5, a few context sizes)
    from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]
    llm.generate(ids, params, use_tqdm=False)  # batches 24 -> 1 and contexts up to 3 blocks: no new graph
    assert counters["stats"]["unique_graphs"] == before


def test_compiled_decode_without_a_cpp_compiler_is_refused_by_name(setup, monkeypatch):
    "On a CPU, torch.compile needs a C++ compiler; without one the engine says so at construction, not mid-request."
    import shutil
    model, tok, _, _ = setup
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    from posttrain_nb.serve import kernels
    monkeypatch.setattr(kernels, "_CPU_KERNEL", {})  # or the C kernel's "no compiler" answer would stay cached for later tests
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        LLM(model, tok, enforce_eager=False)
    LLM(model, tok)  # the eager engine needs none


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_released_block_table_rows_are_cleared(setup, enforce_eager):
    """A finished sequence's block-table row is zeroed when released. Decode steps pad a batch to its longest context and
    read every table entry up to it (masked); a reused row that kept its old owner's blocks would point those reads at
    blocks anywhere in the pool instead of at block 0."""
    model, tok, ids, params = setup
    llm = LLM(model, tok, enforce_eager=enforce_eager, enable_prefix_caching=False)
    llm.generate(ids, params, use_tqdm=False)
    assert llm.runner.rows == {} and not llm.runner.tables.any()


def test_c_kernel_serves_the_torch_paths_tokens_eager_and_compiled(setup, monkeypatch, tiny_llama):
    """On a Linux CPU with AVX-512 the engine's decode attention is the C kernel (serve.kernels.paged_decode_cpu), in
    eager steps and inside the compiled decode graph. Both must give the torch path's greedy tokens, and the kernel
    must really be what ran."""
    from posttrain_nb.serve import kernels
    model, tok, ids, params = setup
    import sys
    if not (sys.platform.startswith("linux") and torch.backends.cpu.get_cpu_capability() == "AVX512" and kernels.cpp_compiler()):
        pytest.skip("the C kernel needs Linux, an AVX-512 CPU and a C compiler")
    assert kernels.cpu_kernel() is not None, "this machine can build the C kernel, so it must load (see the warning)"
    ref = _tokens(LLM(model, tok, attn_backend="torch", enable_prefix_caching=False), ids, params)
    fn, calls = kernels.cpu_kernel(), []
    monkeypatch.setitem(kernels._CPU_KERNEL, "fn", lambda *a: calls.append(a[8]) or fn(*a))  # a[8] = batch size
    for kw in ({}, {"enforce_eager": False}):
        calls.clear()
        llm = LLM(model, tok, enable_prefix_caching=False, **kw)
        assert llm.runner.attn_backend == "cpu"
        assert _tokens(llm, ids, params) == ref
        assert len(calls) > 100, (kw, len(calls))  # every layer of every decode step
        if kw: assert max(calls) == len(ids)  # the compiled graph attends the whole batch in one call (eager: per bucket)
    with pytest.raises(ValueError, match="head dim must be 16, 32, 64 or 128"):  # head dim 8: refused by name, not run
        LLM(tiny_llama(tok), tok, attn_backend="cpu")
    assert LLM(tiny_llama(tok), tok).runner.attn_backend == "torch"  # 'auto' falls back


def test_compiled_decode_writes_the_cache_in_place(setup):
    """The compiled decode graph stores every layer's new K/V into the pool itself (an index_copy_ on its input). If the
    compiler functionalized that into a copy, every step would allocate a pool-sized tensor; the profiler sees none.
    (Control: the same profiler does see the pool-sized allocation of a graph that clones its input.)"""
    model, tok, ids, params = setup
    def biggest(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof: fn()
        return max((e.cpu_memory_usage for e in prof.events()), default=0)
    kv, s, x = torch.zeros(2**20), torch.tensor([1, 2]), torch.tensor([1.0, 2.0])
    clone = torch.compile(lambda kv, s, x: kv.clone().index_copy_(0, s, x)); clone(kv, s, x)
    assert biggest(lambda: clone(kv, s, x)) >= kv.numel() * 4
    llm = LLM(model, tok, enforce_eager=False, enable_prefix_caching=False)
    ref = _tokens(LLM(model, tok, enable_prefix_caching=False), ids, params)
    assert _tokens(llm, ids, params) == ref  # compiled once, and right
    pool = llm.runner.kv.numel() * llm.runner.kv.element_size()
    assert biggest(lambda: llm.generate(ids, params, use_tqdm=False)) < pool // 8
