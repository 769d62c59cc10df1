"""The final report's summary: what routerlib gained over the reference and over the peers,
read from the committed result files (results/<card>/<bench>.json, one row schema:
routerlib.bench.results), never typed in.

A `Comparison` names, for one benchmark file, the variant that is routerlib, the baseline
variant (the PyTorch reference, or the plain torch way where the benchmark has no reference
variant), the peers, the metric and the config keys that make one case. `gains` turns every
case of every comparison whose file exists into a line: baseline, routerlib, best peer and the
two ratios, with the file, card and commit it came from. A file not there yet is listed by
`availability` as "not measured yet"; nothing else changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routerlib.bench.results import RESULTS, ROOT, ResultSet

# Every benchmark file the report reads, with what it measures.
BENCHES: dict[str, str] = {
    "targets": "route, dispatch, combine, decode path, backward against the reference and peers",
    "kernels": "the kernel sweep over model shapes and T",
    "experts": "the whole MoE layer and the fused experts against the torch ways",
    "expert_choice": "expert-choice routing in Triton against the reference",
    "quant": "router precision, quantized payload and fp8 experts",
    "balance": "the load-balancing study on the small MoE language model",
    "inference": "decode latency and throughput of the small MoE language model",
    "hf_dropin": "routerlib's layer inside a Hugging Face MoE model",
}


@dataclass(frozen=True)
class Comparison:
    """One question of the summary: routerlib's variant against a baseline and the peers."""

    bench: str                      # result file stem
    stage: str                      # what the line is about, for the table
    fast: str                       # routerlib's variant
    baseline: str                   # the reference (or plain torch) variant
    metric: str | tuple[str, ...]   # the row metric compared (a tuple: any of these names)
    case_keys: tuple[str, ...]      # config keys naming a case (the others may differ)
    peers: tuple[str, ...] = ()     # other implementations measured in the same run
    where: dict[str, Any] = field(default_factory=dict)  # config filter
    lower_is_better: bool = True
    prefer: str = ""                # the headline shows the last case whose name holds this


# The median device time: "time_us" in most files, "median_us" in the targets benchmark's.
TIME = ("time_us", "median_us")

COMPARISONS: tuple[Comparison, ...] = (
    Comparison("targets", "route (score + top-K + plan)", "triton", "torch", TIME,
               ("case", "T", "E", "K", "dtype"), ("compile", "torchtitan", "deepspeed"),
               {"section": "route", "op": "route", "mode": "eager", "case": "qwen3"}),
    Comparison("targets", "dispatch", "triton", "torch", TIME, ("case", "T", "D", "K"),
               ("compile", "torchtitan", "deepspeed"),
               {"section": "dispatch", "op": "dispatch", "mode": "eager"}),
    Comparison("targets", "combine", "triton", "torch", TIME, ("case", "T", "D", "K"),
               ("compile", "torchtitan", "deepspeed"),
               {"section": "dispatch", "op": "combine", "mode": "eager"}),
    Comparison("targets", "decode path (route, dispatch, combine)", "triton", "torch", TIME,
               ("case", "T", "D"), (),
               {"section": "decode", "op": "path", "mode": "eager"}),
    Comparison("targets", "route + dispatch + combine, backward", "triton", "torch", TIME,
               ("case", "T"), (), {"section": "backward", "mode": "backward"}),
    Comparison("experts", "MoE layer, prefill forward", "routerlib", "hf_loop", "time_us",
               ("shape", "T"), ("torch_composition",), {"mode": "forward"},
               prefer="qwen3-30b-a3b"),
    Comparison("experts", "MoE layer, forward + backward", "routerlib", "hf_loop", "time_us",
               ("shape", "T"), ("torch_composition",), {"mode": "train"},
               prefer="qwen3-30b-a3b"),
    Comparison("experts", "MoE layer, decode", "routerlib", "hf_loop", "time_us",
               ("shape", "T"), ("torch_composition",), {"mode": "decode"},
               prefer="qwen3-30b-a3b"),
    Comparison("expert_choice", "expert-choice routing", "triton", "torch", "time_us",
               ("T", "E", "capacity_factor", "dtype"), ("compile",), {"pass": "fwd"}),
    Comparison("inference", "LM decode step (graph)", "triton-graph", "torch-eager",
               "latency_p50_us", ("model", "B"), ("torch-graph",)),
    Comparison("hf_dropin", "HF model forward", "routerlib-triton", "hf", "forward_ms",
               ("model", "T"), prefer="qwen3"),
)


@dataclass(frozen=True)
class Source:
    """Where a number came from: the file, the card and the commit of the run."""

    path: Path
    device: str
    commit: str
    date: str

    def label(self) -> str:
        """'results/h200/targets.json (NVIDIA H200, commit 56cd269, 2026-11-27)'."""
        try:
            rel = self.path.resolve().relative_to(ROOT)
        except ValueError:
            rel = self.path
        return f"{rel} ({self.device}, commit {self.commit[:7]}, {self.date[:10]})"


def _source(path: Path, rs: ResultSet) -> Source:
    env = rs.env or {}
    return Source(path, str(env.get("device", "?")), str(env.get("git_commit") or "?"),
                  str(env.get("date") or "?"))


def result_path(bench: str, card: str, root: str | Path = RESULTS) -> Path | None:
    """results/<card>/<bench>.json, or None when that benchmark has not been measured yet."""
    p = Path(root) / card / f"{bench}.json"
    return p if p.exists() else None


def availability(card: str, root: str | Path = RESULTS,
                 benches: dict[str, str] = BENCHES):
    """One line per benchmark: its file, card, commit and date, or "not measured yet"."""
    import pandas as pd

    lines = []
    for bench, what in benches.items():
        p = result_path(bench, card, root)
        if p is None:
            lines.append(dict(bench=bench, measures=what, status="not measured yet",
                              device="", commit="", date="", rows=0))
            continue
        rs = ResultSet.read(p)
        s = _source(p, rs)
        lines.append(dict(bench=bench, measures=what, status=f"{card}/{p.name}", device=s.device,
                          commit=s.commit[:7], date=s.date[:10], rows=len(rs.rows)))
    return pd.DataFrame(lines)


def _matches(config: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(config.get(k) == v for k, v in where.items())


def _ratio(base: float | None, fast: float | None, lower_is_better: bool) -> float | None:
    """How many times better `fast` is than `base` (> 1: better)."""
    if base is None or fast is None or base <= 0 or fast <= 0:
        return None
    return base / fast if lower_is_better else fast / base


def _case_label(case: dict[str, Any]) -> str:
    """'qwen3 T=16384 E=128': a case's name, then the keys it does not already spell out."""
    name = str(case.get("case", ""))
    parts = [name] if name else []
    parts += [f"{k}={v}" for k, v in case.items() if k != "case" and f"{k}={v}" not in name]
    return " ".join(parts)


def compare(rs: ResultSet, c: Comparison, source: Source) -> list[dict[str, Any]]:
    """Every case of `c` in one result set: baseline, routerlib and best peer values."""
    metrics = (c.metric,) if isinstance(c.metric, str) else c.metric
    cases: dict[tuple, dict[str, float]] = {}
    names: dict[tuple, dict[str, Any]] = {}
    metric_of: dict[tuple, str] = {}
    for row in rs.rows:
        if row.metric not in metrics or row.value is None or not _matches(row.config, c.where):
            continue
        if row.variant not in (c.fast, c.baseline, *c.peers):
            continue
        key = tuple(row.config.get(k) for k in c.case_keys)
        cases.setdefault(key, {})[row.variant] = row.value
        metric_of[key] = row.metric
        names[key] = {k: row.config.get(k) for k in c.case_keys if row.config.get(k) is not None}
    out = []
    for key, vals in cases.items():
        if c.fast not in vals:
            continue
        peers = {p: vals[p] for p in c.peers if p in vals}
        best = (min if c.lower_is_better else max)(peers, key=peers.get) if peers else None
        base = vals.get(c.baseline)
        out.append(dict(
            stage=c.stage, case=_case_label(names[key]),
            metric=metric_of[key], baseline=c.baseline, baseline_value=base,
            routerlib=vals[c.fast], best_peer=best or "",
            peer_value=peers[best] if best else None,
            x_vs_baseline=_ratio(base, vals[c.fast], c.lower_is_better),
            x_vs_peer=_ratio(peers[best], vals[c.fast], c.lower_is_better) if best else None,
            source=source.label(), commit=source.commit[:7], device=source.device,
            prefer=c.prefer))
    return out


def gains(card: str, root: str | Path = RESULTS,
          comparisons: tuple[Comparison, ...] = COMPARISONS):
    """The summary table: one line per case of each comparison whose result file exists.
    Ratios are "times better" (time of the other / time of routerlib; > 1: routerlib wins)."""
    import pandas as pd

    lines: list[dict[str, Any]] = []
    read: dict[str, tuple[ResultSet, Source]] = {}
    for c in comparisons:
        p = result_path(c.bench, card, root)
        if p is None:
            continue
        if c.bench not in read:
            rs = ResultSet.read(p)
            read[c.bench] = (rs, _source(p, rs))
        lines += compare(read[c.bench][0], c, read[c.bench][1])
    cols = ["stage", "case", "metric", "baseline", "baseline_value", "routerlib", "best_peer",
            "peer_value", "x_vs_baseline", "x_vs_peer", "source", "commit", "device", "prefer"]
    return pd.DataFrame(lines, columns=cols)


def headline(table):
    """One line per stage for the table a reader wants first: the last case of the stage (the
    benchmarks write from small to large) among those whose name holds the comparison's
    `prefer` (the shape quoted across the project), or the last case when none does."""
    keep = []
    for _, g in table.groupby("stage", sort=False):
        pref = g.prefer.iloc[0]
        hit = g[g.case.str.contains(pref, regex=False)] if pref else g
        keep.append((hit if len(hit) else g).index[-1])
    return table.loc[keep].reset_index(drop=True)


def fmt_ratio(x: float | None) -> str:
    """'12.3x' / '0.85x' / 'n/a' (not measured in that run)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def plot_gains(table, ax=None, title: str = ""):
    """Horizontal bars: how many times faster routerlib is than the baseline and than the best
    peer, one pair of bars per line of `table`, on a log axis (1x marked); legend below."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    n = len(table)
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.55 * max(n, 1) + 1.6))
    if n == 0:
        ax.text(0.5, 0.5, "not measured yet: no result file to summarise", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return ax
    y = np.arange(n)
    base = table["x_vs_baseline"].astype(float).to_numpy()
    peer = table["x_vs_peer"].astype(float).to_numpy()
    ax.barh(y - 0.2, np.nan_to_num(base, nan=0.0), height=0.38, color="#2b6cb0",
            label="vs the baseline (PyTorch reference; torch loop or stock HF model where noted)")
    ax.barh(y + 0.2, np.nan_to_num(peer, nan=0.0), height=0.38, color="#dd6b20",
            label="vs the best peer measured (torch.compile, torchtitan, DeepSpeed, ...)")
    for yi, b, p in zip(y, base, peer, strict=True):
        for off, v in ((-0.2, b), (0.2, p)):
            if not math.isnan(v):
                ax.text(v * 1.05, yi + off, fmt_ratio(v), va="center", fontsize=8)
    ax.set_yticks(y, [f"{s}\n{c}" for s, c in zip(table["stage"], table["case"], strict=True)],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    vals = np.concatenate([base[~np.isnan(base)], peer[~np.isnan(peer)]])
    ax.set_xlim(min(0.5, vals.min() / 1.5) if vals.size else 0.5,
                max(2.0, vals.max() * 2.5) if vals.size else 2.0)
    ax.set_xlabel("speed-up of routerlib (time of the other / time of routerlib, x, log scale)")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.15 / max(n, 1)), ncol=1,
              frameon=False, fontsize=8)
    ax.figure.tight_layout()
    return ax


def target_verdicts(card: str, root: str | Path = RESULTS):
    """The issue's latency / bandwidth targets of the targets run (meta.targets): goal, measured,
    pass, with the source; an empty frame when the file is not there."""
    import pandas as pd

    p = result_path("targets", card, root)
    if p is None:
        return pd.DataFrame(columns=["target", "goal", "measured", "pass", "source"])
    rs = ResultSet.read(p)
    src = _source(p, rs).label()
    return pd.DataFrame([dict(target=t["target"], goal=f"{t['cmp']} {t['goal']}",
                              measured=t["measured"], passed=bool(t["pass"]), source=src)
                         for t in rs.meta.get("targets", [])])


def bench_rows(bench: str, card: str, root: str | Path = RESULTS,
               columns: tuple[str, ...] | None = None, **where: Any):
    """The rows of one result file (wide: a column per metric), filtered on config values,
    with the source beside; `columns`: keep those (the ones the file has) and the source.
    None when the file is not there yet."""
    from routerlib.bench.results import wide

    p = result_path(bench, card, root)
    if p is None:
        return None
    df = wide(p)
    for k, v in where.items():
        if k in df.columns:
            df = df[df[k] == v]
    if columns is not None:
        df = df[[c for c in columns if c in df.columns]]
    rs = ResultSet.read(p)
    return df.assign(source=_source(p, rs).label()).reset_index(drop=True)
