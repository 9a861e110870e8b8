"""The notebooks in notebooks/: committed with their outputs, and they run top to bottom.

Each notebook is executed by nbclient in a fresh kernel, from an in-memory copy (the committed file is left as it
is); a cell that raises fails the test with that cell's traceback. The kernel is the `python3` kernel of the
environment running the tests (jupyter_client starts it with this interpreter), so the notebooks see the same
minivb, torch and transformers as the rest of the suite. Every notebook asserts its own numbers.
"""

import base64
import struct
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
    "08_training.ipynb",
    "09_real_scale.ipynb",
    "10_evaluation.ipynb",
]
MAX_BYTES = 2_000_000  # committed with pictures, but small enough to read on a code-hosting page
MAX_CELL_LINES = 40  # a cell shows one idea; harness and plotting code goes to notebooks/helpers.py
MIN_WIDTH_PX, MIN_DPI = 600, 99.5  # figures readable on a screen (matplotlib writes 100 dpi as 3937 px/m = 99.998)
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


def png_size_and_dpi(data: bytes) -> tuple[int, float | None]:
    """Width in pixels (IHDR) and resolution in dpi (pHYs, when the PNG says it in metres) of a PNG file."""
    width = struct.unpack(">I", data[16:20])[0]
    position = 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"pHYs":
            per_unit, _, unit = struct.unpack(">IIB", data[position + 8:position + 17])
            return width, per_unit * 0.0254 if unit == 1 else None
        if kind == b"IDAT":  # pHYs must come before the image data
            break
        position += 12 + length
    return width, None


@pytest.mark.parametrize("name", NAMES)
def test_reads_as_a_lesson(name):
    """Short cells, figures at >= 100 dpi and >= 600 px, a recap and exercises with hidden solutions."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for number, cell in enumerate(notebook.cells):
        lines = len(cell.source.splitlines())
        assert cell.cell_type != "code" or lines <= MAX_CELL_LINES, f"{name}, cell {number}: {lines} lines"
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                width, dpi = png_size_and_dpi(base64.b64decode(output.data["image/png"]))
                assert width >= MIN_WIDTH_PX and dpi is not None and dpi >= MIN_DPI, \
                    f"{name}, cell {number}: a figure {width} px wide at {dpi} dpi"
    markdown = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    assert any("What we saw" in text for text in markdown), f"{name} has no recap (a 'What we saw' section)"
    hidden = sum("<details>" in text for text in markdown)
    hidden += sum(cell.metadata.get("jupyter", {}).get("source_hidden", False) for cell in notebook.cells)
    assert hidden >= 2, f"{name} has {hidden} exercises with a hidden solution; 2 to 4 expected"


def test_png_size_and_dpi_reads_what_matplotlib_writes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6.5, 2))
    fig.savefig(tmp_path / "f.png", dpi=100)
    plt.close(fig)
    width, dpi = png_size_and_dpi((tmp_path / "f.png").read_bytes())
    assert width == 650 and abs(dpi - 100) < 0.01


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
