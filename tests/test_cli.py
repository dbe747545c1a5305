"Every console command answers --help, and bad input gets an error that names the fix."
import json, subprocess, sys
import pytest
from conftest import bin_path

COMMANDS = ["posttrain-pipeline", "posttrain-zoo", "posttrain-docs"]

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
