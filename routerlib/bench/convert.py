"""Convert result files of the earlier formats into the one row schema (routerlib.bench.results),
keeping the environment they were measured in (card, versions, commit, date).

    python -m routerlib.bench.convert sweep results/h100/baseline.json --bench baseline --out DIR
    python -m routerlib.bench.convert targets|breakdown|tune SRC [SRC ...] --bench NAME --out DIR

Formats: `sweep` (the CLI's JSON: env, roofs, args, wide rows, profile), `targets` (rows by
section/case/impl/mode plus the verdicts), `breakdown` (device time per kernel and host times per
case), `tune` (launch-config sweeps: JSON with env, or a bare CSV, whose env is then given with
--env-from a JSON of the same run or left unknown). Several sweep files merge into one set: for
each case the newest run's rows win, and every row names its run's commit in config["commit"].
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from routerlib.bench.results import ResultSet

# the sweep's wide columns that become metrics, with their units
SWEEP_METRICS = {"gbps": "GB/s", "tflops": "TFLOP/s", "frac_roof": "", "floor_us": "us"}
SWEEP_CASE = ("config", "D", "E", "K", "F", "inputs", "dtype", "T", "stage", "mode")
PROFILE_METRICS = {"time_us": "us", "n_kernels": "", "peak_mem_mb": "MB", "extra_mem_mb": "MB",
                   "share": ""}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""


def _case(row: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in keys if k in row and not _missing(row[k])}


def add_sweep_rows(rs: ResultSet, rows: list[dict], profile: list[dict] = (),
                   extra: dict[str, Any] | None = None) -> None:
    """The sweep's wide rows (one per case) as schema rows: time_us (median, p20, p80, n), then
    the metrics of SWEEP_METRICS that the case has, and the imbalance / drop rate of its load;
    profile rows as profile_* metrics."""
    extra = extra or {}
    for r in rows:
        case = _case(r, SWEEP_CASE) | extra
        err = "" if _missing(r.get("error")) else str(r["error"])
        rs.add(r["backend"], case, "time_us", None if err else r.get("median_us"), "us",
               p20=r.get("p20_us"), p80=r.get("p80_us"),
               n=None if _missing(r.get("n")) else r["n"], error=err)
        if err:
            continue
        for m, unit in SWEEP_METRICS.items():
            if not _missing(r.get(m)) and not (m == "tflops" and not r.get("flops")):
                rs.add(r["backend"], case, m, r[m], unit)
        for m in ("imbalance", "drop_rate", "bytes", "setup_s"):
            if not _missing(r.get(m)):
                rs.add(r["backend"], case, m, r[m], "s" if m == "setup_s" else "")
    for p in profile:
        case = _case(p, ("config", "inputs", "T", "stage", "time_kind")) | {"mode": "profile"} \
            | extra
        err = "" if _missing(p.get("error")) else str(p["error"])
        if err:
            rs.add(p.get("backend", ""), case, "profile_time_us", None, "us", error=err)
            continue
        for m, unit in PROFILE_METRICS.items():
            if not _missing(p.get(m)):
                rs.add(p["backend"], case, f"profile_{m}" if m == "time_us" else m, p[m], unit)


def from_sweep(docs: list[dict], bench: str) -> ResultSet:
    """One set from one or more sweep JSON docs; later docs' cases replace earlier ones."""
    docs = sorted(docs, key=lambda d: d["env"].get("date") or "")
    newest = docs[-1]
    owner: dict[tuple, int] = {}
    for i, d in enumerate(docs):
        for r in d["rows"]:
            if _missing(r.get("error")) or (r["backend"], *_case(r, SWEEP_CASE).items()) \
                    not in owner:
                owner[(r["backend"], *_case(r, SWEEP_CASE).items())] = i
    rs = ResultSet(bench, env=newest["env"],
                   meta={"roofs": newest.get("roofs"), "args": newest.get("args")})
    if len(docs) > 1:
        rs.meta["runs"] = [{"env": d["env"], "roofs": d.get("roofs"), "args": d.get("args")}
                           for d in docs]
    for i, d in enumerate(docs):
        mine = [r for r in d["rows"] if owner[(r["backend"], *_case(r, SWEEP_CASE).items())] == i]
        extra = {"commit": str(d["env"].get("git_commit"))[:7]} if len(docs) > 1 else None
        add_sweep_rows(rs, mine, d.get("profile") or [] if len(docs) == 1 else [], extra)
    return rs


TARGET_CASE = ("section", "case", "op", "mode", "T", "D", "E", "K", "dtype")
TARGET_METRICS = {"median_us": "us", "wall_us": "us", "gbps": "GB/s", "frac_copy": "",
                  "ratio": ""}


def from_targets(doc: dict, bench: str = "targets") -> ResultSet:
    """The targets' rows (time_us with its spread, wall_us, gbps, frac_copy, ratio, and
    verified as 1/0) and their verdicts in meta["targets"]."""
    rs = ResultSet(bench, env=doc["env"], meta={"roofs": doc.get("roofs"),
                                                "args": doc.get("args"),
                                                "targets": doc.get("targets", [])})
    for r in doc["rows"]:
        case = _case(r, TARGET_CASE)
        err = "" if r.get("status") == "ok" else str(r.get("error") or r.get("status"))
        if not _missing(r.get("note")):
            case["note"] = r["note"]
        rs.add(r["impl"], case, "time_us", None if err else r.get("median_us"), "us",
               p20=r.get("p20_us"), p80=r.get("p80_us"),
               n=None if _missing(r.get("n")) else r["n"], error=err)
        if err:
            continue
        for m, unit in TARGET_METRICS.items():
            if m != "median_us" and not _missing(r.get(m)):
                rs.add(r["impl"], case, m, r[m], unit)
        if r.get("verified") is not None:
            rs.add(r["impl"], case, "verified", float(bool(r["verified"])), "",
                   error=str(r.get("verify_error") or ""))
    return rs


def from_breakdown(doc: dict, bench: str = "route_breakdown") -> ResultSet:
    """Per case: device_us of each kernel (config["kernel"]), graph_us, eager_wall_us,
    eager_no_launch_us (the Python path), empty_alloc_us; the host profiles in meta."""
    rs = ResultSet(bench, env=doc["env"], meta={"graph_floor_us": doc.get("graph_floor_us"),
                                                "host_profiles": {}})
    for c in doc["cases"]:
        case = {"case": c["case"], "T": c["T"], "E": c["E"], "K": c["K"],
                "launches": "one" if c.get("one_launch") else "several"}
        if c.get("config") is not None:
            case["launch_config"] = ",".join(map(str, c["config"]))
        for kernel, us in (c.get("device_us") or {}).items():
            rs.add("triton", case | {"kernel": kernel}, "device_us", us, "us")
        for m in ("graph_us", "eager_wall_us", "eager_no_launch_us", "empty_alloc_us"):
            if not _missing(c.get(m)):
                rs.add("triton", case, m, c[m], "us")
        if c.get("host_profile"):
            rs.meta["host_profiles"][f"{c['case']} {case['launches']}"] = c["host_profile"]
    return rs


def from_tune(rows: list[dict], env: dict | None, bench: str) -> ResultSet:
    """Launch-config sweeps: the variant is the launch config ("default" = the rule's choice),
    time_us in a CUDA graph; a config that failed its check or its launch keeps its error."""
    rs = ResultSet(bench, env=env or {"device": "unknown", "note": "env not recorded"})
    for r in rows:
        case = _case(r, ("kernel", "case", "T", "E", "K", "D"))
        ok = str(r.get("ok")).lower() == "true"
        err = "" if ok else str(r.get("error") or "differs from the default's output")
        rs.add(str(r["config"]), case, "time_us", r.get("us") if ok else None, "us", error=err)
    return rs


def _read_tune(path: Path) -> tuple[list[dict], dict | None]:
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        return doc["rows"], doc.get("env")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("T", "E", "K", "D"):
            r[k] = int(float(r[k])) if r.get(k) not in (None, "") else None
        r["us"] = float(r["us"]) if r.get("us") not in (None, "") else None
    return rows, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m routerlib.bench.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("sweep", "targets", "breakdown", "tune"))
    ap.add_argument("src", nargs="+", type=Path)
    ap.add_argument("--bench", required=True, help="benchmark name: the output file's stem")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--env-from", type=Path, default=None,
                    help="tune CSVs: take the env of this JSON (measured in the same run)")
    args = ap.parse_args(argv)
    docs = [json.loads(p.read_text()) for p in args.src if p.suffix == ".json"]
    if args.kind == "sweep":
        rs = from_sweep(docs, args.bench)
    elif args.kind == "targets":
        rs = from_targets(docs[0], args.bench)
    elif args.kind == "breakdown":
        rs = from_breakdown(docs[0], args.bench)
    else:
        rows, env = [], None
        for p in args.src:
            r, e = _read_tune(p)
            rows += r
            env = env or e
        if args.env_from is not None:
            env = json.loads(args.env_from.read_text())["env"]
        rs = from_tune(rows, env, args.bench)
    rs.meta["converted_from"] = [p.name for p in args.src]
    print(rs.write(args.out), f"({len(rs.rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
