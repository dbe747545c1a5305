"posttrain-docs outside an nbdev project names the folder it needs (issue 13 item 11), instead of KeyError: 'index'."
import subprocess
from conftest import bin_path

def test_docs_outside_a_project_says_what_it_needs(tmp_path):
    r = subprocess.run([bin_path("posttrain-docs")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "KeyError" not in r.stderr, r.stderr
    assert "nbs/index.ipynb" in r.stderr and str(tmp_path) in r.stderr and "run it from the project root" in r.stderr

def test_docs_with_a_project_file_but_no_notebooks(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.nbdev]\nlib_name = "x"\nnbs_path = "nbs"\n')
    r = subprocess.run([bin_path("posttrain-docs")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "holds no index.ipynb" in r.stderr, r.stderr
