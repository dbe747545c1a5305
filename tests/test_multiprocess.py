"The shared training loop, DPO and PPO under `accelerate launch` with 2 CPU processes (gloo) match a 1-process run."
import json, os, subprocess, sys, textwrap
import pytest
from conftest import bin_path

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from accelerate import Accelerator
    from posttrain_nb.core import TrainConfig, train_loop, set_seed
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.lin = torch.nn.Linear(4, 1)
        def forward(self, x): return self.lin(x)
    g = torch.Generator().manual_seed(0); X = torch.randn(64, 4, generator=g)
    data = [(x, x @ torch.tensor([1., -2., 3., .5])) for x in X]
    collate = lambda ex: {"x": torch.stack([e[0] for e in ex]), "y": torch.stack([e[1] for e in ex])}
    loss_fn = lambda m, b: ((m(b["x"]).squeeze(-1) - b["y"]) ** 2).mean()
    set_seed(0); model = Toy()
    acc = Accelerator(cpu=True)
    res = train_loop(model, loss_fn, data, TrainConfig(steps=40, batch_size=8, lr=0.1, warmup_steps=2),
                     collate=collate, accelerator=acc, progress=False)
    if acc.is_main_process:
        w = acc.unwrap_model(model).lin.weight.detach().flatten().tolist()
        json.dump({"world": acc.num_processes, "loss": [h["loss"] for h in res.history], "w": w}, open(sys.argv[1], "w"))
''')

def run_one_and_two(tmp_path, source, name, port, timeout=600):
    "Run a training script as 1 process and under `accelerate launch` with 2 CPU processes; return both JSON results."
    script = tmp_path / f"{name}.py"; script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([bin_path("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                          str(script), str(tmp_path / "two.json")], capture_output=True, text=True, env=env, timeout=timeout)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (a["world"], b["world"]) == (1, 2)
    return a, b

def test_two_processes_match_one(tmp_path):
    a, b = run_one_and_two(tmp_path, SCRIPT, "train", 29517, timeout=300)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert a["w"] == pytest.approx(b["w"], rel=1e-5, abs=1e-6)
    assert b["loss"][-1] < 0.3 * b["loss"][0]  # and it actually trained


DPO_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from accelerate import Accelerator
    from posttrain_nb import zoo
    from posttrain_nb.core import TrainConfig, set_seed
    from posttrain_nb.tasks import ArithTask
    from posttrain_nb.train.dpo import train_dpo
    items = ArithTask().sample(48, seed=7, split="train")
    rows = [{"prompt": it.prompt, "chosen": it.solution,
             "rejected": it.solution.replace(f"Answer: {it.answer}", f"Answer: {it.answer + 3}")} for it in items]
    model, tok = zoo.load("base")
    acc = Accelerator(cpu=True)
    set_seed(0)  # the LoRA initialisation must be the same in every process
    model, res = train_dpo(model, tok, rows, TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=1),
                           beta=0.1, lora_r=4, accelerator=acc, progress=False)
    if acc.is_main_process:
        json.dump({"world": acc.num_processes, "loss": [h["loss"] for h in res.history]}, open(sys.argv[1], "w"))
''')

def test_dpo_two_processes_match_one(tmp_path):
    "The DPO trainer under `accelerate launch` (2 CPU processes, gloo) gives the 1-process loss curve."
    a, b = run_one_and_two(tmp_path, DPO_SCRIPT, "dpo", 29519)
    assert a["loss"][0] == pytest.approx(0.6931472, abs=1e-5)  # theta = ref at step 0
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    assert b["loss"][-1] < a["loss"][0] - 0.05  # and it learned


PPO_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from accelerate import Accelerator
    from posttrain_nb import zoo
    from posttrain_nb.tasks import ArithTask
    from posttrain_nb.train.ppo import PPOConfig, train_ppo, verifier_reward
    rows = [{"prompt": it.prompt, "answer": it.answer} for it in ArithTask().sample(32, seed=3, split="train")]
    model, tok = zoo.load("base")
    acc = Accelerator(cpu=True)
    cfg = PPOConfig(iterations=2, prompts_per_iter=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=32, lr=1e-4)
    res = train_ppo(model, tok, rows, verifier_reward, cfg, accelerator=acc, progress=False)
    if acc.is_main_process:
        h = res.train.history
        json.dump({"world": acc.num_processes, "loss": [x["loss"] for x in h], "score": [x["score"] for x in h],
                   "grad_norm": [x["grad_norm"] for x in h]}, open(sys.argv[1], "w"))
''')

def test_ppo_two_processes_match_one(tmp_path):
    """PPO at the same global minibatch (4 rows: 4 on one process, 2 + 2 on two) takes the same steps.

    The loss is a token mean over the global minibatch (count_fn), so the split cannot change it; what differs is
    the order of float32 sums (~1e-6 relative), and the second rollout is sampled from weights that differ by that
    much, which changes no sampled token here: 1e-4 allows for that rounding, accumulated over 8 steps."""
    a, b = run_one_and_two(tmp_path, PPO_SCRIPT, "ppo", 29521)
    assert len(a["loss"]) == 8
    assert a["score"] == b["score"]  # the same rollouts, minibatches and rewards
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
