"""Reproducible LoRA: the same seed gives the same LoRA losses in two fresh processes.

Each process starts with a different random torch state (torch seeds itself from the OS) and draws a different
number of random values before training, so only seeding *before* the adapter's init makes the runs agree."""
import json, os, subprocess, sys

SCRIPT = r'''
import json, sys, torch
torch.rand(int(sys.argv[2]))  # unrelated randomness before training, different in each process
from posttrain_nb import zoo
from posttrain_nb.core import TrainConfig
from posttrain_nb.tasks import ArithTask, to_preference_pairs
from posttrain_nb.train.sft import train_sft
from posttrain_nb.train.dpo import train_dpo
seed = int(sys.argv[1])
model, tok = zoo.load("base")
items = ArithTask().sample(16, seed=0, split="train")
_, sft = train_sft(model, tok, items, TrainConfig(steps=3, batch_size=8, lr=5e-3, seed=seed), progress=False)
model, tok = zoo.load("base")
rows = to_preference_pairs(items, [[i.solution, i.solution.replace("Answer", "So")] for i in items])
_, dpo = train_dpo(model, tok, rows, TrainConfig(steps=3, batch_size=8, lr=5e-3, seed=seed), progress=False)
print(json.dumps({"sft": [h["loss"] for h in sft.history], "dpo": [h["loss"] for h in dpo.history]}))
'''


def _run(seed, noise):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(seed), str(noise)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_seed_same_lora_losses_in_fresh_processes():
    a, b, c = _run(0, 3), _run(0, 11), _run(1, 3)
    assert a == b                                  # bit-identical losses, step by step, for SFT and DPO
    assert a["sft"][1:] != c["sft"][1:] and a["dpo"][1:] != c["dpo"][1:]  # another seed: another adapter init
