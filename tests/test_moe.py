"MoE layer: dense equivalence, balancing loss vs transformers and brute force, capacity drops, Mixtral round trip."
import itertools
import pytest, torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from posttrain_nb.train.moe import Expert, MoEMLP, load_balancing_loss, upcycle, to_mixtral, routing_mask, param_counts, moe_blocks

def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()

@pytest.mark.parametrize("k", [1, 2, 3])
def test_identical_experts_equal_dense_for_random_routers(k):
    torch.manual_seed(k)
    dense, x = Expert(16, 24), torch.randn(4, 9, 16)
    for trial in range(3):
        moe = MoEMLP(16, 24, 3, k)                       # a fresh random router each time
        for e in moe.experts: e.load_state_dict(dense.state_dict())
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)

def test_top_k_above_experts_refused():
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"): MoEMLP(8, 8, 2, 3)
    with pytest.raises(ValueError, match="top_k=5"): upcycle(tiny_llama(), num_experts=4, top_k=5)

@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_matches_transformers_with_padding(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(3, 30, 5, generator=g)
    mask = torch.ones(3, 10); mask[0, 7:] = 0; mask[2, 1:] = 0
    pooled = logits.reshape(-1, 5)
    ours = load_balancing_loss(F.softmax(pooled, -1), F.softmax(pooled, -1).topk(k).indices, mask.reshape(-1).repeat(3))
    torch.testing.assert_close(ours, load_balancing_loss_func(tuple(logits), 5, k, attention_mask=mask), rtol=1e-5, atol=1e-6)

def test_aux_loss_minimum_is_uniform_by_brute_force():
    E, k, N = 3, 1, 6
    vals = {}
    for combo in itertools.product(range(E), repeat=N):
        idx = torch.tensor(combo)[:, None]
        vals[combo] = load_balancing_loss(F.one_hot(idx[:, 0], E).float(), idx).item()
    best = min(vals.values())
    assert abs(best - k) < 1e-6
    for c, v in vals.items():
        balanced = torch.bincount(torch.tensor(c), minlength=E).tolist() == [N // E] * E
        assert (abs(v - best) < 1e-6) == balanced

def test_capacity_drops_later_tokens_and_padding_is_not_routed():
    torch.manual_seed(0)
    moe = MoEMLP(8, 8, 2, 1, capacity_factor=1.0)
    with torch.no_grad(): moe.gate.weight.zero_(); moe.gate.weight[0, 0] = 50.0
    x = torch.randn(8, 8).abs() + 0.1                          # x[:, 0] > 0: everyone picks expert 0
    y = moe(x)
    assert moe.capacity(8) == 4 and moe.dropped == 0.5
    torch.testing.assert_close(y[:4], moe.experts[0](x[:4]) * 1.0)
    assert torch.equal(y[4:], torch.zeros(4, 8))
    moe.token_mask = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])   # padding is not routed and does not use capacity
    y = moe(x)
    assert moe.capacity(4) == 2 and moe.dropped == 0.5          # C = ceil(1 * 1 * 4 / 2) over the 4 real tokens
    assert torch.equal(y[:4], torch.zeros(4, 8)) and torch.equal(y[6:], torch.zeros(2, 8))
    torch.testing.assert_close(y[4:6], moe.experts[0](x[4:6]))
    moe.token_mask = None

def test_upcycle_and_mixtral_round_trip(tmp_path):
    m = tiny_llama()
    ids = torch.randint(1, 40, (3, 11)); am = torch.ones_like(ids); am[1, 8:] = 0
    same = upcycle(m, 4, 2, noise=0.0, capacity_factor=None)
    torch.testing.assert_close(same(input_ids=ids, attention_mask=am).logits, m(input_ids=ids, attention_mask=am).logits, rtol=1e-5, atol=1e-5)
    moe = upcycle(m, 4, 2, noise=0.1, capacity_factor=None).eval()
    pc = param_counts(moe)
    assert pc["total"] - pc["active"] == 2 * 2 * 3 * 32 * 48    # 2 layers x 2 idle experts x 3 matrices
    to_mixtral(moe).save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "MixtralForCausalLM" and back.config.rope_parameters["rope_theta"] == m.config.rope_parameters["rope_theta"]
    with routing_mask(moe, am): ours = moe(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=am).logits[keep], ours[keep], rtol=1e-5, atol=1e-5)
