"GRPO under `accelerate launch` with 2 CPU processes (gloo) equals a 1-process run at the same global batch."
import textwrap
import pytest
from test_multiprocess import run_one_and_two

SCRIPT = textwrap.dedent('''
    import json, sys, copy, torch
    from accelerate import Accelerator
    from posttrain_nb import zoo
    from posttrain_nb.core import set_seed
    from posttrain_nb.tasks import ArithTask
    from posttrain_nb.train.grpo import GRPOConfig, train_grpo, accuracy_reward, format_reward
    items = ArithTask().sample(64, seed=3, split="train")
    base, tok = zoo.load("base")
    acc = Accelerator(cpu=True)
    out = {"world": acc.num_processes}
    for loss_type in ("dapo", "grpo"):
        set_seed(0)
        cfg = GRPOConfig(steps=4, prompts_per_step=4, num_generations=4, lr=1e-4, num_iterations=2, beta=0.04,
                         loss_type=loss_type, reward_weights=[1.0, 0.1])
        model, res = train_grpo(copy.deepcopy(base), tok, items, [accuracy_reward, format_reward], cfg, accelerator=acc,
                                progress=False)
        w = acc.unwrap_model(model).model.layers[0].self_attn.q_proj.weight.detach().flatten()[:64].tolist()
        out[loss_type] = {"loss": [h["loss"] for h in res.history], "reward": [h["reward"] for h in res.history], "w": w,
                          "moved": float((acc.unwrap_model(model).model.layers[0].self_attn.q_proj.weight -
                                          base.model.layers[0].self_attn.q_proj.weight).abs().max())}
    if acc.is_main_process: json.dump(out, open(sys.argv[1], "w"))
''')

def test_grpo_two_processes_match_one(tmp_path):
    a, b = run_one_and_two(tmp_path, SCRIPT, "grpo", 29523)
    for lt in ("dapo", "grpo"):
        assert a[lt]["reward"] == b[lt]["reward"]  # the same rollouts (every process generates the whole batch, seeded)
        assert a[lt]["loss"] == pytest.approx(b[lt]["loss"], rel=1e-4, abs=1e-6)
        assert a[lt]["w"] == pytest.approx(b[lt]["w"], rel=1e-4, abs=1e-7)
        assert a[lt]["moved"] > 1e-5  # it trained
