"""The documentation site (API reference from the docstrings) builds without a warning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from routerlib.report import ROOT

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "config" / "index.html").exists()
