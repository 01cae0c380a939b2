"""Execute every notebook in notebooks/ top to bottom; any cell error fails the test.

The notebooks run with ``MEDJAX_NOTEBOOK_SMOKE=1``: those that train take a few steps instead of
tens (every cell still runs; the committed copies, executed by ``notebooks/execute.py``, hold the
full runs' outputs).
"""

import os
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb files"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    env_backup = dict(os.environ)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend, as in the committed copies
    # the notebooks write their runs here, not into the repository
    os.environ["MEDJAX_NOTEBOOK_WORKDIR"] = str(tmp_path)
    os.environ["MEDJAX_NOTEBOOK_SMOKE"] = "1"
    try:
        client = nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    # the notebook draws its figures inline (so that the committed copy shows them)
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), (
        f"{path.name}: no inline figure"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_shows_its_figures(path):
    """The committed copy was executed (python notebooks/execute.py): a reader sees the figures."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: not executed"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), (
        f"{path.name}: no figure stored; run python notebooks/execute.py {path.name}"
    )
