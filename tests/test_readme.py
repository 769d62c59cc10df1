"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    y, x, out = scope["y"], scope["x"], scope["out"]
    assert y.shape == x.shape and bool(y.isfinite().all())
    assert int(out.plan.kept_counts.sum() + out.plan.num_dropped()) == x.shape[0] * x.shape[1] * 4
