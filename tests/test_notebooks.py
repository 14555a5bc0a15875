"""The notebooks in inference/: committed without outputs, no web downloads, and each runs top to bottom (nbclient,
this Python's ipykernel) on the default model, asserting what it shows."""
import glob
import os
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "inference", "*.ipynb")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS]


def test_the_four_notebooks_exist():
    assert NAMES == ["controlnet", "lora", "reconstruct_images", "text_to_image"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_clean_and_offline(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the outputs before committing"
    assert not any("http" in c.source for c in code), "use local sample images, not downloads"
    assert "RELEASED = False" in code[0].source  # the first cell switches to the released weights


def _execute(path):
    """Runs one notebook in a fresh kernel; returns its outputs."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_every_notebook_runs_top_to_bottom(monkeypatch):
    """The kernels run side by side, one thread each: the demo model's 128² images gain little from more threads,
    the imports gain from running in parallel."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with ThreadPoolExecutor(max_workers=len(NOTEBOOKS)) as pool:
        results = dict(zip(NAMES, pool.map(_execute, NOTEBOOKS)))  # a failing cell raises CellExecutionError
    for name, outputs in results.items():
        assert not [o for o in outputs if o.output_type == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} shows no picture"
