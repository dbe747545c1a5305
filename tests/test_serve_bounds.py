"""Bad input to the serving kernels and quantizers gives a clear error, never numbers (issue 13 items 3-4, issue 14's
Conv1D finding): block tables that point outside the pool, nibble codes above 15, non-finite weights, a negative
global scale, empty weights, and GPT-2's Conv1D layers, which a quantizer looking for nn.Linear alone skipped."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from posttrain_nb.serve.fp4 import pack_nibbles, quantize_mxfp4, quantize_nvfp4
from posttrain_nb.serve.fp4_kernel import is_fp4
from posttrain_nb.serve.kernels import paged_attention, paged_prefill_attention
from posttrain_nb.serve.quantize import quantize_model


def paged_inputs(lens=(5, 9), H=4, H_kv=2, D=16, bs=4, num_blocks=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(lens), H, D, generator=g)
    k = torch.randn(num_blocks, bs, H_kv, D, generator=g)
    v = torch.randn(num_blocks, bs, H_kv, D, generator=g)
    tables = torch.full((len(lens), 4), -1, dtype=torch.int32)
    nxt = 0
    for s, L in enumerate(lens):
        n = -(-L // bs)
        tables[s, :n] = torch.arange(nxt, nxt + n, dtype=torch.int32); nxt += n
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("row, col, value", [(0, 1, -1), (1, 2, -1), (1, 0, 8), (0, 0, 99)])
def test_wrong_block_table_is_refused(backend, row, col, value):
    q, k, v, bt, cl = paged_inputs()
    good = paged_attention(q, k, v, bt, cl, backend=backend)
    assert torch.isfinite(good).all()
    bad = bt.clone(); bad[row, col] = value  # inside the context: -1 padding, or a block id past the pool of 8
    with pytest.raises(ValueError, match="is not a block of the pool"):
        paged_attention(q, k, v, bad, cl, backend=backend)


def test_prefill_attention_checks_tables_too():
    q, k, v, bt, cl = paged_inputs()
    qp, pos = torch.randn(2, 2, 4, 16), torch.tensor([[3, 4], [7, 8]])
    paged_prefill_attention(qp, pos, k, v, bt, cl, 0.25)
    bad = bt.clone(); bad[1, 1] = 50
    with pytest.raises(ValueError, match="is not a block of the pool"):
        paged_prefill_attention(qp, pos, k, v, bad, cl, 0.25)


def test_padding_past_the_context_is_allowed():
    q, k, v, bt, cl = paged_inputs()
    junk = bt.clone(); junk[0, 2:] = 10**6  # sequence 0 reads blocks 0 and 1 only
    assert torch.equal(paged_attention(q, k, v, junk, cl, backend="torch"), paged_attention(q, k, v, bt, cl, backend="torch"))


def test_pack_nibbles_rejects_codes_above_15():
    assert pack_nibbles(torch.tensor([[15, 1]], dtype=torch.uint8)).tolist() == [[0x1F]]
    with pytest.raises(ValueError, match="4-bit"):
        pack_nibbles(torch.tensor([[16, 1]], dtype=torch.uint8))


@pytest.mark.parametrize("quant", [quantize_nvfp4, quantize_mxfp4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(quant, bad):
    W = torch.randn(4, 64); W[2, 33] = bad
    with pytest.raises(ValueError, match=r"non-finite values .*first at \[2, 33\]"):
        quant(W)


def test_global_scale_and_empty_weights():
    W = torch.randn(4, 32)
    for g in (-0.01, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="global_scale must be one finite number > 0"):
            quantize_nvfp4(W, global_scale=g)
    quantize_nvfp4(W, global_scale=0.01)
    for quant in (quantize_nvfp4, quantize_mxfp4):
        with pytest.raises(ValueError, match="empty"):
            quant(torch.empty(0, 32))
        with pytest.raises(ValueError, match="empty"):
            quant(torch.empty(4, 0))


def test_quantize_model_names_the_non_finite_layer():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32))
    with torch.no_grad(): m.model.layers[1].self_attn.v_proj.weight[0, 5] = float("inf")
    for kw in (dict(), dict(packed=True), dict(fmt="mxfp4", packed=True)):
        with pytest.raises(ValueError, match=r"layer 'model.layers.1.self_attn.v_proj' has 1 non-finite"):
            quantize_model(m, **kw)


def test_gpt2_conv1d_is_quantized_not_skipped():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()
    convs = {n: m.weight.detach().clone() for n, m in gpt2.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(convs) == 8
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad(): ref = gpt2(ids).logits
    for fmt in ("nvfp4", "mxfp4"):
        q = quantize_model(gpt2, fmt=fmt, packed=True)
        assert sorted(n for n, m in q.named_modules() if is_fp4(m)) == sorted(convs)
        for n, W in convs.items():  # each packed weight decodes to the transposed Conv1D weight, within FP4's error
            assert ((q.get_submodule(n).dequantized_weight() - W.T).norm() / W.norm()) < 0.15, n
        fake = quantize_model(gpt2, fmt=fmt)
        with torch.no_grad(): lq, lf = q(ids).logits, fake(ids).logits
        assert torch.equal(lq, lf) and not torch.equal(lq, ref)
        assert ((lq - ref).norm() / ref.norm()) < 0.3
    with pytest.raises(ValueError, match="no linear layer to quantize"):
        quantize_model(nn.Sequential(nn.Embedding(4, 16), nn.LayerNorm(16)))
