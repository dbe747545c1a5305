"""Benchmark one DPO optimiser step: posttrain_nb's train_dpo against TRL's DPOTrainer, in one run.

Run from the repository root:  .venv/bin/python bench/dpo/run.py [--steps 40] [--batch-size 16]
Same zoo model (`base`), same LoRA adapter (r=8, alpha=16, all linear layers), same preference rows, batch size and
sequence lengths, fp32 on the CPU. Writes bench/dpo/results.json and bench/dpo/step_time.png.
"""
from __future__ import annotations
import argparse, copy, json, os, platform, statistics, tempfile, time, warnings
from pathlib import Path

import torch

from posttrain_nb import zoo
from posttrain_nb.core import TrainConfig, set_seed
from posttrain_nb.tasks import ArithTask
from posttrain_nb.train.dpo import train_dpo

OUT = Path(__file__).resolve().parent


def preference_rows(n, seed=0):
    "Gold solution (chosen) against the same solution with a wrong final answer (rejected)."
    items = ArithTask().sample(n, seed=seed, split="train")
    return [{"prompt": [{"role": "user", "content": it.prompt}],
             "chosen": [{"role": "assistant", "content": it.solution}],
             "rejected": [{"role": "assistant", "content": it.solution.replace(f"Answer: {it.answer}", f"Answer: {it.answer + 1 + i % 7}")}]}
            for i, it in enumerate(items)]


def ours(model, tok, rows, steps, batch_size, lr, beta):
    set_seed(0)
    t0 = time.perf_counter()
    _, res = train_dpo(copy.deepcopy(model), tok, rows, TrainConfig(steps=steps, batch_size=batch_size, lr=lr),
                       beta=beta, lora_r=8, lora_alpha=16, progress=False)
    total = time.perf_counter() - t0  # includes wrapping, the one-off reference pass and the loop
    return {"seconds_total": total, "seconds_loop": res.seconds, "ms_per_step": 1000 * total / steps,
            "ms_per_step_loop_only": 1000 * res.seconds / steps, "final_loss": res.history[-1]["loss"]}


def trl_run(model, tok, rows, steps, batch_size, lr, beta, precompute):
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    set_seed(0)
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, beta=beta, learning_rate=lr, per_device_train_batch_size=batch_size,
                         max_steps=steps, lr_scheduler_type="cosine", report_to=[], logging_steps=steps,
                         save_strategy="no", use_cpu=True, seed=0, precompute_ref_log_probs=precompute,
                         disable_tqdm=True, dataloader_num_workers=0)
        t0 = time.perf_counter()
        tr = DPOTrainer(model=copy.deepcopy(model), args=args, processing_class=tok,
                        train_dataset=datasets.Dataset.from_list(rows),
                        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        out = tr.train()
        total = time.perf_counter() - t0  # includes tokenisation, (optional) reference pass and the loop
    return {"seconds_total": total, "seconds_loop": out.metrics["train_runtime"], "ms_per_step": 1000 * total / steps,
            "ms_per_step_loop_only": 1000 * out.metrics["train_runtime"] / steps, "final_loss": out.metrics["train_loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per trainer")
    ap.add_argument("--batch-size", type=int, default=16, help="preference pairs per step")
    ap.add_argument("--repeats", type=int, default=3, help="runs per trainer (the median is reported)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    model, tok = zoo.load("base")
    rows = preference_rows(a.steps * a.batch_size)
    runs = {"posttrain_nb": [], "trl": [], "trl_precompute_ref": []}
    for r in range(a.repeats):  # interleave, so background load hits every trainer alike
        runs["posttrain_nb"].append(ours(model, tok, rows, a.steps, a.batch_size, 5e-4, 0.1))
        runs["trl"].append(trl_run(model, tok, rows, a.steps, a.batch_size, 5e-4, 0.1, False))
        runs["trl_precompute_ref"].append(trl_run(model, tok, rows, a.steps, a.batch_size, 5e-4, 0.1, True))
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    import trl
    res = {"steps": a.steps, "batch_size": a.batch_size, "repeats": a.repeats, "model": "zoo base (649k params)",
           "lora": "r=8, alpha=16, all linear", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "trl": trl.__version__, "machine": platform.processor() or platform.machine(), "median": med, "runs": runs,
           "ratio_ours_to_trl": med["posttrain_nb"]["ms_per_step"] / med["trl"]["ms_per_step"],
           "ratio_ours_to_trl_precompute": med["posttrain_nb"]["ms_per_step"] / med["trl_precompute_ref"]["ms_per_step"]}
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(med)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [med[n]["ms_per_step"] for n in names], 0.4, label="end to end / step")
    ax.bar([i + 0.2 for i in x], [med[n]["ms_per_step_loop_only"] for n in names], 0.4, label="training loop / step")
    ax.set(xticks=list(x), xticklabels=names, ylabel="ms per optimiser step",
           title=f"DPO step time, zoo base + LoRA r=8, batch {a.batch_size} pairs ({a.steps} steps, median of {a.repeats})")
    ax.legend(); plt.tight_layout(); fig.savefig(OUT / "step_time.png", dpi=120)
    for n in names: print(f"{n:>20}: {med[n]['ms_per_step']:.1f} ms/step end to end, {med[n]['ms_per_step_loop_only']:.1f} ms/step in the loop")
    print(f"ours / TRL = {res['ratio_ours_to_trl']:.2f} (TRL with precomputed reference: {res['ratio_ours_to_trl_precompute']:.2f})")


if __name__ == "__main__":
    main()
