"""One row schema for every benchmark result, and one file layout.

A result file is JSON: {"bench": name, "env": env_info(), "rows": [row, ...]} where each row is
    {"variant": str,      # what ran: "triton", "torch", "compile", "torchtitan", "fp8", ...
     "config": {...},     # the case: shape name, T, D, E, K, dtype, ...
     "metric": str,       # "time_us", "tflops", "gbps", "frac_of_roof", "peak_mem_mb", ...
     "value": float,
     "unit": str}
The same rows go to a CSV beside it (config flattened into columns) for quick reading.
results/<card>/ keeps the latest file per benchmark (<bench>.json / .csv) plus README.md, an
index; older runs go to results/<card>/archive/.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    variant: str
    config: dict[str, Any]
    metric: str
    value: float
    unit: str = ""


@dataclass
class ResultSet:
    """Rows of one benchmark run; `write` adds the environment (card, versions, commit)."""

    bench: str
    rows: list[Row] = field(default_factory=list)

    def add(self, variant: str, config: dict[str, Any], metric: str, value: float,
            unit: str = "") -> Row:
        row = Row(variant, dict(config), metric, float(value), unit)
        self.rows.append(row)
        return row

    def write(self, out_dir: str | Path) -> Path:
        from routerlib.bench.envinfo import env_info

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.bench}.json"
        doc = {"bench": self.bench, "env": env_info(), "rows": [asdict(r) for r in self.rows]}
        path.write_text(json.dumps(doc, indent=1))
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r.config if k not in keys]
        with open(out / f"{self.bench}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", *keys, "metric", "value", "unit"])
            for r in self.rows:
                w.writerow([r.variant, *(r.config.get(k, "") for k in keys), r.metric,
                            r.value, r.unit])
        return path


def card_dir(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]?)\b", device_name)
    return m.group(1).lower() if m else re.sub(r"\W+", "_", device_name).lower()


def load(path: str | Path) -> tuple[dict[str, Any], list[Row]]:
    """(env, rows) of a result file written by ResultSet.write."""
    doc = json.loads(Path(path).read_text())
    return doc["env"], [Row(**r) for r in doc["rows"]]


def to_frame(path: str | Path):
    """The rows of a result file as a pandas DataFrame, config keys as columns."""
    import pandas as pd

    _, rows = load(path)
    return pd.DataFrame([{"variant": r.variant, **r.config, "metric": r.metric,
                          "value": r.value, "unit": r.unit} for r in rows])
