"Bit-exact parity of posttrain_nb.serve.fp4 (MXFP4, NVFP4, E2M1, nibble packing) with torchao 0.18's reference paths."
import sys, warnings
from pathlib import Path

import pytest
import torch

# torchao lives outside the project environment (installed with transformers it logs warnings into every notebook);
# `.ci/run` puts it in .peers/: pip install --target .peers --no-deps torchao==0.18.0
_PEERS = Path(__file__).resolve().parents[1] / ".peers"
if _PEERS.is_dir() and str(_PEERS) not in sys.path: sys.path.append(str(_PEERS))
torchao = pytest.importorskip("torchao")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, nvfp4_quantize, per_tensor_amax_to_scale
    from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4, unpack_uint4

from posttrain_nb.serve.fp4 import (e2m1_encode, pack_nibbles, unpack_nibbles, quantize_mxfp4, dequantize_mxfp4,
                                    quantize_nvfp4, dequantize_nvfp4, nvfp4_global_scale)


def weights(seed, n=8, k=64, kind="randn"):
    "Random weights with edge cases mixed in: zero blocks, exact E2M1 ties, huge and tiny magnitudes."
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if kind == "edges":
        w[0] = 0                                             # an all-zero row: every block's amax is 0
        w[1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2) * torch.tensor([1.0, -1.0]).repeat(8)
        w[2] *= 1e4                                          # huge row
        w[3] *= 1e-30                                        # tiny row (subnormal-ish after scaling)
        w[4, ::3] = -0.0
        w[5, :8] = 6.5                                       # saturation inside a block
    elif kind == "scaled":
        w = w * torch.logspace(-6, 6, k).view(1, k)          # very different block magnitudes in one row
    return w


CASES = [(s, kind) for s in range(5) for kind in ("randn", "edges", "scaled")]


def test_e2m1_encoder_matches_torchao():
    x = torch.cat([torch.linspace(-8, 8, 4001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0, 0.0,
                                                               float("inf"), -float("inf"), 1e-40, -1e-40, 1e30])])
    assert torch.equal(e2m1_encode(x), f32_to_f4_unpacked(x))


def test_packing_matches_torchao():
    c = torch.randint(0, 16, (7, 10), dtype=torch.uint8)
    assert torch.equal(pack_nibbles(c), pack_uint4(c))
    assert torch.equal(unpack_nibbles(pack_uint4(c)), unpack_uint4(pack_uint4(c)))


@pytest.mark.parametrize("seed,kind", CASES)
def test_mxfp4_bit_exact(seed, kind):
    w = weights(seed, kind=kind)
    ref = MXTensor.to_mx(w, torch.float4_e2m1fn_x2, block_size=32)
    q, e = quantize_mxfp4(w)
    assert torch.equal(q, ref.qdata.view(torch.uint8))
    assert torch.equal(e, ref.scale.view(torch.uint8))
    assert torch.equal(dequantize_mxfp4(q, e), ref.dequantize(torch.float32))


@pytest.mark.parametrize("seed,kind", CASES)
def test_nvfp4_bit_exact(seed, kind):
    w = weights(seed, kind=kind)
    g_ao = per_tensor_amax_to_scale(w.abs().amax())
    g = nvfp4_global_scale(w)                     # ours: torchao's g rounded up to a power of two (exact reciprocal)
    assert torch.frexp(g).mantissa == 0.5 and g_ao <= g < 2 * g_ao
    for gs in (g, g_ao):                          # bit-exact with torchao at either global scale
        ref = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=gs, is_swizzled_scales=False)
        q, s8, g2 = quantize_nvfp4(w, None if gs is g else gs)
        assert torch.equal(g2, gs)
        assert torch.equal(q, ref.qdata.view(torch.uint8))
        assert torch.equal(s8.view(torch.uint8), ref.scale.view(torch.uint8))
        assert torch.equal(dequantize_nvfp4(q, s8, g2), ref.dequantize(torch.float32))
        s_ref, q_ref = nvfp4_quantize(w, 16, gs)
        assert torch.equal(q, q_ref.view(torch.uint8)) and torch.equal(s8.view(torch.uint8), s_ref.view(torch.uint8))


def test_bf16_input_matches_torchao():
    w = weights(0).bfloat16()
    ref = MXTensor.to_mx(w, torch.float4_e2m1fn_x2, block_size=32)
    q, e = quantize_mxfp4(w)
    assert torch.equal(q, ref.qdata.view(torch.uint8)) and torch.equal(e, ref.scale.view(torch.uint8))
    g = nvfp4_global_scale(w)
    refn = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=g, is_swizzled_scales=False)
    qn, s8, _ = quantize_nvfp4(w)
    assert torch.equal(qn, refn.qdata.view(torch.uint8)) and torch.equal(s8.view(torch.uint8), refn.scale.view(torch.uint8))


def test_fp4_kernel_module_imports_and_runs_on_cpu():
    "Without CUDA the kernel runs in Triton's interpreter, built at first launch: importing sets no TRITON_INTERPRET for the process."
    import os, subprocess, sys
    if torch.cuda.is_available(): pytest.skip("a CUDA device is present; the interpreter is not used")
    code = ("import torch; from posttrain_nb.serve.fp4 import quantize_nvfp4, dequantize_nvfp4; "
            "from posttrain_nb.serve.fp4_kernel import fp4_matmul; import os; assert 'TRITON_INTERPRET' not in os.environ; "
            "x, W = torch.randn(3, 32), torch.randn(16, 32); q, s, g = quantize_nvfp4(W); "
            "assert torch.allclose(fp4_matmul(x, q, s, g), x @ dequantize_nvfp4(q, s, g).T, rtol=1e-5, atol=1e-5); "
            "assert 'TRITON_INTERPRET' not in os.environ")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
