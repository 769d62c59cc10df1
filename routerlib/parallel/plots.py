"""Figures of expert parallelism (notebook 05): bytes per link, predicted time against EP size,
what deduplication and an fp8 payload save, placement search, measured scaling."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from routerlib.parallel.simulator import Prediction


def plot_link_bytes(pred: Prediction, gpus_per_node: int, title: str) -> Figure:
    """Heatmap of dispatch + combine MB sent from rank i (rows) to rank j (columns)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.8))
    mb = (pred.dispatch_bytes + pred.combine_bytes).double().numpy() / 1e6
    sns.heatmap(mb, ax=ax, cmap="viridis", cbar_kws={"label": "MB sent i -> j (both ways)"})
    W = mb.shape[0]
    for b in range(gpus_per_node, W, gpus_per_node):  # node boundaries
        ax.axhline(b, color="white", lw=1.5)
        ax.axvline(b, color="white", lw=1.5)
    ax.set_xlabel("destination rank")
    ax.set_ylabel("source rank")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_time_vs_ep(df: pd.DataFrame) -> Figure:
    """Predicted layer time (us) against EP size, one panel a shape, a line per wire format."""
    shapes = list(dict.fromkeys(df["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 3.8), squeeze=False)
    d = df.assign(wire=df["payload"].map({"native": "bf16", "fp8": "fp8"})
                  + df["dedup"].map({True: " + dedup", False: " K copies"}))
    for ax, shape in zip(axes[0], shapes):
        s = d[d["shape"] == shape]
        sns.lineplot(data=s, x="world", y="t_layer_us", hue="wire", marker="o", ax=ax)
        sns.lineplot(data=s[s["payload"].eq("fp8") & s["dedup"]], x="world",
                     y="t_layer_overlap_us", color="black", ls="--", marker="x", ax=ax,
                     label="fp8 + dedup, chunked overlap")
        ax.set_xscale("log", base=2)
        worlds = sorted(set(s["world"]))
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.minorticks_off()
        ax.set_xlabel("EP size (GPUs)")
        ax.set_ylabel("predicted layer time (us)")
        ax.set_title(f"{shape}: {int(s['tokens'].iloc[0] // s['world'].iloc[0])} tokens a GPU")
    fig.tight_layout()
    return fig


def plot_wire_savings(df: pd.DataFrame) -> Figure:
    """Remote bytes per token (dispatch, combine) of each wire format, for one shape and size."""
    rows = []
    for _, r in df.iterrows():
        name = ("bf16" if r["payload"] == "native" else "fp8") + (" + dedup" if r["dedup"]
                                                                   else " K copies")
        rows += [{"wire": name, "direction": "dispatch", "KB": r["dispatch"] / 1e3},
                 {"wire": name, "direction": "combine", "KB": r["combine"] / 1e3}]
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    sns.barplot(data=pd.DataFrame(rows), x="wire", y="KB", hue="direction", ax=ax)
    ax.set_ylabel("KB leaving a GPU per token")
    ax.set_xlabel("")
    fig.tight_layout()
    return fig


def plot_placement(history: list[float], rows_before, rows_after) -> Figure:
    """Predicted layer time over the search, and expert rows per rank before / after."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = ["blocks", "LPT"] + [f"swap {i}" for i in range(1, len(history) - 1)]
    a.plot(range(len(history)), [h / 1e3 for h in history], marker="o")
    a.set_xticks(range(len(history)), labels, rotation=45, ha="right")
    a.set_ylabel("predicted layer time (ms)")
    a.set_title("placement search")
    W = len(rows_before)
    b.bar([r - 0.2 for r in range(W)], [v / 1e3 for v in rows_before], 0.4, label="blocks")
    b.bar([r + 0.2 for r in range(W)], [v / 1e3 for v in rows_after], 0.4, label="searched")
    b.set_xlabel("rank")
    b.set_ylabel("expert rows (thousands)")
    b.legend()
    b.set_title("load per rank")
    fig.tight_layout()
    return fig
