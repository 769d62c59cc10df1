"""Figures of the load-balancing study, drawn from its files (balance.json and
balance_history.npz, see routerlib.models.study). Each returns a matplotlib Figure.

Shape legend: N steps, L MoE layers, E experts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

History = dict[str, dict[str, np.ndarray]]


def _ema(x: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    acc = float(x[0])
    for i, v in enumerate(x):
        acc = alpha * float(v) + (1 - alpha) * acc
        out[i] = acc
    return out


def _colors(names: list[str]) -> dict[str, tuple]:
    return dict(zip(names, sns.color_palette("husl", len(names))))


def plot_losses(hist: History, tokens_per_step: int, names: list[str] | None = None) -> Figure:
    """Training cross-entropy (smoothed) and validation loss against tokens seen, per strategy."""
    names = names or list(hist)
    colors = _colors(names)
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_tr, ax_val = fig.subplots(1, 2)
    for n in names:
        h = hist[n]
        steps = np.arange(len(h["ce"]))
        ax_tr.plot((steps + 1) * tokens_per_step / 1e6, _ema(h["ce"]), color=colors[n], lw=1.2,
                   label=n)
        ax_val.plot((h["eval_step"] + 1) * tokens_per_step / 1e6, h["val_loss"], "o-",
                    color=colors[n], lw=1.2, ms=3, label=n)
    ax_tr.set(xlabel="tokens seen (millions)", ylabel="training cross-entropy (nats, EMA 0.1)",
              title="training loss")
    ax_val.set(xlabel="tokens seen (millions)", ylabel="validation loss (nats)",
               title="validation loss")
    ax_val.legend(fontsize=7, ncol=2, loc="upper right")
    return fig


def plot_load_heatmaps(hist: History, strategy: str, bins: int = 60) -> Figure:
    """Per-expert load over training, one heatmap per layer: each cell is an expert's share of
    the slots over a stretch of steps, divided by the uniform share 1/E (1 = balanced)."""
    load = hist[strategy]["load"].astype(np.float64)  # [N, L, E]
    N, L, E = load.shape
    edges = np.linspace(0, N, min(bins, N) + 1).astype(int)
    fig = Figure(figsize=(3.2 * L + 1, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, L, sharey=True))
    vmax = 4.0
    for layer, ax in enumerate(axes):
        chunks = [load[a:b, layer].sum(0) for a, b in zip(edges[:-1], edges[1:])]
        share = np.stack(chunks) / np.maximum(np.stack(chunks).sum(1, keepdims=True), 1) * E
        im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=vmax,
                       extent=(0, N, -0.5, E - 0.5), interpolation="nearest")
        ax.set(title=f"layer {layer}", xlabel="training step")
    axes[0].set_ylabel("expert")
    fig.colorbar(im, ax=list(axes), label=f"load / uniform load (clipped at {vmax:g})")
    fig.suptitle(f"per-expert load over training: {strategy}")
    return fig


def plot_routing_over_steps(hist: History, metric: str = "imbalance",
                            names: list[str] | None = None, ylabel: str | None = None) -> Figure:
    """A routing metric (averaged over layers, smoothed) against the step, per strategy."""
    names = names or list(hist)
    colors = _colors(names)
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for n in names:
        y = hist[n][metric].astype(np.float64).mean(1)
        ax.plot(np.arange(len(y)), _ema(y), color=colors[n], lw=1.2, label=n)
    ax.set(xlabel="training step", ylabel=ylabel or f"{metric} (mean over layers, EMA 0.1)")
    ax.legend(fontsize=7, ncol=2)
    return fig


_BARS = [("val_loss", "validation loss (nats)"), ("imbalance", "max / mean load"),
         ("cv", "coefficient of variation"), ("drop_rate", "dropped slots (fraction)"),
         ("tokens_unrouted", "tokens no expert saw (fraction)"),
         ("dead_experts", "dead experts per layer"), ("step_time_ms", "step time (ms)")]


def plot_summary(summary: pd.DataFrame) -> Figure:
    """One bar chart per metric of balance.json, strategies on the y axis (last 50 steps for the
    routing metrics, median step time)."""
    cols = [(m, lab) for m, lab in _BARS if m in summary.columns]
    fig = Figure(figsize=(3.0 * len(cols), 0.28 * len(summary) + 1.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(cols), sharey=True))
    names = list(summary.index)
    pal = _colors(names)
    for ax, (m, lab) in zip(axes, cols):
        ax.barh(names, summary[m].to_numpy(), color=[pal[n] for n in names])
        ax.set(xlabel=lab)
        ax.invert_yaxis()
        if m == "val_loss":
            lo, hi = summary[m].min(), summary[m].max()
            ax.set_xlim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    return fig


def plot_trace_load(load: np.ndarray, title: str = "") -> Figure:
    """load [L, E]: each layer's slots per expert (sorted, as a share of the uniform load)."""
    L, E = load.shape
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    for layer in range(L):
        share = np.sort(load[layer])[::-1] / max(load[layer].sum(), 1) * E
        ax.plot(np.arange(E), share, "o-", ms=3, label=f"layer {layer}")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="uniform")
    ax.set(xlabel="expert rank (most loaded first)", ylabel="load / uniform load", title=title)
    ax.legend(fontsize=8)
    return fig
