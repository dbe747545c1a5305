#!/usr/bin/env python
"""Execute chapters in place, stamping every code cell with the hash of the source that produced its stored outputs.

    python tools/run_notebooks.py nbs/22_dpo.ipynb            # re-execute one chapter (slow cells keep their outputs)
    python tools/run_notebooks.py --slow nbs/11_distill.ipynb # also re-run the `#| slow` cells
    python tools/run_notebooks.py --check nbs/*.ipynb         # list cells whose outputs are older than their source

The stamp lives in the cell's metadata as `source_sha` (kept by nbdev-clean through `allowed_cell_metadata_keys` in
pyproject.toml). `tests/test_stale_outputs.py` fails when a cell's source no longer matches its stamp, so a chapter
whose code changed without being re-executed cannot land with outputs (and prose numbers) from the old code.
"""
import argparse, hashlib, json, os, re, subprocess, sys, time
from pathlib import Path

KEY = "source_sha"


def source_sha(source: str) -> str:
    "Hash of a cell's source, ignoring leading/trailing whitespace."
    return hashlib.sha256(source.strip().encode()).hexdigest()[:16]


def _is_slow(source: str) -> bool:
    "A cell marked `#| slow`: it runs only on request, so a plain re-execution keeps its stored outputs."
    return any(re.match(r"#\|\s*slow\b", l.strip()) for l in source.splitlines())


def stale_cells(path) -> list:
    "Code cells of the notebook at `path` whose stored outputs were not produced by their current source: [(index, why)]."
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    out = []
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code" or not c.source.strip(): continue
        got = c.get("metadata", {}).get(KEY)
        if got is None: out.append((i, "never executed by tools/run_notebooks.py (no source_sha stamp)"))
        elif got != source_sha(c.source): out.append((i, "source changed since its outputs were produced"))
    return out


WIDGET_MIME = "application/vnd.jupyter.widget-state+json"


def _keep_widget_state(nb, old_state: dict, cells: list):
    "Cells that were not re-run keep their outputs, so they keep the widget models those outputs display."
    todo = [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for c in cells for o in c.get("outputs", [])
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    keep = {}
    while todo:                                   # a widget's children and layout are models of their own
        m = todo.pop()
        if m in keep or m not in old_state: continue
        keep[m] = old_state[m]
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(old_state[m]))
    if not keep: return
    state = nb.metadata.setdefault("widgets", {}).setdefault(WIDGET_MIME, {"version_major": 2, "version_minor": 0,
                                                                           "state": {}})
    state.setdefault("state", {}).update(keep)


def execute(path, slow: bool = False, timeout: int = 1200) -> float:
    "Run the notebook at `path` top to bottom in a fresh kernel, stamp each executed cell, write it back cleaned."
    import nbformat
    from nbclient import NotebookClient
    path = Path(path).resolve()
    nb = nbformat.read(str(path), as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False, store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    old_state = nb.metadata.get("widgets", {}).get(WIDGET_MIME, {}).get("state", {})
    t0, kept = time.perf_counter(), []
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code": continue
            if _is_slow(cell.source) and not slow: kept.append(cell); continue   # keeps its outputs and its stamp
            client.execute_cell(cell, i)
            cell.metadata[KEY] = source_sha(cell.source)
        client.set_widgets_metadata()
    _keep_widget_state(nb, old_state, kept)
    secs = time.perf_counter() - t0
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp)); os.replace(tmp, path)
    subprocess.run([str(Path(sys.executable).parent / "nbdev-clean"), "--fname", str(path)], check=True)
    return secs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("notebooks", nargs="+", help="notebook files to execute (or check)")
    p.add_argument("--slow", action="store_true", help="also execute cells marked `#| slow`")
    p.add_argument("--check", action="store_true", help="only list stale cells; exit 1 if there are any")
    p.add_argument("--timeout", type=int, default=1200, help="seconds allowed per cell (default 1200)")
    a = p.parse_args(argv)
    bad = 0
    for nb in a.notebooks:
        if a.check:
            for i, why in stale_cells(nb):
                print(f"{nb}: cell {i}: {why}"); bad += 1
        else:
            print(f"{nb}: executed in {execute(nb, a.slow, a.timeout):.0f} s", flush=True)
    if a.check and bad: print(f"{bad} stale cell(s): re-execute with python tools/run_notebooks.py NOTEBOOK"); return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
