"The shared training loop: accumulation normalisation, config validation, divergence stops and honest resume."
import copy, math
import pytest, torch
from transformers import LlamaConfig, LlamaForCausalLM
from posttrain_nb.core import (TrainConfig, train_loop, masked_lm_loss, set_seed, add_lora, load_safetensors,
                               save_safetensors_atomic, masked_mean, masked_whiten)

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.lin = torch.nn.Linear(4, 1)
    def forward(self, x): return self.lin(x)

def toy_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed); X = torch.randn(n, 4, generator=g)
    return [(x, x @ torch.tensor([1., -2., 3., .5])) for x in X]

def toy_collate(ex): return {"x": torch.stack([e[0] for e in ex]), "y": torch.stack([e[1] for e in ex])}
def toy_loss(model, b): return ((model(b["x"]).squeeze(-1) - b["y"]) ** 2).mean()

# ---- gradient accumulation: what the loss normalisation really does ----

def tiny_lm():
    set_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)

def ragged_rows():
    "8 rows whose response lengths differ a lot (1 to 15 tokens), so micro-batch token counts differ."
    g = torch.Generator().manual_seed(3); rows = []
    for i, n in enumerate([1, 15, 2, 12, 3, 1, 9, 14]):
        ids = torch.randint(1, 40, (4 + n,), generator=g)
        rows.append((ids, n))
    return rows

def lm_collate(rows):
    T = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long); am = torch.zeros_like(ids); rm = torch.zeros_like(ids)
    for i, (r, n) in enumerate(rows):
        ids[i, :len(r)] = r; am[i, :len(r)] = 1; rm[i, len(r) - n:len(r)] = 1
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm}

def n_tokens(b): return (b["response_mask"] * b["attention_mask"]).sum()

def first_step(grad_accum, count_fn):
    "The logged loss and global gradient norm of one step (lr 0, so nothing moves) over the same 8 rows."
    rows = ragged_rows()  # callable data keeps this order (a sequence would be shuffled)
    res = train_loop(tiny_lm(), masked_lm_loss, lambda step: rows, TrainConfig(steps=1, batch_size=8, grad_accum=grad_accum,
                     lr=0.0, max_grad_norm=None), collate=lm_collate, count_fn=count_fn, progress=False)
    return res.history[0]["loss"], res.history[0]["grad_norm"]

def test_accumulation_with_count_fn_is_the_global_token_mean():
    # brute force: one backward pass of the token mean over all 8 rows
    m = tiny_lm(); loss = masked_lm_loss(m, lm_collate(ragged_rows())); loss.backward()
    gn = math.sqrt(sum(float((p.grad ** 2).sum()) for p in m.parameters() if p.grad is not None))
    # float32 log-probs (core upcasts logits to float32): the per-token terms are ~4, and summing ~60 of them in a
    # different grouping moves the result by a few ulp (~1e-7 relative); 2e-6 is 10x that, and 500x below the
    # 1e-3 gap that equal micro-batch weighting leaves (next test)
    for accum in (1, 2, 4):
        l, g = first_step(accum, n_tokens)
        assert l == pytest.approx(loss.item(), rel=2e-6) and g == pytest.approx(gn, rel=2e-6), accum

def test_accumulation_without_count_fn_is_a_mean_of_micro_means():
    "The default weighs micro-batches equally: exact for per-example means, not for token means (as documented)."
    l1, g1 = first_step(1, None); l2, g2 = first_step(2, None)
    rows = ragged_rows(); m = tiny_lm()
    # the loop hands process 0 the examples in order and splits them into consecutive micro-batches
    with torch.no_grad():
        a = masked_lm_loss(m, lm_collate(rows[:4])); b = masked_lm_loss(m, lm_collate(rows[4:]))
    assert l2 == pytest.approx((a.item() + b.item()) / 2, rel=2e-6)
    assert abs(l2 - l1) > 1e-4 * l1 and abs(g2 - g1) > 1e-4 * g1  # a real difference, 1000x float32 rounding

def test_accumulation_exact_for_example_means():
    set_seed(0); t1 = Toy(); set_seed(0); t2 = Toy()
    r1 = train_loop(t1, toy_loss, toy_data(), TrainConfig(steps=1, batch_size=16, lr=0.0), collate=toy_collate, progress=False)
    r2 = train_loop(t2, toy_loss, toy_data(), TrainConfig(steps=1, batch_size=16, grad_accum=4, lr=0.0),
                    collate=toy_collate, progress=False)
    # float32: the two sums differ only in the order of 16 terms of size ~10, so ~1e-6 relative
    assert r1.history[0]["loss"] == pytest.approx(r2.history[0]["loss"], rel=1e-5)
    assert r1.history[0]["grad_norm"] == pytest.approx(r2.history[0]["grad_norm"], rel=1e-5)

# ---- validation at the boundary ----

@pytest.mark.parametrize("kw,field", [({"steps": 0}, "steps"), ({"steps": -5}, "steps"), ({"batch_size": 0}, "batch_size"),
                                      ({"grad_accum": 0}, "grad_accum"), ({"lr": float("nan")}, "lr"),
                                      ({"warmup_steps": -1}, "warmup_steps"), ({"steps": 2.5}, "steps"),
                                      ({"max_grad_norm": 0}, "max_grad_norm"), ({"schedule": "cosin"}, "schedule"),
                                      ({"min_lr_ratio": 2.0}, "min_lr_ratio"), ({"save_every": -1}, "save_every")])
def test_config_validates_itself(kw, field):
    with pytest.raises(ValueError, match=field): TrainConfig(**kw)

# ---- divergence ----

def test_nonfinite_gradient_stops_before_the_update(tmp_path):
    def loss_fn(model, b):  # finite value (0), NaN gradient: d sqrt(u)/du is inf at u = 0, times du/dw = 0
        w = model.lin.weight.sum()
        return torch.sqrt((w - w.detach()) ** 2) + 0 * toy_loss(model, b)
    set_seed(0); t = Toy(); before = t.lin.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="gradient norm is nan"):
        train_loop(t, loss_fn, toy_data(), TrainConfig(steps=3, batch_size=4), collate=toy_collate, out_dir=tmp_path,
                   progress=False)
    assert torch.equal(t.lin.weight, before) and (tmp_path / "nan_batch.safetensors").exists()

def test_nonfinite_parameters_stop():
    "A finite loss and gradient whose update overflows float32: the parameter is already near its largest value."
    class Big(torch.nn.Module):
        def __init__(self): super().__init__(); self.p = torch.nn.Parameter(torch.tensor(3.3e38))
    with pytest.raises(FloatingPointError, match="parameters became non-finite in optimiser step 1"):
        train_loop(Big(), lambda m, b: -m.p, toy_data(), TrainConfig(steps=3, batch_size=4, lr=3e37, max_grad_norm=None),
                   progress=False)

def test_zero_gradient_with_nonzero_loss_stops():
    "A dead ReLU: after an update that pushed its bias far down, the output is 0, the loss is not, the gradient is 0."
    class Dead(Toy):
        def forward(self, x): return torch.relu(self.lin(x))
    set_seed(0); m = Dead()
    with torch.no_grad(): m.lin.bias.fill_(-1e6)
    with pytest.raises(FloatingPointError, match="exactly 0 for 3 steps") as e:
        train_loop(m, toy_loss, toy_data(), TrainConfig(steps=10, batch_size=4), collate=toy_collate, progress=False)
    assert "lower the lr" in str(e.value)

# ---- honest resume ----

def run(tmp_path, cfg=None, data=None, model=None, **kw):
    set_seed(0)
    return train_loop(model or Toy(), toy_loss, data or toy_data(), cfg or TrainConfig(steps=6, batch_size=4, lr=0.05),
                      collate=toy_collate, out_dir=tmp_path, progress=False, **kw)

def test_finished_run_with_other_data_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="data: different examples") as e: run(tmp_path, data=toy_data(seed=1))
    assert "resume=False" in str(e.value) and "another out_dir" in str(e.value)

def test_changed_config_is_refused_and_named(tmp_path):
    run(tmp_path, stop_after=2)
    with pytest.raises(ValueError, match=r"config lr: 0.05 in the checkpoint, 0.001 now"):
        run(tmp_path, cfg=TrainConfig(steps=6, batch_size=4, lr=0.001))
    with pytest.raises(ValueError, match=r"config steps: 6 in the checkpoint, 8 now"):
        run(tmp_path, cfg=TrainConfig(steps=8, batch_size=4, lr=0.05))

def test_same_run_resumes_and_harmless_changes_are_allowed(tmp_path, capsys):
    full = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=2)
    res = run(tmp_path / "b", cfg=TrainConfig(steps=6, batch_size=4, lr=0.05, eval_every=3))
    assert res.resumed_from == 2 and [h["loss"] for h in res.history] == [h["loss"] for h in full.history]
    again = run(tmp_path / "b")
    assert again.resumed_from == 6 and "finished at step 6" in capsys.readouterr().out
    fresh = run(tmp_path / "b", data=toy_data(seed=1), resume=False)   # the documented way to start over
    assert fresh.resumed_from == 0

def test_changed_lora_rank_is_named(tmp_path):
    data = ragged_rows()
    def go(r):
        m = add_lora(tiny_lm().float(), r=r)
        return train_loop(m, masked_lm_loss, data, TrainConfig(steps=2, batch_size=4), collate=lm_collate,
                          out_dir=tmp_path, progress=False)
    go(4)
    with pytest.raises(ValueError, match="a different LoRA rank"): go(8)

def test_checkpoint_without_fingerprint_is_refused(tmp_path):
    run(tmp_path, stop_after=2)
    t, meta = load_safetensors(tmp_path / "checkpoint.safetensors")
    del meta["data_fingerprint"]; save_safetensors_atomic(t, tmp_path / "checkpoint.safetensors", meta)
    with pytest.raises(ValueError, match="without a fingerprint"): run(tmp_path)

# ---- masked statistics ----

def test_masked_mean_and_whiten_match_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64); m = (torch.rand(3, 5, generator=g) > 0.4).double()
    vals = x[m.bool()]
    assert masked_mean(x, m).item() == pytest.approx(vals.mean().item(), rel=1e-12)
    row = masked_mean(x, m, dim=-1)
    for i in range(3):
        sel = x[i][m[i].bool()]
        assert row[i].item() == pytest.approx(sel.mean().item() if len(sel) else 0.0, abs=1e-12)
    w = masked_whiten(x, m, eps=0.0)
    assert w[m.bool()].mean().item() == pytest.approx(0, abs=1e-12)
    assert w[m.bool()].var(unbiased=False).item() == pytest.approx(1, rel=1e-12)
    assert (w[~m.bool()] == 0).all()
    ws = masked_whiten(x, m, eps=0.0, shift_mean=False)
    assert torch.allclose(ws[m.bool()], vals / vals.std(unbiased=False), rtol=1e-12)

def test_dpo_at_a_huge_lr_stops(tmp_path, monkeypatch):
    "Issue 13's case: DPO at lr=1e10 used to return normally with a ruined model; now the run stops and says why."
    from posttrain_nb import zoo
    from posttrain_nb.tasks import ArithTask
    from posttrain_nb.train.dpo import train_dpo
    monkeypatch.chdir(tmp_path)  # without out_dir the bad batch is saved in the working directory
    items = ArithTask().sample(32, seed=7, split="train")
    rows = [{"prompt": it.prompt, "chosen": it.solution,
             "rejected": it.solution.replace(f"Answer: {it.answer}", f"Answer: {it.answer + 3}")} for it in items]
    model, tok = zoo.load("base")
    with pytest.raises(FloatingPointError, match="Lower the lr"):
        train_dpo(model, tok, rows, TrainConfig(steps=30, batch_size=16, lr=1e10), progress=False)
