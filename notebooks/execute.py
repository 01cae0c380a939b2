"""Execute the notebooks in place, so that the committed copies show their outputs and figures inline.

    python notebooks/execute.py                 # every notebook in this folder
    python notebooks/execute.py model_zoo.ipynb # some of them

Runs each notebook top to bottom in a fresh kernel with matplotlib's inline backend (figures are
stored as PNG outputs), in a temporary working folder (``MEDJAX_NOTEBOOK_WORKDIR``), and writes it
back. The test suite executes them again, in a temporary copy, without writing.
"""

import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def main(names):
    import nbclient
    import nbformat

    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ)
            os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend stores the figures
            os.environ["MEDJAX_NOTEBOOK_WORKDIR"] = tmp
            try:
                nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                        resources={"metadata": {"path": tmp}}).execute()
            finally:
                os.environ.clear()
                os.environ.update(env)
        images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        nbformat.write(nb, path)
        print(f"{path.name}: executed, {images} figure(s) inline")


if __name__ == "__main__":
    main(sys.argv[1:])
