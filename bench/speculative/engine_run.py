"""Speculative decoding inside the paged engine: speed-up over the same engine without a draft, by batch size.

Run from the repository root:  OMP_NUM_THREADS=1 python bench/speculative/engine_run.py [--quick]
Writes bench/speculative/engine_results.json and bench/speculative/engine_speedup.png.

Target: zoo `teacher` (4 x 128); draft: zoo `draft` (1 x 128, same tokenizer). Greedy, task prompts
(`ArithTask().sample(64, seed=0, split="test")`, chat template), max_tokens 48, eos stops a request.
"Batch B" = the engine's `max_num_seqs=B` over all 64 requests (continuous batching at concurrency B).
Every configuration must produce the same token ids as the engine without a draft (lossless), or the run fails.
Each engine is built fresh for every timed repeat (no warm prefix cache carried between repeats); the fastest
of REPEATS is kept, by this process's CPU time (one thread: insensitive to other jobs) and by wall time.
"""
from __future__ import annotations
import argparse, json, platform, time
from pathlib import Path

import torch

from posttrain_nb import zoo
from posttrain_nb.core import render_prompts, encode_texts
from posttrain_nb.tasks import ArithTask
from posttrain_nb.serve.engine import LLM
from posttrain_nb.serve.sampler import SamplingParams
from posttrain_nb.serve.speculative import expected_tokens_per_call

OUT = Path(__file__).resolve().parent

def run_once(target, tok, ids, B, draft=None, k=0):
    llm = LLM(target, tok, max_num_seqs=B, speculative_model=draft, num_speculative_tokens=k)
    w, c = time.perf_counter(), time.process_time()
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], SamplingParams(max_tokens=48), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - w, time.process_time() - c, llm

def main(quick:bool=False):
    torch.set_num_threads(1)
    target, tok = zoo.load("teacher")
    draft, _ = zoo.load("draft")
    n_prompts, repeats = (16, 1) if quick else (64, 3)
    batches, ks = ((1, 4, 16) if quick else (1, 4, 16, 64)), (2, 4)
    ids = encode_texts(tok, render_prompts(tok, [it.prompt for it in ArithTask().sample(n_prompts, seed=0, split="test")], True))
    run_once(target, tok, ids[:4], 4, draft, 2)  # warm-up
    rows = []
    for B in batches:
        best, ref = {}, None
        for r in range(repeats):
            for k in (0,) + ks:
                out, w, c, llm = run_once(target, tok, ids, B, draft if k else None, k)
                if k == 0: ref = out if ref is None else ref
                assert out == ref, f"batch {B}, k={k}: output differs from the engine without a draft"
                b = best.setdefault(k, {"wall": 1e9, "cpu": 1e9})
                b["wall"], b["cpu"] = min(b["wall"], w), min(b["cpu"], c)
                if k: b["stats"] = llm.spec.stats.summary()
        n_tok = sum(len(o) for o in ref)
        for k in ks:
            st = best[k]["stats"]
            rows.append({"batch": B, "k": k, "new_tokens": n_tok, "identical": True,
                         "base_tok_s_cpu": n_tok / best[0]["cpu"], "spec_tok_s_cpu": n_tok / best[k]["cpu"],
                         "speedup_cpu": best[0]["cpu"] / best[k]["cpu"], "speedup_wall": best[0]["wall"] / best[k]["wall"],
                         "acceptance_rate": st["acceptance_rate"], "alpha": st["alpha"],
                         "tokens_per_call": st["tokens_per_call"],
                         "formula_tokens_per_call": expected_tokens_per_call(st["alpha"], k)})
            print(f"batch {B:3d} k={k}: {rows[-1]['speedup_cpu']:.2f}x CPU ({rows[-1]['speedup_wall']:.2f}x wall), "
                  f"{rows[-1]['base_tok_s_cpu']:.0f} -> {rows[-1]['spec_tok_s_cpu']:.0f} tok/s, acceptance "
                  f"{st['acceptance_rate']:.2f}, tokens/call {st['tokens_per_call']:.2f}")
    res = {"setup": {"target": "zoo teacher (4x128)", "draft": "zoo draft (1x128)", "prompts": n_prompts,
                     "max_tokens": 48, "greedy": True, "repeats": repeats, "timing": "fastest repeat",
                     "batch": "max_num_seqs", "torch": torch.__version__, "python": platform.python_version(),
                     "threads": torch.get_num_threads(), "machine": platform.machine()},
           "rows": rows}
    (OUT / "engine_results.json").write_text(json.dumps(res, indent=2))
    plot(res)
    return res

def plot(res):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k in sorted({r["k"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["k"] == k]
        ax.plot([r["batch"] for r in rs], [r["speedup_cpu"] for r in rs], "o-", label=f"k={k} (CPU time)")
        ax.plot([r["batch"] for r in rs], [r["speedup_wall"] for r in rs], "x:", color=ax.lines[-1].get_color(), label=f"k={k} (wall)")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log", base=2); ax.set_xlabel("batch (max_num_seqs)"); ax.set_ylabel("speed-up over the engine without a draft")
    ax.set_title("engine + zoo draft, greedy, 1 thread (identical outputs)"); ax.legend(fontsize=8)
    plt.tight_layout(); fig.savefig(OUT / "engine_speedup.png", dpi=110)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts, one repeat, batches 1/4/16 (a smoke run)")
    main(ap.parse_args().quick)
