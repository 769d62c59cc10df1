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


def test_report_index_has_a_title_and_a_line_per_notebook():
    import nbformat

    from routerlib.report import index_html, notebook_title

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_markdown_cell("intro\n# 01 — Baseline: the reference <router>")]
    assert notebook_title(nb) == "01 — Baseline: the reference <router>"
    page = index_html([("01_baseline", notebook_title(nb), 12.3), ("02_kernels", "", 4.0)])
    assert "<title>routerlib report</title>" in page and "<h1>" in page
    items = [line for line in page.splitlines() if line.strip().startswith("<li>")]
    assert len(items) == 2
    assert 'href="01_baseline.html"' in items[0] and "&lt;router&gt;" in items[0]
    assert ">02_kernels</a>" in items[1]  # no heading: the file name stands in


def test_every_notebook_source_starts_with_a_title():
    for src in sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py")):
        first = src.read_text().splitlines()[:3]
        assert first[0] == "# %% [markdown]" and first[1].startswith("# # "), src.name
