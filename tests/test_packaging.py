"A wheel built from the repository carries the zoo and works from a fresh environment outside the checkout."
import subprocess, sys, sysconfig, zipfile, venv
from pathlib import Path
import pytest
from conftest import ROOT

@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return next(out.glob("posttrain_nb-*.whl"))

def test_wheel_ships_zoo_within_budget(wheel):
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
    for name in ("teacher", "base", "draft"):
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert f"posttrain_nb/zoo_data/{name}/{f}" in infos, f
    zoo_bytes = sum(i.file_size for n, i in infos.items() if "/zoo_data/" in n)
    assert zoo_bytes <= 20 * 2**20, zoo_bytes
    assert not [n for n in infos if n.endswith((".pkl", ".pt", ".bin"))]  # nothing that unpickles

def test_fresh_venv_loads_zoo(wheel, tmp_path):
    # A new venv whose only copy of posttrain_nb is the wheel; torch & co come from the current environment's
    # site-packages, added as a plain path (so that environment's editable install of the checkout stays inactive).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as z: z.extractall(site)
    code = ("import posttrain_nb; from posttrain_nb import zoo; from posttrain_nb.tasks import ArithTask, evaluate;"
            "assert posttrain_nb.__file__.startswith(%r), posttrain_nb.__file__;"
            "m, t = zoo.load('teacher'); r = evaluate(m, t, ArithTask().sample(50)); print(r['accuracy'])" % site)
    # isolated mode, from an unrelated folder, so the checkout cannot be imported by accident
    r = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) >= 0.8
