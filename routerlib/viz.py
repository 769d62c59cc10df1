"""Plots of routing and benchmark results. Every function returns a matplotlib Figure and never
calls plt.show(): figures are built with matplotlib.figure.Figure (no pyplot global state), so a
notebook shows the returned figure once and a script can fig.savefig(...) it.

Shape vocabulary: T tokens, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure

from routerlib.metrics import ExpertLoadTracker, RoutingStats

PIPELINE = ("gate", "route", "dispatch", "experts", "combine")


class _ShownFigure(Figure):
    """A Figure that draws itself in a notebook: figures made without pyplot have no display
    formatter until pyplot's inline backend loads, and would print `<Figure size ...>`."""

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.savefig(buf, format="png")
        return buf.getvalue()


def _figure(w: float = 7.0, h: float = 3.5, ncols: int = 1) -> tuple[Figure, list]:
    fig = _ShownFigure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, list(np.atleast_1d(axes))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def plot_expert_load(stats: RoutingStats | Sequence[int] | np.ndarray | torch.Tensor,
                     title: str | None = None, capacity: int | None = None) -> Figure:
    """Bar chart of the slots routed to each expert, the mean load as a dashed line, the capacity
    C as a red line when given (or taken from the stats); the slots kept are overlaid when some
    were dropped. stats: RoutingStats or a load vector [E]."""
    if isinstance(stats, RoutingStats):
        load, kept = stats.load, stats.kept
        capacity = stats.capacity if capacity is None else capacity
    else:
        load = _np(stats).astype(np.int64).reshape(-1)
        kept = load
    E = load.shape[0]
    fig, (ax,) = _figure(max(5.0, min(14.0, 0.12 * E + 4)), 3.2)
    x = np.arange(E)
    ax.bar(x, load, color="#9ecae1", label="routed", width=0.85)
    if (kept != load).any():
        ax.bar(x, kept, color="#3182bd", label="kept", width=0.85)
    mean = load.mean() if E else 0.0
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.1f}")
    if capacity is not None:
        ax.axhline(capacity, color="#d62728", lw=1.5, label=f"capacity {capacity}")
    ax.set_xlabel("expert")
    ax.set_ylabel("slots")
    ax.set_xlim(-0.6, E - 0.4)
    if title is None and isinstance(stats, RoutingStats):
        title = (f"imbalance {stats.imbalance:.2f}, entropy {stats.entropy:.3f}, "
                 f"drop rate {stats.drop_rate:.1%}")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small", loc="upper right")
    return fig


def plot_load_heatmap(history: pd.DataFrame | ExpertLoadTracker, by: str = "layer",
                      layer: int = 0, normalize: bool = True, title: str | None = None) -> Figure:
    """Heatmap of expert load from a tracker (or its history()).

    by="layer": layers x experts, summed over steps; by="step": steps x experts of one layer.
    normalize: show load / mean load of the row (1 = balanced; centred colour map)."""
    h = history.history() if isinstance(history, ExpertLoadTracker) else history
    if by == "layer":
        m = h.pivot_table(index="layer", columns="expert", values="load", aggfunc="sum")
    elif by == "step":
        m = h[h.layer == layer].pivot_table(index="step", columns="expert", values="load",
                                            aggfunc="sum")
    else:
        raise ValueError(f"by={by!r}: must be 'layer' or 'step'")
    if normalize:
        mean = m.mean(axis=1).replace(0, np.nan)
        m = m.div(mean, axis=0)
    fig, (ax,) = _figure(8.0, max(2.5, min(10.0, 0.3 * len(m) + 1.5)))
    kw = dict(cmap="RdBu_r", center=1.0) if normalize else dict(cmap="viridis")
    sns.heatmap(m, ax=ax, cbar_kws={"label": "load / mean" if normalize else "slots"}, **kw)
    ax.set_title(title or ("expert load per layer (sum over steps)" if by == "layer"
                           else f"expert load of layer {layer} per step"))
    return fig


def plot_assignment(topk_ids: torch.Tensor | np.ndarray, topk_weights: torch.Tensor | np.ndarray,
                    num_experts: int, max_tokens: int = 64, title: str | None = None) -> Figure:
    """Token -> expert heatmap: cell (t, e) holds the combine weight of token t on expert e
    (0 where not selected). topk_ids, topk_weights: [T, K]; the first max_tokens tokens."""
    ids = _np(topk_ids)[:max_tokens].astype(np.int64)
    w = _np(topk_weights)[:max_tokens].astype(np.float64)
    if ids.shape != w.shape or ids.ndim != 2:
        raise ValueError(f"topk_ids {ids.shape} and topk_weights {w.shape} must both be [T, K]")
    T = ids.shape[0]
    m = np.zeros((T, num_experts))
    np.add.at(m, (np.repeat(np.arange(T), ids.shape[1]), ids.reshape(-1)), w.reshape(-1))
    fig, (ax,) = _figure(max(5.0, min(14.0, 0.15 * num_experts + 3)),
                         max(3.0, min(12.0, 0.12 * T + 1.5)))
    sns.heatmap(m, ax=ax, cmap="mako_r", cbar_kws={"label": "weight"},
                mask=m == 0, linewidths=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    ax.set_title(title or f"assignment of {T} tokens (top-{ids.shape[1]})")
    return fig


def _time_col(df: pd.DataFrame) -> str:
    for c in ("median_us", "time_us"):
        if c in df.columns:
            return c
    raise ValueError("the frame needs a 'median_us' (sweep rows) or 'time_us' (profile) column")


def plot_stage_breakdown(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Stacked bars of the pipeline stage times (gate, route, dispatch, experts, combine) per
    config / T / backend, from sweep rows (median_us) or a profile frame (time_us)."""
    col = _time_col(df)
    d = df[df.stage.isin(PIPELINE) & df[col].notna()]
    if "mode" in d.columns:
        d = d[d["mode"] == "eager"]
    if d.empty:
        raise ValueError("no measured pipeline stage in the frame")
    keys = [k for k in ("config", "T", "backend") if k in d.columns]
    if "inputs" in d.columns and d["inputs"].nunique() > 1:
        keys.append("inputs")
    p = d.pivot_table(index=keys, columns="stage", values=col, aggfunc="median")
    if "backend" in keys and len(keys) > 1:
        # gate and experts run the same code on every backend and the sweep times them under
        # torch only: give the other backends' bars the torch time of the same case
        other = [k for k in keys if k != "backend"]
        p = p.reset_index()
        for st in ("gate", "experts"):
            if st in p.columns:
                ref = p.loc[p.backend == "torch", other + [st]].rename(columns={st: "_ref"})
                p = p.merge(ref, on=other, how="left")
                p[st] = p[st].fillna(p.pop("_ref"))
        p = p.set_index(keys)
    p = p[[s for s in PIPELINE if s in p.columns]]
    labels = ["\n".join(str(v) if n != "T" else f"T={v}" for v, n in
                        zip(idx if isinstance(idx, tuple) else (idx,), keys)) for idx in p.index]
    fig, (ax,) = _figure(max(6.0, min(18.0, 0.7 * len(p) + 3)), 4.0)
    bottom = np.zeros(len(p))
    colors = dict(zip(PIPELINE, sns.color_palette("tab10", len(PIPELINE))))
    for s in p.columns:
        v = p[s].fillna(0).to_numpy()
        ax.bar(range(len(p)), v, bottom=bottom, label=s, color=colors[s])
        bottom += v
    ax.set_xticks(range(len(p)), labels, fontsize="small")
    ax.set_ylabel("us per call (" + ("median" if col == "median_us" else "profiled") + ")")
    ax.legend(fontsize="small")
    ax.set_title(title or "time per stage")
    return fig


def plot_bench(df: pd.DataFrame, stage: str | None = None, config: str | None = None,
               roof_gbps: float | None = None, title: str | None = None,
               floor_us: float | None = None) -> Figure:
    """Left: time per call vs T per backend (log-log), with floor_us (e.g. the measured time of
    a one-kernel CUDA graph) dotted. Right: achieved GB/s vs T with the measured copy roof (from
    the rows' roof_copy_gbps, or roof_gbps). Filter with stage/config; with several stages left
    the lines are styled by stage, else by config."""
    d = df[df["median_us"].notna()].copy()
    if "mode" in d.columns:
        d["backend"] = np.where(d["mode"] == "graph", d["backend"] + " (graph)", d["backend"])
    if stage is not None:
        d = d[d.stage == stage]
    if config is not None:
        d = d[d.config == config]
    if d.empty:
        raise ValueError(f"no measured rows for stage={stage!r}, config={config!r}")
    style = "stage" if d.stage.nunique() > 1 else None
    if style is None and "config" in d.columns and d.config.nunique() > 1:
        style = "config"
    fig, axes = _figure(11.0, 4.0, ncols=2)
    sns.lineplot(d, x="T", y="median_us", hue="backend", style=style, marker="o", ax=axes[0],
                 errorbar=None)
    axes[0].set(xscale="log", yscale="log", xlabel="tokens T", ylabel="us per call (median)")
    if floor_us:
        axes[0].axhline(floor_us, color="tab:red", ls="-.", lw=1, label=f"floor {floor_us:.1f} us")
        lo, hi = axes[0].get_ylim()
        axes[0].set_ylim(min(lo, 0.7 * floor_us), hi)  # axhline does not widen the limits
        axes[0].legend(fontsize="small")
    sns.lineplot(d, x="T", y="gbps", hue="backend", style=style, marker="o", ax=axes[1],
                 errorbar=None, legend=False)
    if roof_gbps is None and "roof_copy_gbps" in d.columns and d.roof_copy_gbps.notna().any():
        roof_gbps = float(d.roof_copy_gbps.dropna().iloc[0])
    if roof_gbps:
        axes[1].axhline(roof_gbps, color="k", ls="--", lw=1, label=f"copy roof {roof_gbps:.0f}")
        axes[1].legend(fontsize="small")
    axes[1].set(xscale="log", xlabel="tokens T", ylabel="achieved GB/s")
    if title is None:
        parts = [p for p in (config, stage) if p]
        title = " / ".join(parts) if parts else "benchmark"
    fig.suptitle(title)
    return fig


def plot_token_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       slot_to_row: torch.Tensor, num_experts: int, tokens: Sequence[str],
                       capacity: int | None = None, title: str | None = None) -> Figure:
    """Left: token -> expert heatmap over a text (one row per token, labelled with the token),
    cell = combine weight of the slot, kept slots coloured and dropped slots marked with a red
    cross. Right: per-expert load, routed and kept, with the capacity line.
    topk_ids, topk_weights, slot_to_row: [T, S]; tokens: T labels."""
    ids = _np(topk_ids).astype(np.int64)
    w = _np(topk_weights).astype(np.float64)
    kept = _np(slot_to_row) >= 0
    T, S = ids.shape
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token labels for {T} tokens")
    rows = np.repeat(np.arange(T), S)
    m = np.full((T, num_experts), np.nan)
    m[rows[kept.reshape(-1)], ids.reshape(-1)[kept.reshape(-1)]] = w.reshape(-1)[kept.reshape(-1)]
    # expert choice lists every (token, expert) pair as a slot: only the picked ones are routed
    routed = kept | (ids.shape[1] != num_experts)
    drop = routed & ~kept
    fig = Figure(figsize=(min(16.0, 7.0 + 0.12 * num_experts), max(4.0, 0.2 * T + 1.2)),
                 layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
    sns.heatmap(m, ax=ax, cmap="mako_r", cbar_kws={"label": "combine weight"}, vmin=0.0,
                yticklabels=list(tokens), xticklabels=max(1, num_experts // 16))
    dr, dc = rows[drop.reshape(-1)], ids.reshape(-1)[drop.reshape(-1)]
    ax.scatter(dc + 0.5, dr + 0.5, marker="x", color="#d62728", s=30, label="dropped slot")
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    ax.tick_params(axis="y", labelsize=8)
    if len(dr):
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    load = np.bincount(ids[routed], minlength=num_experts)
    kept_load = np.bincount(ids[kept], minlength=num_experts)
    x = np.arange(num_experts)
    ax2.bar(x, load, color="#fcae91", label="routed", width=0.85)
    ax2.bar(x, kept_load, color="#3182bd", label="kept", width=0.85)
    if capacity is not None:
        ax2.axhline(capacity, color="#d62728", lw=1.5, label=f"capacity {capacity}")
    ax2.set_xlim(-0.6, num_experts - 0.4)
    ax2.set_xlabel("expert")
    ax2.set_ylabel("token-slots")
    ax2.legend(fontsize="small", loc="upper right")
    ax2.set_title("per-expert load")
    if title:
        fig.suptitle(title)
    return fig
