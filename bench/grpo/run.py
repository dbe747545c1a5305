"""Benchmark GRPO step time: posttrain_nb's train_grpo (rollouts from our paged engine) against TRL 1.16's GRPOTrainer
(rollouts through HF generate), same model, group size, batch, completion length and steps, in one run.

Run from the repository root:  python bench/grpo/run.py [--steps 6] [--prompts 4] [--generations 8]
Zoo `base`, full fine-tuning, fp32 on the CPU (TRL's bf16 default is switched off: on the CPU it autocasts), beta 0.04,
loss_type 'dapo', one iteration per rollout, temperature 1, the task verifier as the only reward. Each trainer runs in its
own fresh process (so neither sees the other's imports, threads or caches); the split between rollout and the rest of
the step comes from timing each trainer's generation call. Writes bench/grpo/results.json and bench/grpo/step_time.png.
That the two compute the same loss on the same completions is tests/test_grpo_trl_parity.py.
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path

OUT = Path(__file__).resolve().parent


def rows(n):
    from posttrain_nb.tasks import ArithTask
    return [{"prompt": [{"role": "user", "content": it.prompt}], "answer": it.answer}
            for it in ArithTask().sample(n, seed=0, split="train")]


def run_ours(a, backend):
    import torch
    from posttrain_nb import zoo
    from posttrain_nb.core import set_seed
    from posttrain_nb.train.grpo import GRPOConfig, train_grpo, accuracy_reward
    model, tok = zoo.load("base")
    set_seed(0)
    cfg = GRPOConfig(steps=a.steps, prompts_per_step=a.prompts, num_generations=a.generations, lr=a.lr, beta=0.04,
                     max_completion_length=a.max_len, loss_type="dapo", rollout_backend=backend)
    t0 = time.perf_counter()
    _, res = train_grpo(model, tok, rows(a.steps * a.prompts), accuracy_reward, cfg, progress=False)
    total = time.perf_counter() - t0
    gen = sum(h["rollout_seconds"] for h in res.history)
    return {"seconds_total": total, "seconds_loop": res.seconds, "seconds_rollout": gen, "seconds_other": total - gen,
            "completion_tokens": sum(h["completions/mean_length"] * a.prompts * a.generations for h in res.history),
            "reward": [h["reward"] for h in res.history]}


def run_trl(a):
    import torch, datasets
    from trl import GRPOConfig as TRLConfig, GRPOTrainer
    from posttrain_nb import zoo
    from posttrain_nb.core import set_seed
    from posttrain_nb.train.grpo import accuracy_reward
    model, tok = zoo.load("base")
    set_seed(0)
    gen_time, n_tok = [0.0], [0]
    with tempfile.TemporaryDirectory() as d:
        args = TRLConfig(output_dir=d, use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
                         num_generations=a.generations, per_device_train_batch_size=a.prompts * a.generations,
                         max_completion_length=a.max_len, max_steps=a.steps, learning_rate=a.lr, beta=0.04,
                         loss_type="dapo", temperature=1.0, lr_scheduler_type="constant", logging_steps=1,
                         disable_tqdm=True, dataloader_num_workers=0)
        t0 = time.perf_counter()
        tr = GRPOTrainer(model=model, processing_class=tok, args=args, reward_funcs=[accuracy_reward],
                         train_dataset=datasets.Dataset.from_list(rows(a.steps * a.prompts)))
        inner = tr._generate_single_turn
        def timed(*args_, **kw):
            t = time.perf_counter(); out = inner(*args_, **kw); gen_time[0] += time.perf_counter() - t
            n_tok[0] += sum(len(c) for c in out[0]); return out
        tr._generate_single_turn = timed
        out = tr.train()
        total = time.perf_counter() - t0
    rewards = [h["reward"] for h in tr.state.log_history if "reward" in h]
    return {"seconds_total": total, "seconds_loop": out.metrics["train_runtime"], "seconds_rollout": gen_time[0],
            "seconds_other": total - gen_time[0],
            "completion_tokens": n_tok[0], "reward": rewards}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per trainer")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-len", type=int, default=48, help="max completion tokens")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    ap.add_argument("--repeats", type=int, default=2, help="runs per trainer (the median is reported)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one trainer, print JSON
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    if a.one:
        res = run_trl(a) if a.one == "trl" else run_ours(a, a.one)
        print("RESULT " + json.dumps(res)); return
    names = {"posttrain_nb (engine)": "engine", "posttrain_nb (HF generate)": "generate", "TRL GRPOTrainer": "trl"}
    runs = {n: [] for n in names}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for r in range(a.repeats):  # interleave, so background load hits every trainer alike
        for n, key in names.items():
            cmd = [sys.executable, __file__, "--one", key] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                              if k not in ("one", "repeats")]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line: raise SystemExit(f"{n} failed:\n{p.stderr[-3000:]}")
            runs[n].append(json.loads(line[0][7:]))
            print(f"{n}: {runs[n][-1]['seconds_total'] / a.steps:.2f} s/step", flush=True)
    med = {n: {m: statistics.median(x[m] for x in v) for m in ("seconds_total", "seconds_loop", "seconds_rollout", "seconds_other",
                                                                    "completion_tokens")} for n, v in runs.items()}
    for n in med: med[n]["s_per_step"], med[n]["s_per_step_loop"] = med[n]["seconds_total"] / a.steps, med[n]["seconds_loop"] / a.steps
    import torch, trl
    ours, theirs = med["posttrain_nb (engine)"], med["TRL GRPOTrainer"]
    res = {"steps": a.steps, "prompts_per_step": a.prompts, "num_generations": a.generations, "max_completion_length": a.max_len,
           "model": "zoo base (649k params), full fine-tuning, fp32", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "trl": trl.__version__, "machine": platform.processor() or platform.machine(),
           "median": med, "runs": runs,
           "speedup_steps_per_second_vs_trl": theirs["s_per_step"] / ours["s_per_step"],
           "speedup_loop_only_vs_trl": theirs["s_per_step_loop"] / ours["s_per_step_loop"],
           "speedup_rollout_vs_trl": theirs["seconds_rollout"] / ours["seconds_rollout"],
           "goal": ">= 2x TRL's steps per second"}
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ns = list(med)
    ro = [med[n]["seconds_rollout"] / a.steps for n in ns]; ot = [med[n]["seconds_other"] / a.steps for n in ns]
    ax.barh(ns, ro, label="rollout (generation)"); ax.barh(ns, ot, left=ro, label="scoring + training + overhead")
    for i, n in enumerate(ns): ax.text(ro[i] + ot[i], i, f" {med[n]['s_per_step']:.2f} s", va="center")
    ax.set(xlabel="seconds per optimiser step", title=f"GRPO step time (median of {a.repeats} runs)\n{a.prompts} prompts x "
           f"G={a.generations}, at most {a.max_len} tokens, {a.steps} steps, {env['OMP_NUM_THREADS']} thread(s)")
    ax.set_xlim(0, 1.15 * max(r + o for r, o in zip(ro, ot)))  # room for the totals
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False); plt.tight_layout(); fig.savefig(OUT / "step_time.png", dpi=120)
    for n in ns: print(f"{n:>28}: {med[n]['s_per_step']:.2f} s/step end to end, {med[n]['s_per_step_loop']:.2f} in the "
                       f"training loop, {med[n]['seconds_rollout'] / a.steps:.2f} of it rollout")
    print(f"ours (engine) is {res['speedup_steps_per_second_vs_trl']:.2f}x TRL's steps per second "
          f"end to end ({res['speedup_loop_only_vs_trl']:.2f}x in the loop, rollout {res['speedup_rollout_vs_trl']:.2f}x); goal >= 2x")


if __name__ == "__main__":
    main()
