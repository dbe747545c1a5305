"GRPO's advantages and loss equal TRL 1.16 GRPOTrainer's on the same batch of completions, through TRL's own code paths."
import copy, os
import pytest, torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
from posttrain_nb import zoo
from posttrain_nb.tasks import ArithTask
from posttrain_nb.train.grpo import (group_advantages, grpo_loss, accuracy_reward, format_reward, rollout,
                                     score_completions, _completion_logprobs, _collate)
from posttrain_nb.data import render_prompt

G, WEIGHTS = 4, [1.0, 0.1]

def make_setup():
    base, tok = zoo.load("base")
    items = ArithTask().sample(3, seed=5, split="train")
    rows = [{"prompt": [{"role": "user", "content": it.prompt}], "answer": it.answer} for it in items]
    texts = [render_prompt(tok, r["prompt"]) for r in rows]
    p_ids, c_ids = rollout(base, tok, texts, n=G, max_new_tokens=40, temperature=1.0, seed=11, backend="generate")
    # make the groups informative whatever the samples were: one gold answer and one garbled one per group
    c_ids[0] = tok(items[0].solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c_ids[G + 1] = tok("Answer: 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return base, tok, items, rows, p_ids, c_ids

def _trainer(base, tok, rows, p_ids, c_ids, tmp_path, **kw):
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig, GRPOTrainer
    def rollout_func(prompts, trainer):  # hand TRL our completions instead of letting it sample
        return {"prompt_ids": [p_ids[i // G] for i in range(len(c_ids))], "completion_ids": c_ids, "logprobs": None}
    args = TRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", num_generations=G,
                     per_device_train_batch_size=len(c_ids), max_completion_length=48, temperature=1.0, bf16=False,
                     reward_weights=WEIGHTS, **kw)
    tr = GRPOTrainer(model=copy.deepcopy(base), processing_class=tok, args=args, reward_funcs=[accuracy_reward, format_reward],
                     train_dataset=Dataset.from_list(rows), rollout_func=rollout_func)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    return tr

def _perturb(model, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(scale * torch.randn(p.shape, generator=g))

@pytest.fixture(scope="module")
def setup(): return make_setup()

@pytest.mark.parametrize("loss_type,scale_rewards,mu,kl_corr", [("dapo", "group", 1, True), ("grpo", "group", 2, True),
                                                                ("bnpo", "none", 2, False), ("dr_grpo", "none", 1, True)])
def test_matches_trl(setup, tmp_path, loss_type, scale_rewards, mu, kl_corr):
    check_case(setup, tmp_path, loss_type, scale_rewards, mu, kl_corr)

def check_case(setup, tmp_path, loss_type, scale_rewards, mu, kl_corr):
    base, tok, items, rows, p_ids, c_ids = setup
    beta, eps = 0.04, 0.2
    tr = _trainer(base, tok, rows, p_ids, c_ids, tmp_path, beta=beta, epsilon=eps, loss_type=loss_type,
                  scale_rewards=scale_rewards, num_iterations=mu, use_bias_correction_kl=kl_corr)
    policy = copy.deepcopy(base)
    _perturb(tr.model, 0, 0.02); _perturb(policy, 0, 0.02)  # policy != reference (= base, loaded by TRL from disk)
    inputs = [rows[i // G] for i in range(len(c_ids))]  # TRL's sampler repeats each prompt G times
    out = tr._generate_and_score_completions(inputs)
    # ours: the same completions, scored by the same reward functions
    rep = [rows[i // G] for i in range(len(c_ids))]
    comps = [[{"role": "assistant", "content": t}] for t in tok.batch_decode(c_ids, skip_special_tokens=True)]
    rewards, _ = score_completions([accuracy_reward, format_reward], [r["prompt"] for r in rep], comps, WEIGHTS,
                                   answer=[r["answer"] for r in rep])
    assert 0 < rewards.std()  # the batch has signal
    adv = group_advantages(rewards, G, scale_by_std=scale_rewards == "group")
    torch.testing.assert_close(adv, out["advantages"].float(), rtol=1e-5, atol=1e-6)
    batch = _collate([{"idx": i, "prompt_ids": p_ids[i // G], "completion_ids": c_ids[i], "advantage": float(adv[i]),
                       "num_items": sum(map(len, c_ids))} for i in range(len(c_ids))], tok.pad_token_id)
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], 1.0)
    with torch.no_grad(): old = _completion_logprobs(policy, *args)[0] if mu > 1 else None
    if mu > 1:  # an optimiser step happened since the rollout: the ratio moves away from 1 and clipping engages
        _perturb(tr.model, 1, 0.02); _perturb(policy, 1, 0.02)
    with torch.no_grad(): ref = _completion_logprobs(base, *args)[0]
    logp, _ = _completion_logprobs(policy, *args)
    ours, met = grpo_loss(logp, old, ref, adv, batch["completion_mask"], beta, eps, None, loss_type, 48, batch["num_items"], kl_corr)
    theirs = tr._compute_loss(tr.model, out)
    torch.testing.assert_close(ours, theirs.float(), rtol=2e-5, atol=2e-6)  # fp32 both sides (TRL's bf16 default off)
    g_ours = torch.autograd.grad(ours, [p for p in policy.parameters()])[-1]
    g_theirs = torch.autograd.grad(theirs, [p for p in tr.model.parameters()])[-1]
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)  # and the same gradient (fp32, |g| ~ 1e-2)
    torch.testing.assert_close(torch.tensor(met["kl"]), torch.tensor(tr._metrics["train"]["kl"][-1]), rtol=1e-4, atol=1e-6)
    assert met["kl"] > 1e-4
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert met[k] == pytest.approx(tr._metrics["train"][k][-1], abs=1e-6)
    if mu > 1: assert met["clip_ratio/region_mean"] > 0  # the clipped branch was exercised
    print(f"ok {loss_type} scale_rewards={scale_rewards} mu={mu}: loss {ours.item():.6f} vs TRL {theirs.item():.6f}", flush=True)

def test_std_epsilon_matches_spec():
    "alignment.md §7: rewards [1,0,0,1] have std 0.57735 and advantages +-0.865875 with TRL's 1e-4."
    a = group_advantages(torch.tensor([1., 0., 0., 1.]), 4)
    torch.testing.assert_close(a, torch.tensor([1., -1., -1., 1.]) * 0.5 / (0.5773503 + 1e-4), rtol=1e-6, atol=1e-7)
    assert a[0].item() == pytest.approx(0.865875, abs=1e-6)
