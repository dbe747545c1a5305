"Structured pruning: exactness against masking (brute force), permutation invariance, refusals, reload, the stage."
import copy, inspect
import pytest, torch
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM

from posttrain_nb.serve.prune import activation_importance, prune, valid_sizes, n_params

def tiny(seed=0, heads=6, kv=2, layers=3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()

def batch(n=6, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, t), generator=g)
    mask = torch.ones_like(ids); mask[0, -4:] = 0; mask[2, -7:] = 0      # right padding
    return {"input_ids": ids, "attention_mask": mask}

def logits(m, b): return m(**b).logits.detach()

def test_nothing_removed_is_identity():
    m, b = tiny(), batch()
    imp = activation_importance(m, b)
    same = prune(m, imp)
    assert torch.equal(logits(same, b), logits(m, b))

def test_heads_and_mlp_equal_masking_and_depth_equals_skipping():
    m, b = tiny(), batch()
    imp = activation_importance(m, b)
    cut = prune(m, imp, intermediate=40, heads=4, layers=2)   # 6 heads in 2 groups of 3 -> 2 per group
    ref = copy.deepcopy(m)
    drop_layer = int(imp.layers.argmin())
    with torch.no_grad():
        for l, layer in enumerate(ref.model.layers):
            layer.mlp.down_proj.weight[:, imp.mlp[l].argsort()[:24]] = 0
            for g in range(2):
                h = g * 3 + int(imp.heads[l].view(2, 3)[g].argmin())
                layer.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
    ref.model.layers = torch.nn.ModuleList([l for i, l in enumerate(ref.model.layers) if i != drop_layer])
    for i, l in enumerate(ref.model.layers): l.self_attn.layer_idx = i
    ref.config.num_hidden_layers = 2
    torch.testing.assert_close(logits(cut, b), logits(ref, b), rtol=1e-5, atol=1e-5)   # float32, logits O(1)

def test_importance_follows_permuted_units():
    m, b = tiny(), batch()
    imp = activation_importance(m, b)
    p = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    pm = copy.deepcopy(m)
    with torch.no_grad():
        for layer in pm.model.layers:
            layer.mlp.gate_proj.weight.copy_(layer.mlp.gate_proj.weight[p]); layer.mlp.up_proj.weight.copy_(layer.mlp.up_proj.weight[p])
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, p])
    imp_p = activation_importance(pm, b)
    for l in range(3): torch.testing.assert_close(imp_p.mlp[l], imp.mlp[l][p], rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("bad,valid", [(dict(heads=5), "2, 4, 6"), (dict(heads=7), "2, 4, 6"), (dict(layers=4), "1, 2, 3")])
def test_refusals_name_valid_sizes(bad, valid):
    m, b = tiny(), batch()
    with pytest.raises(ValueError, match=f"valid sizes: {valid}"): prune(m, activation_importance(m, b), **bad)
    assert valid_sizes(m.config)["heads"] == [2, 4, 6]

def test_reload_through_from_pretrained(tmp_path):
    m, b = tiny(), batch()
    small = prune(m, activation_importance(m, b), hidden=32, intermediate=40, heads=2, layers=2)
    assert n_params(small) < n_params(m)
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is LlamaForCausalLM and back.config.head_dim == 8
    assert torch.equal(logits(back, b), logits(small, b))

def test_prune_stage_registered_without_var_kwargs():
    from posttrain_nb.pipeline import available_stages
    st = available_stages()
    if "prune" not in st:   # the lead adds serve.prune to STAGE_MODULES when merging
        import posttrain_nb.serve.prune  # noqa: F401
        st = available_stages()
    params = inspect.signature(st["prune"].run).parameters.values()
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)
