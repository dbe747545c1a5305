"""Stored outputs must come from the code shown: every code cell carries the hash of the source that produced its
outputs (tools/run_notebooks.py writes it), and a cell edited since its last execution fails here."""
import importlib.util, sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_notebooks)

CHAPTERS = sorted((ROOT / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.name)
def test_stored_outputs_match_source(nb):
    stale = run_notebooks.stale_cells(nb)
    assert not stale, (f"{nb.name}: {len(stale)} cell(s) stale, e.g. cell {stale[0][0]}: {stale[0][1]}; "
                       f"re-execute with: python tools/run_notebooks.py nbs/{nb.name}")


def test_check_fails_on_stale_cell_and_passes_after_execution(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "python3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 6 * 7\nprint(x)"),
                nbformat.v4.new_code_cell("#| slow\nprint('slow')")]
    path = tmp_path / "t.ipynb"; nbformat.write(nb, str(path))
    assert [i for i, _ in run_notebooks.stale_cells(path)] == [1, 2]        # never executed
    run_notebooks.execute(path, slow=True)
    done = nbformat.read(str(path), as_version=4)
    assert done.cells[1].outputs[0]["text"] == "42\n"
    assert run_notebooks.stale_cells(path) == []                              # freshly executed: clean
    done.cells[1].source = "x = 6 * 8\nprint(x)"                              # edit without re-running
    nbformat.write(done, str(path))
    assert [i for i, _ in run_notebooks.stale_cells(path)] == [1]
    run_notebooks.execute(path)                                               # plain re-run: slow cell keeps its stamp
    again = nbformat.read(str(path), as_version=4)
    assert again.cells[1].outputs[0]["text"] == "48\n" and again.cells[2].outputs[0]["text"] == "slow\n"
    assert run_notebooks.stale_cells(path) == []
    again.cells[2].source = "#| slow\nprint('slower')"                        # a slow cell edited: stale until --slow
    nbformat.write(again, str(path)); run_notebooks.execute(path)
    assert [i for i, _ in run_notebooks.stale_cells(path)] == [2]
    assert run_notebooks.main(["--check", str(path)]) == 1
