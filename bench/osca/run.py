"""Benchmark OSCA's hill climbing: time vs problems and vs budget, and against a from-scratch reference climber.

Run from the repository root:  .venv/bin/python bench/osca/run.py
Writes bench/osca/results.json and bench/osca/scaling.png and prints the headline median time.
"""
from __future__ import annotations
import json, platform, statistics, time
from pathlib import Path

import numpy as np

from posttrain_nb.infer.osca import hill_climb, pass_at_budget

OUT = Path(__file__).resolve().parent
SEED = 0

def random_p(n_configs, n_problems, seed=SEED):
    "Success rates shaped like real ones: config skill x problem difficulty x noise, with exact zeros."
    rng = np.random.default_rng(seed)
    logit = (rng.normal(-1.0, 1.0, (n_configs, 1)) - rng.normal(0.0, 1.5, (1, n_problems))
             + rng.normal(0.0, 1.5, (n_configs, n_problems)))
    p = 1 / (1 + np.exp(-logit))
    p[rng.uniform(size=p.shape) < 0.2] = 0.0
    return p

def timed(fn, repeats):
    "Run fn `repeats` times; return (the last result, list of seconds)."
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return out, times

def reference_hill_climb(p, budget, restarts=1, seed=0):
    "The peer: the slot loop as written in OSCA's osca.py, recomputing the whole objective for every candidate."
    S = p.shape[0]
    q = 1 - np.clip(p, 0, 1 - 1e-9)
    def objective(slots):
        alloc = np.bincount(slots, minlength=S)
        return float(np.mean(1 - np.prod(q ** alloc[:, None], axis=0)))
    rng, best, best_val = np.random.default_rng(seed), None, -np.inf
    for _ in range(restarts):
        slots = rng.integers(0, S, size=budget)
        improved = True
        while improved:
            improved = False
            for s in range(budget):
                bar, keep = objective(slots), slots[s]
                for b in range(S):
                    if b == keep: continue
                    slots[s] = b
                    v = objective(slots)
                    if v > bar * (1 + 1e-15) + 1e-15: bar, keep, improved = v, b, True
                slots[s] = keep
        alloc = np.bincount(slots, minlength=S)
        val = objective(slots)
        if val > best_val: best, best_val = alloc, val
    return best

def main(repeats=5):
    res = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "numpy": np.__version__, "seed": SEED, "note": "wall-clock seconds on a shared 2-core CPU; "
           "other jobs may slow it 2-3x"}
    # headline: 64 configs, C = 128, 1,000 problems, default 8 restarts
    p = random_p(64, 1000)
    alloc, times = timed(lambda: hill_climb(p, 128), repeats)
    pure = max(pass_at_budget(p, np.eye(64, dtype=int)[i] * 128) for i in range(64))
    res["headline"] = {"configs": 64, "budget": 128, "problems": 1000, "restarts": 8, "seconds": times,
                       "median_s": statistics.median(times), "target_s": 1.0,
                       "pass_at_C_learned": pass_at_budget(p, alloc), "pass_at_C_best_pure": pure,
                       "configs_used": int((alloc > 0).sum())}
    # scaling with the number of problems and with the budget
    res["vs_problems"] = []
    for D in [100, 300, 1000, 3000]:
        _, t = timed(lambda: hill_climb(random_p(64, D), 128), 3)
        res["vs_problems"].append({"problems": D, "median_s": statistics.median(t)})
    res["vs_budget"] = []
    for C in [16, 32, 64, 128, 256]:
        _, t = timed(lambda: hill_climb(p, C), 3)
        res["vs_budget"].append({"budget": C, "median_s": statistics.median(t)})
    # peer: the from-scratch slot loop, on an instance small enough for it, same starts (restarts=1, same seed)
    ps = random_p(32, 300, seed=1)
    ours, t_ours = timed(lambda: hill_climb(ps, 64, restarts=1, seed=3), repeats)
    ref, t_ref = timed(lambda: reference_hill_climb(ps, 64, restarts=1, seed=3), 2)
    res["peer"] = {"instance": {"configs": 32, "budget": 64, "problems": 300, "restarts": 1},
                   "ours_median_s": statistics.median(t_ours), "reference_median_s": statistics.median(t_ref),
                   "speedup": statistics.median(t_ref) / statistics.median(t_ours),
                   "same_allocation": bool((ours == ref).all()),
                   "objective_ours": pass_at_budget(ps, ours), "objective_reference": pass_at_budget(ps, ref)}
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    try:
        import matplotlib; matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        a1.loglog([r["problems"] for r in res["vs_problems"]], [r["median_s"] for r in res["vs_problems"]], "o-")
        a1.set(xlabel="problems |D|", ylabel="hill_climb seconds (median)", title="64 configs, C = 128, 8 restarts")
        a2.loglog([r["budget"] for r in res["vs_budget"]], [r["median_s"] for r in res["vs_budget"]], "o-")
        a2.set(xlabel="budget C (samples)", title="64 configs, 1,000 problems")
        a2.set_xscale("log", base=2)
        for a, xs in ((a1, [r["problems"] for r in res["vs_problems"]]), (a2, [r["budget"] for r in res["vs_budget"]])):
            a.set_xticks(xs, [str(x) for x in xs]); a.minorticks_off()
            a.axhline(1.0, ls="--", c="gray", lw=0.8); a.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(OUT / "scaling.png", dpi=110)
    except ImportError: pass
    h, pr = res["headline"], res["peer"]
    print(f"hill_climb, 64 configs x 1,000 problems, C=128, 8 restarts: median {h['median_s']:.3f} s "
          f"over {repeats} runs (target < 1 s)")
    print(f"peer (32 configs, C=64, 300 problems, 1 start): ours {pr['ours_median_s']*1e3:.1f} ms, "
          f"from-scratch reference {pr['reference_median_s']:.2f} s ({pr['speedup']:.0f}x); "
          f"same allocation: {pr['same_allocation']}")
    return res

if __name__ == "__main__":
    main()
