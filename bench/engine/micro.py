"""Three measurements behind the engine's compiled steps, each against the alternative, in one process.

Run from the repository root:  OMP_NUM_THREADS=1 python bench/engine/micro.py [--batch 256]
Writes bench/engine/micro.json and bench/engine/micro.png.

- reuse: one compiled engine (zoo teacher) serves three batches of `--batch` requests in turn; the median decode step
  of each batch, once as the engine is, once with released block-table rows left as they were (the old behaviour:
  a padded batch then reads a finished sequence's stale blocks).
- gemm: the products of the zoo teacher (128 wide) and of the bench's 8 x 512 model, as F.linear runs them (MKL) and
  as oneDNN runs them on a weight packed once into its blocked layout (what vLLM's CPU backend does at load time);
  GFLOP/s, the fastest of interleaved repeats. The engine does not pack (see bench/engine/README.md).
- attention: decode attention at teacher sizes (4 heads over 2 KV heads of 32 dims, 6 blocks of 16) in the forms a
  compiled decode step can use: the C kernel (serve.kernels.paged_decode_cpu, what the engine calls on an AVX-512
  CPU), and, compiled, blocks kept as a loop level (`_decode_attention`, its fallback) and the same softmax over one
  flattened context; interleaved repeats, the fastest kept.
"""
from __future__ import annotations
import argparse, json, statistics, sys, time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain_nb import zoo
from posttrain_nb.serve.engine import LLM, SamplingParams
from posttrain_nb.serve.kernels import cpu_kernel, paged_decode_cpu
from posttrain_nb.serve.model_runner import ModelRunner, _decode_attention

OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(OUT))
from run import prompts_of  # the benchmark's task prompts


def reuse(batch, stale_rows, steps=20):
    "Median decode-step ms of three consecutive batches on one compiled engine."
    model, tok = zoo.load("teacher")
    ids = prompts_of(tok, batch)  # run.py's prompts: 2- and 3-operand problems, some with distractors (lengths vary)
    orig = ModelRunner.release
    if stale_rows:  # the old release(): forget the row, keep its entries
        ModelRunner.release = lambda self, seq: (lambda r: r is not None and self.free_rows.append(r[0]))(self.rows.pop(seq, None))
    try:
        llm, out = LLM(model, tok, enable_prefix_caching=False, enforce_eager=False), []
        for rep in range(3):
            for i, x in enumerate(ids): llm.add_request(f"{rep}-{i}", {"prompt_token_ids": x}, SamplingParams(max_tokens=120, ignore_eos=True))
            for _ in range(10): llm.step()  # the prefill and a few decode steps (compiles on the first batch)
            ts = []
            for _ in range(steps):
                t = time.perf_counter(); llm._step(); ts.append(time.perf_counter() - t)
            out.append(1e3 * statistics.median(ts))
            llm.abort_request(list(llm.requests))
        return out
    finally:
        ModelRunner.release = orig


def flat_attention(q, k_new, v_new, k_cache, v_cache, tables, cached, scale):
    "The previous form: the context flattened to one axis T = blocks * block_size."
    B, H, D = q.shape
    H_kv, T = k_cache.shape[0], tables.shape[1] * k_cache.shape[2]
    K, V = k_cache[:, tables].reshape(H_kv, B, T, D), v_cache[:, tables].reshape(H_kv, B, T, D)
    qg = q.view(B, H_kv, H // H_kv, D).permute(1, 0, 2, 3)
    s = ((qg[:, :, :, None, :] * K[:, :, None]).sum(-1) * scale).masked_fill(~cached[None, :, None], float("-inf"))
    s_new = (qg * k_new.transpose(0, 1)[:, :, None]).sum(-1, keepdim=True) * scale
    m = torch.maximum(s.amax(-1, keepdim=True), s_new)
    e, e_new = torch.exp(s - m), torch.exp(s_new - m)
    o = (e[..., None] * V[:, :, None]).sum(-2) + e_new * v_new.transpose(0, 1)[:, :, None]
    return (o / (e.sum(-1, keepdim=True) + e_new)).permute(1, 0, 2, 3).reshape(B, H, D)


def attention(batch, rounds=15, calls=20):
    "Fastest ms per call of each form, interleaved; and the largest difference from the first."
    torch.manual_seed(0)
    H, H_kv, D, NB, bs, n = 4, 2, 32, 4096, 16, 6
    kc, vc = torch.randn(H_kv, NB, bs, D), torch.randn(H_kv, NB, bs, D)
    tables = torch.randperm(NB)[:batch * n].view(batch, n).to(torch.int32)
    cached = torch.arange(n * bs)[None] < torch.randint(40, n * bs, (batch,))[:, None]
    args = (torch.randn(batch, H, D), torch.randn(batch, H_kv, D), torch.randn(batch, H_kv, D), kc, vc, tables, cached, D ** -0.5)
    fs = {"blocks as a loop level": torch.compile(_decode_attention), "one flat context": torch.compile(flat_attention)}
    if cpu_kernel() is not None:  # the C kernel: the new token's K/V as extra arguments, as the compiled graph passes them
        q, kn, vn, _, _, _, _, scale = args
        ctx = cached.sum(-1).to(torch.int32)
        fs["C kernel"] = lambda *a: paged_decode_cpu(q, kc, vc, tables, ctx, scale, kn, vn)
    outs = {k: f(*args) for k, f in fs.items()}
    best = {k: float("inf") for k in fs}
    for _ in range(rounds):
        for k, f in fs.items():
            t = time.perf_counter()
            for _ in range(calls): f(*args)
            best[k] = min(best[k], 1e3 * (time.perf_counter() - t) / calls)
    first, *rest = outs.values()
    return best, max(float((first - o).abs().max()) for o in rest)


@torch.no_grad()
def gemm(rounds=7, calls=5):
    "GFLOP/s of each product [M, K] x [K, N]: F.linear (MKL) and oneDNN on a packed weight, fastest of interleaved repeats."
    out = []
    shapes = ([("teacher", KN) for KN in ((128, 128), (128, 256), (256, 128))]
              + [("8x512", KN) for KN in ((512, 512), (512, 1376), (1376, 512))])
    for model, (K, N) in tqdm(shapes, desc="gemm shapes"):
        w = torch.randn(N, K) * K ** -0.5
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        for M in (64, 256, 2048):
            x = torch.randn(M, K)
            fs = {"MKL (F.linear)": lambda: torch.nn.functional.linear(x, w),
                  "oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")}
            diff = float((fs["MKL (F.linear)"]() - fs["oneDNN packed"]()).abs().max())
            if diff > 1e-4: raise RuntimeError(f"oneDNN and MKL disagree by {diff:.1e} on [{M}x{K}]x[{K}x{N}]")
            best = {k: float("inf") for k in fs}
            for _ in range(rounds):
                for k, f in fs.items():
                    t = time.perf_counter()
                    for _ in range(calls): f()
                    best[k] = min(best[k], (time.perf_counter() - t) / calls)
            out.append({"model": model, "M": M, "K": K, "N": N, "max_abs_diff": diff,
                        **{k: 2 * M * K * N / v / 1e9 for k, v in best.items()}})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="requests per batch (reuse) and batch size (attention)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    r = {"batch": a.batch, "threads": 1, "torch": torch.__version__}
    print("reuse: three batches on one compiled engine, twice (about 20 s)", flush=True)
    r["reuse_step_ms"] = {"rows zeroed on release (the engine)": reuse(a.batch, False),
                          "stale rows (before)": reuse(a.batch, True)}
    print("attention: the C kernel and two compiled forms, interleaved", flush=True)
    r["attention_ms"], r["attention_max_abs_diff"] = attention(a.batch)
    r["gemm_gflops"] = gemm()
    for k, v in r["reuse_step_ms"].items(): print(f"reuse, {k}: " + ", ".join(f"{x:.1f}" for x in v) + " ms per step (batches 1, 2, 3)")
    for k, v in r["attention_ms"].items(): print(f"attention, {k}: {v:.3f} ms per layer call")
    print(f"attention forms agree to {r['attention_max_abs_diff']:.1e}")
    for g in r["gemm_gflops"]:
        print(f"gemm {g['model']} [{g['M']}x{g['K']}]x[{g['K']}x{g['N']}]: MKL {g['MKL (F.linear)']:.0f}, "
              f"oneDNN packed {g['oneDNN packed']:.0f} GFLOP/s (max diff {g['max_abs_diff']:.1e})")
    (OUT / "micro.json").write_text(json.dumps(r, indent=2))
    plot(r, OUT / "micro.png")


def plot(r, path):
    "micro.png: the three measurements of one run (r = micro.json)."
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 3, figsize=(15, 3.8))
    for k, v in r["reuse_step_ms"].items(): axs[0].plot([1, 2, 3], v, "o-", label=k)
    axs[0].set_xticks([1, 2, 3]); axs[0].set_xlabel("batch served by the same engine"); axs[0].set_ylabel("ms per decode step")
    axs[0].set_ylim(bottom=0); axs[0].legend(fontsize=8); axs[0].set_title(f"reused engine, batch {r['batch']}")
    axs[1].bar(list(r["attention_ms"]), list(r["attention_ms"].values()), color=["C0", "C3", "C2"][:len(r["attention_ms"])])
    axs[1].set_ylabel("ms per layer call (fastest)"); axs[1].set_title(f"decode attention, batch {r['batch']}")
    shapes = sorted({(g["model"], g["K"], g["N"]) for g in r["gemm_gflops"]}, key=lambda t: (t[0] != "teacher", t[1], t[2]))
    for i, (model, K, N) in enumerate(shapes):
        gs = sorted((g for g in r["gemm_gflops"] if (g["model"], g["K"], g["N"]) == (model, K, N)), key=lambda g: g["M"])
        axs[2].plot([g["M"] for g in gs], [g["oneDNN packed"] / g["MKL (F.linear)"] for g in gs], "o-" if model != "teacher" else "s--",
                    color=f"C{i}", label=f"{model} {K}->{N}")
    axs[2].axhline(1, color="gray", lw=0.8); axs[2].set_xscale("log", base=2); axs[2].set_xlabel("rows M (tokens in the step)")
    axs[2].set_ylabel("oneDNN packed / MKL throughput"); axs[2].set_title("linear layers, 1 thread"); axs[2].legend(fontsize=7, ncol=2)
    plt.tight_layout(); plt.savefig(path, dpi=110); plt.close(fig)


if __name__ == "__main__":
    main()
