"QAT: fake-quant forward = quantize-dequantize, clipped-STE backward, early refusals, conversion to FP4Linear is exact."
import inspect
import pytest, torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain_nb.serve.fp4 import fake_quantize, quantize_zeropoint, dequantize_zeropoint
from posttrain_nb.serve.fp4_kernel import FP4Linear
from posttrain_nb.serve.qat import fake_quant, QAT_FORMATS, prepare_qat, convert, qat, QATLinear

def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 128, generator=g) * 0.02
    W[5, 40] = 0.5; W[7, 3] = -0.3                        # outliers
    return W

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_is_quantize_dequantize(seed):
    W = weights(seed)
    for fmt in ("nvfp4", "mxfp4", "int4"): assert torch.equal(fake_quant(W, fmt), fake_quantize(W, fmt))
    for b in (3, 2): assert torch.equal(fake_quant(W, f"int{b}"), dequantize_zeropoint(*quantize_zeropoint(W, b, 64)))

def range_ends(W, fmt):
    "Per weight, the smallest and largest value its group can represent, read off serve.fp4's stored scales."
    from posttrain_nb.serve.fp4 import quantize_nvfp4, quantize_mxfp4, e8m0_to_float
    N, K = W.shape
    if fmt == "nvfp4":
        _, s8, g = quantize_nvfp4(W); top = 6.0 * (g * s8.float()).repeat_interleave(16, 1)
        return -top, top
    if fmt == "mxfp4":
        _, e = quantize_mxfp4(W); top = 6.0 * e8m0_to_float(e).repeat_interleave(32, 1)
        return -top, top
    bits = int(fmt[-1])
    _, s, z = quantize_zeropoint(W, bits, 64)
    s, z = s.float().repeat_interleave(64, 1), z.float().repeat_interleave(64, 1)
    return -s * z, s * (2 ** bits - 1 - z)

@pytest.mark.parametrize("fmt", QAT_FORMATS)
def test_backward_identity_inside_clipping_range(fmt):
    W = weights(3)
    w = W.clone().requires_grad_(True)
    up = torch.randn_like(W)
    fake_quant(w, fmt).backward(up)
    lo, hi = range_ends(W, fmt)
    inside = (W >= lo) & (W <= hi)
    assert torch.equal(w.grad[inside], up[inside])            # exactly the identity
    assert (w.grad[~inside] == 0).all()
    if fmt == "mxfp4": assert (~inside).any()                 # FLOOR scales do saturate some block maxima

def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)).eval()

@pytest.mark.parametrize("fmt", ["int4", "int3", "int2"])
def test_unpackable_format_refused_before_training(fmt):
    called = []
    class Tok:   # a tokenizer that records being used: the refusal must come first
        pad_token_id = 0
        def __getattr__(self, name): called.append(name); raise AssertionError("tokenizer used before the refusal")
    with pytest.raises(ValueError, match=f"{fmt} has no packed kernel"): qat(tiny(), Tok(), [], fmt=fmt)
    assert not called

@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_convert_packs_exactly_what_was_trained(fmt):
    m = prepare_qat(tiny(), fmt)
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.01 * torch.randn_like(p))   # "trained" latent weights
    served = convert(m)
    assert not any(isinstance(x, QATLinear) for x in served.modules())
    assert sum(isinstance(x, FP4Linear) for x in served.modules()) == 7
    for (n, a), b in zip([(n, x) for n, x in m.named_modules() if isinstance(x, QATLinear)],
                         [x for x in served.modules() if isinstance(x, FP4Linear)]):
        assert torch.equal(b.dequantized_weight(), fake_quant(a.weight.detach(), fmt)), n
    ids = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(served(input_ids=ids).logits, m(input_ids=ids).logits, rtol=1e-6, atol=1e-6)

def test_qat_stage_has_no_var_kwargs():
    from posttrain_nb.pipeline import available_stages
    import posttrain_nb.serve.qat  # noqa: F401  (registers the stage until the lead lists it in STAGE_MODULES)
    run = available_stages()["qat"].run
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in inspect.signature(run).parameters.values())
