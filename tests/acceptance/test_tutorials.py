"""The tutorial notebooks (docs/tutorials/*.ipynb) run from top to bottom, offline.

Each is executed with nbclient in a fresh kernel whose working directory is the repository
root, with the hub switched off; a cell that raises fails the test. The notebooks double as
acceptance tests of the public API. Their outputs are stripped in git (the test checks), and
the executed copy is checked for what a reader relies on: figures that display by
themselves, and the CircuitsVis bundle held once however many views a notebook shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))
BUNDLE_MARK = 'data-vlens="circuitsvis-bundle"'

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")


def test_there_are_tutorials():
    assert [p.name for p in NOTEBOOKS] == ["01_toy_model.ipynb", "02_hub_checkpoint.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped_in_git(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: a cell keeps its outputs"


def _outputs(notebook, output_type: str | None = None) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if output_type is None or o.output_type == output_type]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every tutorial executed in its own kernel (offline, vlens from this checkout)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    out = {}
    try:
        for path in NOTEBOOKS:
            notebook = nbformat.read(path, as_version=4)
            client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                             resources={"metadata": {"path": str(ROOT)}})
            client.execute()  # raises CellExecutionError, naming the cell, when one fails
            target = tmp_path_factory.mktemp("tutorials") / path.name
            nbformat.write(notebook, target)
            out[path.stem] = (notebook, target)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return out


def test_toy_tutorial_shows_its_figures_and_the_bundle_once(executed):
    notebook, path = executed["01_toy_model"]
    shown = _outputs(notebook, "execute_result") + _outputs(notebook, "display_data")
    figures = [o for o in shown if "NotebookFigure" in o.data.get("text/plain", "")]
    assert len(figures) >= 6 and all("image/png" in o.data for o in figures)
    views = [o for o in shown if "CircuitsVis.render(" in o.data.get("text/html", "")]
    assert len(views) == 2, "the toy tutorial shows two CircuitsVis views"
    assert sum(o.data["text/html"].count(BUNDLE_MARK) for o in views) == 1
    assert path.stat().st_size < 3_500_000, f"{path.stat().st_size} bytes"  # one 1.9 MB bundle, not one per view


def test_hub_tutorial_says_which_model_it_ran(executed):
    notebook, _ = executed["02_hub_checkpoint"]
    printed = "".join(o.text for o in _outputs(notebook, "stream") if o.name == "stdout")
    import torch

    if not torch.cuda.is_available():
        assert "this run uses 'toy' instead of 'llava-hf/llava-1.5-7b-hf'" in printed
    assert "every section complete" in printed
