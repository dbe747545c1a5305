"PPO on the shared loop: resume at an iteration boundary repeats the uninterrupted run, and a changed run is refused."
import copy
import pytest, torch
from posttrain_nb import zoo
from posttrain_nb.tasks import ArithTask
from posttrain_nb.train.ppo import PPOConfig, train_ppo, verifier_reward

@pytest.fixture(scope="module")
def setup():
    base, tok = zoo.load("base")
    rows = [{"prompt": it.prompt, "answer": it.answer} for it in ArithTask().sample(32, seed=3, split="train")]
    return base, tok, rows

CFG = PPOConfig(iterations=2, prompts_per_iter=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=32, lr=1e-4)

def test_resume_repeats_the_uninterrupted_run(setup, tmp_path):
    base, tok, rows = setup
    full = train_ppo(copy.deepcopy(base), tok, rows, verifier_reward, CFG, progress=False)
    train_ppo(copy.deepcopy(base), tok, rows, verifier_reward, CFG, out_dir=tmp_path, stop_after=1, progress=False)
    # the same starting policy (it is also the reference); the trained weights, critic and optimiser come from the checkpoint
    res = train_ppo(copy.deepcopy(base), tok, rows, verifier_reward, CFG, out_dir=tmp_path, progress=False)
    assert res.train.resumed_from == 2 and res.train.steps == 4
    assert [h["loss"] for h in res.train.history] == [h["loss"] for h in full.train.history]
    for p, q in zip(res.policy.parameters(), full.policy.parameters()): assert torch.equal(p, q)

def test_other_settings_are_not_resumed(setup, tmp_path):
    base, tok, rows = setup
    train_ppo(copy.deepcopy(base), tok, rows, verifier_reward, CFG, out_dir=tmp_path, stop_after=1, progress=False)
    other = PPOConfig(**{**CFG.__dict__, "kl_coef": 0.2})
    with pytest.raises(ValueError, match="different run"):
        train_ppo(copy.deepcopy(base), tok, rows, verifier_reward, other, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different run"):
        train_ppo(copy.deepcopy(base), tok, rows[:16], verifier_reward, CFG, out_dir=tmp_path, progress=False)
