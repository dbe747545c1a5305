"""The C decode kernel is built once per machine and kept: a later process loads it without compiling, a changed source
or a damaged file gets a fresh build, and a cache directory that others can write to is never used.

Each case runs in a fresh interpreter, because a process keeps the kernel it loaded."""
import os, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from posttrain_nb.serve import kernels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and torch.backends.cpu.get_cpu_capability() == "AVX512" and kernels.cpp_compiler()),
    reason="the C kernel needs Linux, an AVX-512 CPU and a C compiler")

CHECK = """
import subprocess, sys, warnings
import torch
from posttrain_nb.serve import kernels
from posttrain_nb.serve.kernels import paged_decode_cpu
{setup}
warnings.simplefilter("error")  # a build that fails would warn and fall back to torch: make that loud
assert kernels.cpu_kernel() is not None
q, k = torch.randn(2, 4, 32), torch.randn(2, 5, 16, 32)  # 2 KV heads, 5 blocks, head dim 32
tables, ctx = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32), torch.tensor([20, 7], dtype=torch.int32)
out = paged_decode_cpu(q, k, k.clone(), tables, ctx, 0.25)
ref = kernels.paged_attention(q, k, k.clone(), tables, ctx, 0.25, backend="torch", kv_layout="HND")
assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
print("ok")
"""


def run(cache, setup=""):
    env = {**os.environ, "POSTTRAIN_NB_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHECK.format(setup=textwrap.dedent(setup))], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


NO_COMPILER = """
def refuse(*a, **k): raise AssertionError(f"compiled although a build was kept: {a}")
subprocess.run = refuse
"""


def test_a_later_process_loads_the_kept_build_without_compiling(tmp_path):
    run(tmp_path)
    kept = list(tmp_path.glob("paged_decode_*.so"))
    assert len(kept) == 1 and kept[0].read_bytes()[:4] == b"\x7fELF"
    run(tmp_path, NO_COMPILER)  # a second process: no compiler call, same numbers
    assert list(tmp_path.glob("paged_decode_*.so")) == kept
    assert not [p for p in tmp_path.iterdir() if p not in kept], "a temporary file was left behind"


def test_a_changed_source_is_built_again_not_served_from_the_cache(tmp_path):
    run(tmp_path)
    run(tmp_path, 'kernels.PAGED_DECODE_C += "\\n// a changed kernel\\n"')
    assert len(list(tmp_path.glob("paged_decode_*.so"))) == 2


def test_a_damaged_build_is_replaced(tmp_path):
    run(tmp_path)
    (kept,) = tmp_path.glob("paged_decode_*.so")
    kept.write_bytes(b"not a library")
    run(tmp_path)
    assert kept.read_bytes()[:4] == b"\x7fELF"


def test_a_directory_others_can_write_is_not_used(tmp_path, monkeypatch):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv("POSTTRAIN_NB_CACHE", str(d))
    assert kernels.kernel_cache_dir() is None
    d.chmod(0o700)
    assert kernels.kernel_cache_dir() == d
    run(d.parent / "fresh")  # created on first use, only for this user
    assert (d.parent / "fresh").stat().st_mode & 0o777 == 0o700


def test_no_home_directory_means_no_cache_not_a_crash(monkeypatch):
    def no_home(): raise RuntimeError("Could not determine home directory.")
    for v in ("POSTTRAIN_NB_CACHE", "XDG_CACHE_HOME"): monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(kernels.Path, "home", staticmethod(no_home))
    assert kernels.kernel_cache_dir() is None
