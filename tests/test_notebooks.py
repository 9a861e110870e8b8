"""The notebooks in notebooks/: committed with their outputs, and they run top to bottom.

Each notebook is executed by nbclient in a fresh kernel, from an in-memory copy (the committed file is left as it
is); a cell that raises fails the test with that cell's traceback. The kernel is the `python3` kernel of the
environment running the tests (jupyter_client starts it with this interpreter), so the notebooks see the same
minivb, torch and transformers as the rest of the suite. Every notebook asserts its own numbers.
"""

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
    "01_frames_and_patches.ipynb",
    "02_vision_encoder.ipynb",
    "03_qformer.ipynb",
    "04_language_models.ipynb",
    "05_generation.ipynb",
    "06_loading_checkpoints.ipynb",
    "07_parity_with_transformers.ipynb",
]
MAX_BYTES = 2_000_000  # committed with pictures, but small enough to read on a code-hosting page
CELL_TIMEOUT_S = 600


def execute(notebook):
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return notebook


def test_every_notebook_is_listed():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == NAMES
    readme = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert name in readme, f"notebooks/README.md does not list {name}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs(name):
    path = NOTEBOOKS / name
    assert path.stat().st_size <= MAX_BYTES, f"{name} is {path.stat().st_size} bytes; keep figures small"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code_cells]
    assert counts == list(range(1, len(code_cells) + 1)), f"{name} was not run top to bottom in one kernel: {counts}"
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name} was committed with an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} has no picture"


def test_kernel_is_this_environment():
    """The kernel the notebooks run in is this interpreter's environment (a .venv's, under `make test`)."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    execute(notebook)
    printed = "".join(output.text for output in notebook.cells[0].outputs if output.output_type == "stream")
    assert Path(printed.strip()).resolve() == Path(sys.prefix).resolve()


@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom(name):
    execute(nbformat.read(NOTEBOOKS / name, as_version=4))
