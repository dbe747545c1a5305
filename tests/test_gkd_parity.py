"Parity of posttrain_nb.train.distill.kd_loss with TRL's GKDTrainer.generalized_jsd_loss (the peer implementation)."
import os
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
gkd = pytest.importorskip("trl.experimental.gkd")
from posttrain_nb.train.distill import kd_loss

trl_loss = gkd.GKDTrainer.generalized_jsd_loss

def _inputs(seed, B=3, T=7, V=13, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.35] = -100   # masked positions, TRL style
    labels[0, 0] = 5                                      # at least one scored position
    return s, t, labels

@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_batchmean_matches_trl(beta, temperature, seed):
    s, t, labels = _inputs(seed)
    ours = kd_loss(s, t, labels != -100, beta=beta, temperature=temperature)
    theirs = trl_loss(s, t, labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-9)

@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_sum_and_unmasked_match_trl(beta):
    s, t, labels = _inputs(7)
    torch.testing.assert_close(kd_loss(s, t, labels != -100, beta=beta, reduction="sum"),
                               trl_loss(s, t, labels, beta=beta, reduction="sum").double(), rtol=1e-6, atol=1e-9)
    # no labels: TRL's batchmean divides the total by the batch size, ours by the number of positions
    B, T = s.shape[:2]
    torch.testing.assert_close(kd_loss(s, t, beta=beta) * T, trl_loss(s, t, None, beta=beta).double(),
                               rtol=1e-6, atol=1e-9)

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_per_position_matches_trl(beta):
    s, t, labels = _inputs(3)
    mask = labels != -100
    ours = kd_loss(s, t, mask, beta=beta, reduction="none")[mask]        # [N] per scored position
    theirs = trl_loss(s, t, labels, beta=beta, reduction="none").sum(-1)  # TRL keeps the vocab axis: [N, V]
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-9)

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradients_match_trl(beta):
    s, t, labels = _inputs(11, scale=1.5)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    kd_loss(s1, t, labels != -100, beta=beta).backward()
    trl_loss(s2, t, labels, beta=beta).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-10)

def test_float32_close_to_trl():
    s, t, labels = _inputs(5)
    s, t = s.float(), t.float()
    for beta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(kd_loss(s, t, labels != -100, beta=beta),
                                   trl_loss(s, t, labels, beta=beta), rtol=1e-5, atol=1e-6)
