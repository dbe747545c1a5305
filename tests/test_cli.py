"Every console command answers --help, and bad input gets an error that names the fix."
import json, subprocess, sys
import pytest
from conftest import bin_path

COMMANDS = ["posttrain-pipeline", "posttrain-zoo", "posttrain-docs", "posttrain-serve"]

def run(*args, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, **kw)

@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd):
    r = run(bin_path(cmd), "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower() and "--" in r.stdout

def test_pipeline_lists_stages():
    r = run(bin_path("posttrain-pipeline"), "--list-stages")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "sft"

def test_pipeline_unknown_stage_lists_valid_ones(tmp_path):
    r = run(bin_path("posttrain-pipeline"), "--stages", "sft,nope", "--out", str(tmp_path))
    assert r.returncode != 0
    assert "unknown stage(s) nope" in r.stderr and "available stages: sft" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started

def test_pipeline_short_run_writes_report(tmp_path):
    r = run(bin_path("posttrain-pipeline"), "--stages", "sft", "--steps", "3", "--n-test", "40", "--out",
            str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| stage | accuracy | tokens/s | wall time |" in r.stdout
    rows = json.loads((tmp_path / "report.json").read_text())
    assert [x["stage"] for x in rows] == ["base", "sft"]
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "| sft |" in (tmp_path / "report.md").read_text()

def test_zoo_shows_shipped_models():
    r = run(bin_path("posttrain-zoo"))
    assert r.returncode == 0, r.stderr
    for name in ("teacher", "base", "draft"):
        line = next(l for l in r.stdout.splitlines() if l.startswith(name))
        assert line.endswith("ok"), line

def test_zoo_missing_checkpoint_names_rebuild(tmp_path):
    code = "from posttrain_nb import zoo; zoo.load('teacher')"
    r = run(sys.executable, "-c", code, env={"POSTTRAIN_ZOO_DIR": str(tmp_path), "PATH": ""})
    assert r.returncode != 0 and "posttrain-zoo --rebuild" in r.stderr


# ---- bad input is refused before any work, naming the flag ----

@pytest.mark.parametrize("args,msg", [(["--steps", "0"], "--steps must be an integer >= 1, got 0"),
                                      (["--steps", "-1"], "--steps must be an integer >= 1, got -1"),
                                      (["--n-test", "0"], "--n-test must be an integer >= 1, got 0"),
                                      (["--stages", ""], "names no stage, so nothing would run"),
                                      (["--stages", " , "], "names no stage, so nothing would run"),
                                      (["--stages", "ppo", "--steps", "3"], "stage 'ppo' has no steps (its options: iterations=12")])
def test_pipeline_refuses_bad_options(tmp_path, args, msg):
    r = run(bin_path("posttrain-pipeline"), *args, "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode != 0 and msg in r.stderr, (r.returncode, r.stderr[-2000:])
    assert not (tmp_path / "run").exists()  # refused before anything was written

def test_pipeline_refuses_a_file_as_out(tmp_path):
    f = tmp_path / "report.txt"; f.write_text("keep me")
    r = run(bin_path("posttrain-pipeline"), "--stages", "sft", "--out", str(f), "--quiet")
    assert r.returncode != 0 and "--out" in r.stderr and "is a file, not a folder" in r.stderr
    assert f.read_text() == "keep me"

def test_two_pipelines_do_not_share_an_out_folder(tmp_path):
    "A folder locked by a live run (this test's own process stands in for it) is refused, and left as it was."
    import os
    (tmp_path / ".pipeline.lock").write_text(f"{os.getpid()}\n")
    r = run(bin_path("posttrain-pipeline"), "--stages", "sft", "--steps", "2", "--n-test", "8", "--out", str(tmp_path), "--quiet")
    assert r.returncode != 0 and f"(pid {os.getpid()}) is writing to" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pipeline.lock"]
