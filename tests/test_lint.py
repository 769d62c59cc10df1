"""The package, tests and scripts pass ruff (pyproject's rules), when ruff is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    pytest.importorskip("ruff")
    exe = shutil.which("ruff") or sys.executable
    cmd = [exe, "check", "routerlib", "tests", "scripts"]
    if exe == sys.executable:
        cmd[1:1] = ["-m", "ruff"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
