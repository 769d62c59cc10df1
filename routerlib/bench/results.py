"""One row schema for every benchmark result, and one file layout.

A result file is JSON: {"bench": name, "env": env_info(), "meta": {...}, "rows": [row, ...]}
where each row is
    {"variant": str,      # what ran: "triton", "torch", "compile", "torchtitan", a launch
                          # config of a tuning sweep, "triton[old]" in an A/B, ...
     "config": {...},     # the case: shape name, T, D, E, K, dtype, stage, mode, ...
     "metric": str,       # "time_us", "wall_us", "gbps", "frac_copy", "device_us", ...
     "value": float | None,  # None when the case could not run (then `error` says why)
     "unit": str,
     "p20": float | None, "p80": float | None, "n": int | None,   # spread of a timing
     "error": str}
`meta` holds what belongs to the run, not to a row: the roofs measured in it, the arguments,
a benchmark's verdicts (the targets' pass/fail). The same rows go to a CSV beside it (config
flattened into columns) for quick reading.

Layout: results/<card>/<bench>.json is the latest run of each benchmark, README.md the index,
archive/ the older runs (listed in the index). `python -m routerlib.bench.results install DIR`
puts the files a GPU run wrote into that layout; `pack DIR` turns a run's folder into one
archive (the device returns few files).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "results"


@dataclass
class Row:
    variant: str
    config: dict[str, Any]
    metric: str
    value: float | None
    unit: str = ""
    p20: float | None = None
    p80: float | None = None
    n: int | None = None
    error: str = ""


def _num(v: Any) -> float | None:
    """A finite float, or None (NaN, inf and missing values have no JSON number)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class ResultSet:
    """Rows of one benchmark run. `env` is filled by `write` (card, versions, commit) unless
    given, as when converting a file measured elsewhere."""

    bench: str
    rows: list[Row] = field(default_factory=list)
    env: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, variant: str, config: dict[str, Any], metric: str, value: float | None,
            unit: str = "", *, p20: float | None = None, p80: float | None = None,
            n: int | None = None, error: str = "") -> Row:
        row = Row(variant, dict(config), metric, _num(value), unit, _num(p20), _num(p80),
                  None if n is None else int(n), error or "")
        self.rows.append(row)
        return row

    def to_doc(self) -> dict[str, Any]:
        if self.env is None:
            from routerlib.bench.envinfo import env_info

            self.env = env_info()
        return {"bench": self.bench, "env": self.env, "meta": self.meta,
                "rows": [asdict(r) for r in self.rows]}

    def write(self, out_dir: str | Path, csv_too: bool = True) -> Path:
        """Write <out_dir>/<bench>.json (and .csv); returns the JSON's path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.bench}.json"
        doc = self.to_doc()
        head = json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1,
                          allow_nan=False)
        rows = ",\n".join(json.dumps(r, allow_nan=False) for r in doc["rows"])
        path.write_text(head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n")  # a row a line
        if csv_too:
            keys: list[str] = []
            for r in self.rows:
                keys += [k for k in r.config if k not in keys]
            with open(out / f"{self.bench}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["variant", *keys, "metric", "value", "unit", "p20", "p80", "n",
                            "error"])
                for r in self.rows:
                    w.writerow([r.variant, *(r.config.get(k, "") for k in keys), r.metric,
                                r.value, r.unit, r.p20, r.p80, r.n, r.error])
        return path

    @classmethod
    def read(cls, path: str | Path) -> ResultSet:
        doc = json.loads(Path(path).read_text())
        if "bench" not in doc or "rows" not in doc:
            raise ValueError(f"{path} is not a routerlib result file (no 'bench'/'rows'); "
                             "convert it with python -m routerlib.bench.convert")
        return cls(doc["bench"], [Row(**r) for r in doc["rows"]], doc.get("env"),
                   doc.get("meta", {}))


def card_dir(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]?)\b", device_name)
    return m.group(1).lower() if m else re.sub(r"\W+", "_", device_name).lower()


def load(path: str | Path) -> tuple[dict[str, Any], list[Row]]:
    """(env, rows) of a result file written by ResultSet.write."""
    rs = ResultSet.read(path)
    return rs.env or {}, rs.rows


def to_frame(path: str | Path):
    """The rows of a result file as a long pandas DataFrame, config keys as columns."""
    import pandas as pd

    _, rows = load(path)
    return pd.DataFrame([{"variant": r.variant, **r.config, "metric": r.metric,
                          "value": r.value, "unit": r.unit, "p20": r.p20, "p80": r.p80,
                          "n": r.n, "error": r.error} for r in rows])


def wide(path: str | Path):
    """One line per (variant, config), one column per metric (time_us also gets time_us_p20
    and time_us_p80, and `error` the first error of the case): the form plots want."""
    import pandas as pd

    long = to_frame(path)
    keys = [c for c in long.columns if c not in ("metric", "value", "unit", "p20", "p80", "n",
                                                  "error")]
    records: dict[tuple, dict[str, Any]] = {}
    for rec in long.to_dict("records"):
        k = tuple(_hashable(rec[c]) for c in keys)
        d = records.setdefault(k, {c: rec[c] for c in keys} | {"error": None})
        d[rec["metric"]] = rec["value"]
        if rec["p20"] is not None and not pd.isna(rec["p20"]):
            d[f"{rec['metric']}_p20"], d[f"{rec['metric']}_p80"] = rec["p20"], rec["p80"]
        if rec["error"] and not d["error"]:
            d["error"] = rec["error"]
    return pd.DataFrame(list(records.values()))


def _hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return tuple(v) if isinstance(v, list) else v


def latest(bench: str, card: str, root: str | Path = RESULTS) -> Path:
    """results/<card>/<bench>.json, with an error naming what is there when it is absent."""
    path = Path(root) / card / f"{bench}.json"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.json"))
        raise FileNotFoundError(f"no {bench!r} results for {card!r} under {path.parent} "
                                f"(there: {', '.join(have) or 'nothing'}); run the benchmark "
                                "on that card and `python -m routerlib.bench.results install`")
    return path


def pack(run_dir: str | Path) -> Path:
    """Every file under run_dir into one run_dir/results.tgz (the originals removed)."""
    run = Path(run_dir)
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != "results.tgz")
    dest = run / "results.tgz"
    with tarfile.open(dest, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(run)))
    for p in files:
        p.unlink()
    return dest


def install(src: str | Path, root: str | Path = RESULTS) -> list[Path]:
    """Put the result files of a run (a folder, or a .tgz from `pack`) under
    root/<card>/<bench>.json (+ .csv); a file already there moves to root/<card>/archive/
    <bench>_<commit>.json first. Files that are not result files are left alone. Returns the
    paths written; update the card's README.md (the index) by hand."""
    import tempfile

    src = Path(src)
    with tempfile.TemporaryDirectory() as tmp:
        if src.is_file():
            with tarfile.open(src) as tar:
                try:
                    tar.extractall(tmp, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(tmp)  # noqa: S202 (our own archive)
            src = Path(tmp)
        written = []
        for path in sorted(src.rglob("*.json")):
            try:
                rs = ResultSet.read(path)
            except (ValueError, json.JSONDecodeError, TypeError):
                continue
            env = rs.env or {}
            card = Path(root) / card_dir(str(env.get("device", "unknown")))
            card.mkdir(parents=True, exist_ok=True)
            prev = card / f"{rs.bench}.json"
            if prev.exists():
                old_env = json.loads(prev.read_text()).get("env") or {}
                tag = str(old_env.get("git_commit") or "unknown")[:7]
                (card / "archive").mkdir(exist_ok=True)
                for ext in (".json", ".csv"):
                    if (card / f"{rs.bench}{ext}").exists():
                        shutil.move(card / f"{rs.bench}{ext}",
                                    card / "archive" / f"{rs.bench}_{tag}{ext}")
            written.append(rs.write(card))
        return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m routerlib.bench.results",
                                 description="pack a run's files into one archive, or install "
                                             "a run's result files under results/<card>/")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="DIR -> DIR/results.tgz")
    p.add_argument("dir")
    i = sub.add_parser("install", help="DIR or .tgz -> results/<card>/<bench>.json")
    i.add_argument("src")
    i.add_argument("--root", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        print(pack(args.dir))
    else:
        for path in install(args.src, args.root):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
