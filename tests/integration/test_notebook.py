"""notebooks/quickstart.ipynb runs from top to bottom (FMJAX_NOTEBOOK_QUICK=1 shrinks it
to a few training steps) in a fresh kernel, so it cannot rot."""
import os
import time

import pytest
from helpers import ROOT

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    seconds = time.perf_counter() - start
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    pictures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 3  # heat maps, ROC and PR, the user's own image
    assert "map (37, 50)" in text  # the user's image's map at its own size
    diff = float(text.split("largest difference from det.score:")[1].split()[0])
    assert diff <= 1e-5
    assert (tmp_path / "fmjax_quickstart" / "exported" / "scorer.jaxexport").exists()
    print(f"{len(code)} code cells in {seconds:.0f} s")
