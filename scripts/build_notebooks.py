"""Build notebooks/NN_name.ipynb from notebooks/src/NN_name.py (percent format: `# %%` starts a
code cell, `# %% [markdown]` a markdown cell whose lines drop their leading '# ').

The .py sources are what we edit and review; the .ipynb files are committed without outputs and
kept in sync (tests/test_notebooks.py checks it). Run: python scripts/build_notebooks.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SRC, DST = ROOT / "notebooks" / "src", ROOT / "notebooks"


def parse(text: str) -> list:
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is not None and body:
            if kind == "markdown":
                body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#")
                                 for l in body.splitlines())
                cells.append(nbformat.v4.new_markdown_cell(body))
            else:
                cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = parse(src.read_text(encoding="utf-8"))
    for i, c in enumerate(nb.cells):  # stable ids: rebuilding an unchanged source is a no-op
        c["id"] = f"{src.stem[:2]}-{i:03d}"
    return nb


def main(check: bool = False) -> int:
    stale = []
    for src in sorted(SRC.glob("[0-9][0-9]_*.py")):
        dst = DST / (src.stem + ".ipynb")
        text = nbformat.writes(build(src)) + "\n"
        if check:
            if not dst.exists() or dst.read_text(encoding="utf-8") != text:
                stale.append(dst.name)
        else:
            dst.write_text(text, encoding="utf-8")
            print(f"wrote {dst.relative_to(ROOT)}")
    if stale:
        print("out of date (run python scripts/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv))
