"""Zoo integrity and repair (issue 13 item 8): a changed byte, a truncated file, a missing tensor or a changed config
is an error at load time, never random weights; `rebuild` (what `posttrain-zoo --rebuild` runs) verifies and really
repairs; interrupted and killed rebuilds leave neither leftovers nor a mix of old and new models."""
import json, os, shutil, signal, subprocess, sys, threading, time
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file, save_file
from conftest import bin_path
from posttrain_nb import zoo

MINI = zoo.ZooRecipe(teacher_steps=6, draft_steps=3, batch_size=8, n_train=200, base_target=0.0, base_probe=(2, 6),
                     base_probe_every=2, n_val=8, warmup_steps=1)

@pytest.fixture
def shipped(tmp_path):
    "A copy of the shipped zoo (6 MB), safe to damage."
    d = tmp_path / "zoo"; shutil.copytree(zoo.zoo_dir(), d, ignore=shutil.ignore_patterns(".*")); return d

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    "A zoo built by a few-step recipe (seconds, not the real 10 minutes); copy it before damaging it."
    d = tmp_path_factory.mktemp("mini") / "zoo"; zoo.rebuild(d, MINI, log=lambda *a: None); return d

def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*")); return dst

def _rehash(root):
    "Record the current files in the manifest, as a consistent but wrong folder would have them."
    man = json.loads((root / "manifest.json").read_text()); man["files"] = zoo.file_digests(root)
    (root / "manifest.json").write_text(json.dumps(man))

def test_manifest_records_sha256_of_every_file():
    man = json.loads((zoo.zoo_dir() / "manifest.json").read_text())
    for n in zoo.ZOO_NAMES:
        for f in ("config.json", "model.safetensors", "tokenizer.json"): assert len(man["files"][f"{n}/{f}"]) == 64
    assert zoo.verify() == {n: [] for n in zoo.ZOO_NAMES}

def test_random_bytes_inside_weights_are_refused(shipped):
    f = shipped / "draft" / "model.safetensors"
    b = bytearray(f.read_bytes()); b[len(b) // 2: len(b) // 2 + 4096] = os.urandom(4096); f.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="sha256") as e: zoo.load("draft", root=shipped)
    assert "posttrain-zoo --rebuild" in str(e.value)
    zoo.load("teacher", root=shipped)   # the other models still load

def test_truncated_file_is_refused(shipped):
    f = shipped / "base" / "model.safetensors"; f.write_bytes(f.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="changed or truncated"): zoo.load("base", root=shipped)

def test_missing_tensor_is_an_error_not_random_weights(shipped):
    f = shipped / "teacher" / "model.safetensors"
    w = load_file(f); gone = next(k for k in w if "layers.2.mlp" in k); del w[gone]
    save_file(w, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="sha256"): zoo.load("teacher", root=shipped)
    _rehash(shipped)                                   # even with a manifest that agrees, the key check refuses
    with pytest.raises(ValueError, match="missing keys") as e: zoo.load("teacher", root=shipped)
    assert gone in str(e.value)

def test_changed_config_is_an_error(shipped):
    f = shipped / "base" / "config.json"
    cfg = json.loads(f.read_text()); assert cfg["num_hidden_layers"] == 4
    cfg["num_hidden_layers"] = 5; f.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sha256"): zoo.load("base", root=shipped)
    _rehash(shipped)
    with pytest.raises(ValueError, match="missing keys.*layers.4"): zoo.load("base", root=shipped)
    (shipped / "manifest.json").unlink()               # no manifest at all: the key check still refuses
    with pytest.raises(ValueError, match="missing keys"): zoo.load("base", root=shipped)

def test_unexpected_tensor_is_an_error(shipped):
    f = shipped / "draft" / "model.safetensors"
    w = load_file(f); w["model.layers.7.extra.weight"] = torch.zeros(2); save_file(w, f, metadata={"format": "pt"})
    _rehash(shipped)
    with pytest.raises(ValueError, match="unexpected keys"): zoo.load("draft", root=shipped)

def test_rebuild_repairs_what_fails_verification(mini, tmp_path):
    d = _copy(mini, tmp_path / "zoo")
    f = d / "draft" / "model.safetensors"; f.write_bytes(f.read_bytes()[:5000])
    msgs = []
    zoo.rebuild(d, MINI, log=msgs.append)
    assert any("failed verification" in m for m in msgs) and any("rebuilt the zoo" in m for m in msgs), msgs
    assert zoo.verify(d) == {n: [] for n in zoo.ZOO_NAMES}
    a, b = load_file(mini / "draft" / "model.safetensors"), load_file(f)
    assert all(torch.equal(a[k], b[k]) for k in a)     # the recipe is deterministic: the same weights as before
    msgs.clear(); zoo.rebuild(d, MINI, log=msgs.append)
    assert any("nothing to rebuild" in m for m in msgs), msgs

def test_status_command_reports_corruption(shipped):
    f = shipped / "draft" / "model.safetensors"; f.write_bytes(f.read_bytes()[:5000])
    r = subprocess.run([bin_path("posttrain-zoo"), "--out", str(shipped)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    line = next(l for l in r.stdout.splitlines() if l.startswith("draft"))
    assert "FAILED" in line and "truncated" in line and "posttrain-zoo --rebuild" in r.stdout

def test_interrupted_rebuild_leaves_no_leftovers(mini, tmp_path, monkeypatch):
    d = _copy(mini, tmp_path / "zoo")
    before = zoo.file_digests(d)
    real = zoo.train_zoo_model
    def interrupted(tok, layers, steps, data, recipe, probe=None, desc="train"):
        if desc == "draft": raise KeyboardInterrupt
        return real(tok, layers, steps, data, recipe, probe, desc)
    monkeypatch.setattr(zoo, "train_zoo_model", interrupted)
    with pytest.raises(KeyboardInterrupt): zoo.rebuild(d, MINI, force=True, log=lambda *a: None)
    assert not [p.name for p in d.iterdir() if p.name.startswith(".") and p.name != ".rebuild.lock"]
    assert zoo.file_digests(d) == before               # the old zoo is untouched
    monkeypatch.undo()
    # a killed process cannot clean up: its temp folders are removed by the next run
    for junk in (".teacher.tmp-abc", ".base.old-123", ".stage-xyz"): (d / junk).mkdir(); (d / junk / "f").write_text("x")
    zoo.rebuild(d, MINI, log=lambda *a: None)
    assert not [p.name for p in d.iterdir() if p.name.startswith(".") and p.name != ".rebuild.lock"]

def test_killed_force_rebuild_never_mixes_old_and_new(mini, tmp_path, monkeypatch):
    d = _copy(mini, tmp_path / "zoo")
    old_teacher = (d / "teacher" / "model.safetensors").read_bytes()
    other = zoo.ZooRecipe(**{**MINI.__dict__, "seed": 1})  # different weights, so old and new can be told apart
    real_replace, moves = os.replace, []
    def killed_after_first_model(src, dst):
        if Path(src).parent.name.startswith(".stage-") and Path(dst).parent == d:   # a staged model moving in
            if moves: raise SystemExit("killed")       # the process dies after moving the new teacher in
            moves.append(dst)
        return real_replace(src, dst)
    monkeypatch.setattr(zoo.os, "replace", killed_after_first_model)
    with pytest.raises(SystemExit): zoo.rebuild(d, other, force=True, log=lambda *a: None)
    monkeypatch.undo()
    assert (d / "teacher" / "model.safetensors").read_bytes() != old_teacher   # new teacher, old base + manifest
    for n in zoo.ZOO_NAMES:                            # ... which no load accepts
        with pytest.raises(ValueError, match="interrupted rebuild"): zoo.load(n, root=d)
    msgs = []
    man = zoo.rebuild(d, other, log=msgs.append)       # the next run finishes the swap instead of retraining
    assert any("finishing an interrupted rebuild" in m for m in msgs) and man["recipe"]["seed"] == 1
    assert any("nothing to rebuild" in m for m in msgs), msgs
    assert zoo.verify(d) == {n: [] for n in zoo.ZOO_NAMES}
    for n in zoo.ZOO_NAMES: zoo.load(n, root=d)

def test_waiting_on_another_rebuilds_lock_is_announced(shipped):
    from filelock import FileLock
    lock, msgs = FileLock(str(shipped / ".rebuild.lock")), []
    lock.acquire()
    t = threading.Thread(target=lambda: zoo.rebuild(shipped, log=msgs.append)); t.start()
    for _ in range(200):
        if msgs: break
        time.sleep(0.05)
    assert msgs and "waiting for another rebuild" in msgs[0], msgs
    lock.release(); t.join(60)
    assert not t.is_alive() and any("nothing to rebuild" in m for m in msgs), msgs

def test_sigint_during_rebuild_prints_a_clean_message(tmp_path):
    out = tmp_path / "zoo"
    p = subprocess.Popen([bin_path("posttrain-zoo"), "--rebuild", "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         # a runner that started us in the background may have SIGINT ignored, which the child would
                         # inherit (and Python then never raises KeyboardInterrupt): give the child the default
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stdout.readline()                     # 'building the zoo into ...': the rebuild has started
        assert "building the zoo" in line, line + p.stderr.read()
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill(); p.wait()        # a failed check must not leave a rebuild eating the other tests' CPU
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted: the zoo in" in err, err
    assert not [x.name for x in out.iterdir() if x.name.startswith(".") and x.name != ".rebuild.lock"]


_FINALIZER_SIGINT = r'''
import os, signal, sys, time
from posttrain_nb.zoo import interrupts_outside_finalizers
class Finalized:
    def __del__(self):                     # Ctrl-C lands while a finalizer runs (as it did during a CI rebuild)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000): pass         # bytecodes, so the handler runs here, inside __del__
guard = interrupts_outside_finalizers() if sys.argv[1] == "guarded" else __import__("contextlib").nullcontext()
try:
    with guard:
        Finalized()
        time.sleep(3)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
'''

@pytest.mark.parametrize("mode,expected", [("default", "not interrupted"), ("guarded", "interrupted")])
def test_ctrl_c_inside_a_finalizer_still_interrupts_the_rebuild(mode, expected):
    "The default handler's KeyboardInterrupt is swallowed in `__del__`; the rebuild's handler defers it instead."
    r = subprocess.run([sys.executable, "-c", _FINALIZER_SIGINT, mode], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert r.stdout.strip() == expected, r.stdout + r.stderr
    assert ("Exception ignored" in r.stderr) == (mode == "default"), r.stderr
