"""FP4 checkpoints: save_pretrained after quantize_model writes compressed-tensors nvfp4/mxfp4-pack-quantized, which the
compressed-tensors package decodes to our weights bit for bit; load_quantized (and transformers) read it back with
identical logits; what cannot be written is refused at save time, and a load that would leave weights random raises."""
import json, os, warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

from posttrain_nb.serve.quantize import CT_FORMATS, ct_scheme, load_quantized, quantize_model


def tiny(tied=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


X = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(m): return m(X).logits


def fp4_layers(m):
    "{name: float32 weight our code decodes} for every quantized linear (fake-quantized or FP4Linear)."
    out = {}
    for n, mod in m.named_modules():
        if hasattr(mod, "fp4_codes"): out[n] = mod.weight.detach().float()
        elif type(mod).__name__ == "FP4Linear": out[n] = mod.dequantized_weight()
    return out


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("packed", [False, True])
def test_compressed_tensors_decodes_our_weights_bit_for_bit(tmp_path, fmt, packed):
    q = quantize_model(tiny(), "rtn", fmt, packed=packed)
    q.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == CT_FORMATS[fmt]
    assert cfg["quantization_status"] == "compressed" and cfg["ignore"] == ["lm_head"]
    t = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert not any(k.endswith((".qdata", ".scales")) for k in t)
    ours = fp4_layers(q)
    assert len(ours) == 14
    comp = BaseCompressor.get_value_from_registry(CT_FORMATS[fmt])
    for n, w in ours.items():
        local = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.rsplit(".", 1)[0] == n}
        assert set(local) == ({"weight_packed", "weight_scale", "weight_global_scale"} if fmt == "nvfp4" else {"weight_packed", "weight_scale"})
        assert local["weight_packed"].dtype == torch.uint8 and local["weight_packed"].shape == (w.shape[0], w.shape[1] // 2)
        assert local["weight_scale"].dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
        dec = comp.decompress(local, ct_scheme(fmt))["weight"]      # compressed-tensors' own decoder (bf16 output)
        # power-of-two g makes every NVFP4/MXFP4 weight exact in bf16, so bf16 equality is full equality
        assert torch.equal(dec.float(), w), n
        if fmt == "nvfp4": assert (torch.frexp(local["weight_global_scale"]).mantissa == 0.5).all()   # G = 1/g exact


def test_compressed_tensors_quantizer_gives_our_codes(tmp_path):
    "Quantizing with compressed-tensors' own compressor from the original weight and our scales reproduces our bytes."
    m = tiny(); q = quantize_model(m, "rtn", "nvfp4")
    q.save_pretrained(tmp_path / "ck")
    t = load_file(str(tmp_path / "ck" / "model.safetensors"))
    comp = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        W = m.get_submodule(n).weight.detach()
        s, G = t[f"{n}.weight_scale"], t[f"{n}.weight_global_scale"]
        out = comp.compress({"weight": W, "weight_scale": s.float(), "weight_global_scale": G}, ct_scheme("nvfp4"))
        assert torch.equal(out["weight_packed"], t[f"{n}.weight_packed"]), n
        assert torch.equal(out["weight_scale"].view(torch.uint8), s.view(torch.uint8))


@pytest.mark.parametrize("fmt,tied", [("nvfp4", True), ("mxfp4", False)])
def test_load_quantized_identical_logits(tmp_path, fmt, tied):
    m = tiny(tied)
    q = quantize_model(m, "rtn", fmt)
    q.save_pretrained(tmp_path / "ck")
    r = load_quantized(tmp_path / "ck")
    assert torch.equal(logits(r), logits(q))
    assert sum(type(x).__name__ == "FP4Linear" for x in r.modules()) == 14
    assert (r.lm_head.weight.data_ptr() == r.model.embed_tokens.weight.data_ptr()) == tied
    r.save_pretrained(tmp_path / "again")           # a loaded model saves the same tensors again
    a, b = load_file(str(tmp_path / "ck" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                                                    b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)


def test_transformers_from_pretrained(tmp_path):
    "transformers' compressed-tensors integration: a bf16 model loads as is; an fp32 one with dequantize=True."
    q16 = quantize_model(tiny(dtype=torch.bfloat16), "rtn", "nvfp4")
    q16.save_pretrained(tmp_path / "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h16, info = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        assert torch.equal(logits(h16), logits(q16))
        q32 = quantize_model(tiny(), "rtn", "nvfp4")
        q32.save_pretrained(tmp_path / "fp32")
        h32 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=CompressedTensorsConfig(dequantize=True))
    assert torch.equal(logits(h32), logits(q32))


def test_unwritable_formats_refused_at_save(tmp_path):
    m = tiny()
    for q, words in [(quantize_model(m, "rtn", "int4"), ("'int4'", "dequantized=True")),
                     (quantize_model(m, "rtn", "nf4"), ("'nf4'", "nvfp4")),
                     (quantize_model(m, "w8a8"), ("W8A8Linear", "method='rtn'"))]:
        with pytest.raises(ValueError) as e: q.save_pretrained(tmp_path / "ck")
        assert all(w in str(e.value) for w in words), str(e.value)
        assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())    # nothing half-written left behind
    q = quantize_model(m, "rtn", "nvfp4")
    with pytest.raises(ValueError, match="safetensors only"): q.save_pretrained(tmp_path / "ck", safe_serialization=False)
    with torch.no_grad(): q.model.layers[0].mlp.up_proj.weight.mul_(1.01)   # trained after quantization: off the grid
    with pytest.raises(ValueError, match="no longer the nvfp4 value"): q.save_pretrained(tmp_path / "ck")
    # the explicit escape hatch: a plain float checkpoint that reloads to the same fake-quantized model
    q4 = quantize_model(m, "rtn", "int4")
    q4.save_pretrained(tmp_path / "plain", dequantized=True)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")), logits(q4))


def test_load_that_would_leave_random_weights_raises(tmp_path):
    q = quantize_model(tiny(), "rtn", "nvfp4")
    q.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(str(f))
    save_file({k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight_scale"}, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 weights missing.*up_proj.scales"): load_quantized(tmp_path / "ck")
    save_file({**t, "model.layers.9.extra": torch.zeros(1)}, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 unexpected.*layers.9.extra"): load_quantized(tmp_path / "ck")
    # a folder with FP4Linear buffers (a plain save of a packed model, the old bug) is named as such
    save_file({"model.layers.0.mlp.up_proj.qdata": torch.zeros(2, 2, dtype=torch.uint8)}, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="plain save of a packed model"): load_quantized(tmp_path / "ck")


def test_save_is_atomic_and_keeps_other_files(tmp_path):
    d = tmp_path / "ck"; d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    q = quantize_model(tiny(), "rtn", "nvfp4")
    q.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]      # no temp folder left
    assert torch.equal(logits(load_quantized(d)), logits(q))


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    q = quantize_model(tiny(), "rtn", "nvfp4")
    q.save_pretrained(d)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    import safetensors.torch
    def boom(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"): quantize_model(tiny(seed=1), "rtn", "nvfp4").save_pretrained(d)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_requantizing_drops_stale_codes(tmp_path):
    "An NVFP4 model quantized again to INT4 must not be saved with the NVFP4 codes it no longer holds."
    q = quantize_model(quantize_model(tiny(), "rtn", "nvfp4"), "rtn", "int4")
    assert not any(hasattr(m, "fp4_codes") for m in q.modules())
    with pytest.raises(ValueError, match="'int4'"): q.save_pretrained(tmp_path / "ck")


def test_engine_serves_an_fp4_folder(tmp_path):
    "LLM(folder) on a compressed-tensors checkpoint loads FP4Linear layers (not bf16-decompressed ones), as LLM(model) does."
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from posttrain_nb.serve.engine import LLM, SamplingParams
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w1", eos_token="w2")
    quantize_model(tiny(), method="rtn", fmt="nvfp4").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts, p = [[5, 7, 9, 11], [3, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    served = LLM(str(tmp_path))
    assert any(type(m).__name__ == "FP4Linear" for m in served.model.modules())
    ours = [o.outputs[0].token_ids for o in served.generate(prompts, p, use_tqdm=False)]
    ref = [o.outputs[0].token_ids for o in LLM(load_quantized(tmp_path), tok).generate(prompts, p, use_tqdm=False)]
    assert ours == ref and all(len(t) == 8 for t in ours)
    with pytest.raises(ValueError, match="leave dtype unset"): LLM(str(tmp_path), dtype="bfloat16")
