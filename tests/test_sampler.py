"""The library's one sampler (core.sampling_probs / core.sample_token) against Hugging Face's logits warpers, which
core.generate uses through model.generate: temperature, then top-k, then top-p. The engine and speculative decoding
draw through it; distribution tests use a seeded generator."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from posttrain_nb import core
from posttrain_nb.core import sampling_probs, sample_token, check_sampling


def hf_probs(logits, temperature, top_k, top_p):
    "What HF's sampling path does with these settings (GenerationMixin._get_logits_processor's order)."
    z = logits.clone()
    if temperature != 1.0: z = TemperatureLogitsWarper(temperature)(None, z)
    if top_k: z = TopKLogitsWarper(top_k)(None, z)
    if top_p < 1.0: z = TopPLogitsWarper(top_p)(None, z)
    return z.softmax(-1)


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.5, 0, 0.9), (1.0, 0, 0.5), (2.0, 8, 0.8), (0.3, 3, 0.95),
            (1.0, 1, 1.0), (1.0, 0, 0.01)]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_matches_hf_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 50, generator=g)
    ours, ref = sampling_probs(logits, temperature, top_k, top_p), hf_probs(logits, temperature, top_k, top_p)
    assert torch.equal(ours > 0, ref > 0)  # the same tokens survive the filters
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)  # fp32 softmax of the same masked logits


def test_the_hf_test_separates_warper_orders():
    "A sampler that applied top-p before the temperature would fail the parity test above."
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 50, generator=g)
    z = TopPLogitsWarper(0.9)(None, logits.clone())
    wrong = TemperatureLogitsWarper(0.5)(None, z).softmax(-1)
    assert not torch.equal(wrong > 0, hf_probs(logits, 0.5, 0, 0.9) > 0)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), V=st.integers(2, 40))
def test_matches_hf_on_arbitrary_logits(data, V):
    vals = data.draw(st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=V, max_size=V))
    temperature = data.draw(st.floats(0.05, 5.0))
    top_k = data.draw(st.integers(0, V))
    top_p = data.draw(st.floats(0.01, 1.0))
    logits = torch.tensor([vals])
    ours, ref = sampling_probs(logits, temperature, top_k, top_p), hf_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_greedy_and_draws():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, -1.0, 0.0]])
    assert sample_token(logits, 0.0).tolist() == [1, 0]
    assert sampling_probs(logits, 0.0).tolist() == [[0, 1, 0], [1, 0, 0]]
    p = sampling_probs(torch.tensor([0.0, 1.0, 2.0, 3.0]), 1.0)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    counts = torch.bincount(sample_token(torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(n, 4), 1.0, generator=g), minlength=4)
    sd = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() < 5 * sd).all(), (counts / n, p)  # each frequency within 5 binomial sds
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.randn(8, 30)
    assert torch.equal(sample_token(x, 0.8, 5, 0.9, g1), sample_token(x, 0.8, 5, 0.9, g2))


@pytest.mark.parametrize("t, k, p", [(float("nan"), 0, 1.0), (-1.0, 0, 1.0), (float("inf"), 0, 1.0), (True, 0, 1.0),
                                     (1.0, -1, 1.0), (1.0, 2.5, 1.0), (1.0, 0, 0.0), (1.0, 0, 1.5), (1.0, 0, float("nan"))])
def test_refuses_bad_settings(t, k, p):
    with pytest.raises(ValueError):
        check_sampling(t, k, p)
    with pytest.raises(ValueError):
        sampling_probs(torch.zeros(3), t, k, p)


def test_callers_use_the_one_sampler():
    from posttrain_nb.serve import sampler, speculative
    assert speculative.sampling_probs is core.sampling_probs
    assert sampler.sampling_probs is core.sampling_probs
