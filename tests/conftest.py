import os, sys, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def bin_path(name):
    "A console script from the same environment as the running python."
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else shutil.which(name)

@pytest.fixture
def cli():
    return bin_path


@pytest.fixture(scope="session")
def tiny_llama():
    "A factory: a random 2-layer Llama sized to a tokenizer (fast, deterministic, untrained), for tests of plumbing."
    def make(tok, seed=0):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return LlamaForCausalLM(cfg).eval()
    return make
