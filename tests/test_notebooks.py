"""Every numbered notebook runs top to bottom (CPU sizes here; full sizes on a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from routerlib.report import ROOT, execute_notebook, notebook_paths

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = notebook_paths(ROOT / "notebooks")


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path):
    nb = execute_notebook(path, tmp_path, timeout=900)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "no cell printed"


def test_notebooks_match_their_sources():
    """notebooks/NN_*.ipynb are built from notebooks/src/NN_*.py; a stale one fails here."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_notebooks.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_notebooks_import_only_routerlib():
    """Notebooks stay thin: no kernel, no @triton.jit, no class definitions in a notebook."""
    for src in sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py")):
        text = src.read_text()
        assert "triton.jit" not in text and "\nclass " not in text, src.name
