"""Routing metrics (RoutingStats, ExpertLoadTracker), the routing plots and the widget."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.metrics import ExpertLoadTracker, RoutingStats, routing_stats
from routerlib.router import Router
from routerlib.types import Selection


def _plan(ids: list[list[int]], E: int, capacity_factor: float | None = None,
          weights: list[list[float]] | None = None):
    t = torch.tensor(ids, dtype=torch.int32)
    w = torch.full(t.shape, 0.5) if weights is None else torch.tensor(weights)
    cfg = RouterConfig(num_experts=E, top_k=t.shape[1], capacity_factor=capacity_factor)
    sel = Selection(topk_ids=t, topk_weights=w)
    return ref.build_plan(sel, cfg), t


def test_stats_hand_checked_with_drops():
    # T=4, K=1, E=4: load [3, 1, 0, 0]; C = ceil(1.0 * 4 / 4) = 1, so expert 0 keeps 1 of 3
    plan, ids = _plan([[0], [0], [0], [1]], E=4, capacity_factor=1.0)
    s = routing_stats(plan, ids)
    assert s.load.tolist() == [3, 1, 0, 0]
    assert s.kept.tolist() == [1, 1, 0, 0]
    assert (s.num_tokens, s.num_slots, s.dropped, s.capacity) == (4, 4, 2, 1)
    assert s.drop_rate == pytest.approx(0.5)
    assert s.tokens_dropped == 2  # tokens 1 and 2 arrive after token 0 at expert 0
    assert s.imbalance == pytest.approx(3.0)  # max 3 / mean 1
    assert s.cv == pytest.approx(math.sqrt(1.5))  # population std of [3,1,0,0] is sqrt(1.5)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s.entropy == pytest.approx(h / math.log(4))
    assert s.empty_experts == 2


def test_stats_uniform_load():
    # every expert gets exactly 2 slots: the balanced extreme
    plan, ids = _plan([[0, 1], [2, 3], [1, 0], [3, 2]], E=4)
    s = RoutingStats.from_plan(plan, ids)
    assert s.load.tolist() == [2, 2, 2, 2]
    assert s.entropy == pytest.approx(1.0)
    assert s.imbalance == pytest.approx(1.0)
    assert s.cv == pytest.approx(0.0)
    assert (s.dropped, s.drop_rate, s.empty_experts, s.tokens_dropped) == (0, 0.0, 0, 0)


def test_stats_one_hot_expert():
    # every slot on expert 2 of 8: entropy 0, imbalance E
    plan, ids = _plan([[2]] * 5, E=8)
    s = RoutingStats.from_plan(plan)
    assert s.entropy == pytest.approx(0.0)
    assert s.imbalance == pytest.approx(8.0)
    assert s.empty_experts == 7


def test_from_topk_matches_from_plan_and_mismatch_raises():
    torch.manual_seed(1)
    logits = torch.randn(37, 6)
    cfg = RouterConfig(num_experts=6, top_k=2)
    sel = ref.select(logits, cfg)
    plan = ref.build_plan(sel, cfg)
    a, b = RoutingStats.from_plan(plan), RoutingStats.from_topk(sel.topk_ids, 6)
    assert a.load.tolist() == b.load.tolist()
    assert (a.imbalance, a.cv, a.entropy) == pytest.approx((b.imbalance, b.cv, b.entropy))
    other = torch.zeros_like(sel.topk_ids)
    with pytest.raises(ValueError, match="do not match"):
        RoutingStats.from_plan(plan, other)


def test_stats_from_router_output():
    cfg = RouterConfig(num_experts=8, top_k=2, capacity_factor=0.5)
    r = Router(16, cfg).eval()
    out = r(torch.randn(40, 16))
    s = RoutingStats.from_plan(out)
    assert s.num_slots == 80
    assert s.capacity == cfg.capacity(40) == 5
    assert int(s.kept.max()) <= 5
    assert s.dropped == int(out.plan.num_dropped())
    assert s.dropped > 0  # capacity 5 * 8 experts = 40 < 80 slots


def _counts_plan(counts: list[int], kept: list[int]):
    """A RoutingPlan stand-in with the two count vectors the tracker reads."""
    plan, _ = _plan([[0]], E=len(counts))
    plan.expert_counts = torch.tensor(counts, dtype=torch.int32)
    plan.kept_counts = torch.tensor(kept, dtype=torch.int32)
    return plan


def test_tracker_accumulates():
    tr = ExpertLoadTracker(num_layers=2, num_experts=3)
    for step in range(3):
        tr.update(0, _counts_plan([step, 1, 2], [step, 1, 2]))
        tr.update(1, _counts_plan([4, 0, 0], [2, 0, 0]))  # layer 1 drops 2 of 4 each step
    assert len(tr) == 6
    h = tr.history()
    assert list(h.columns) == ["step", "layer", "expert", "load", "kept", "dropped"]
    assert len(h) == 2 * 3 * 3
    l0 = h[h.layer == 0].sort_values(["step", "expert"])
    assert l0.load.tolist() == [0, 1, 2, 1, 1, 2, 2, 1, 2]
    assert sorted(h.step.unique().tolist()) == [0, 1, 2]
    assert h[h.layer == 1].dropped.sum() == 6
    s = tr.summary()
    assert s.loc[0, "steps"] == 3 and s.loc[1, "steps"] == 3
    assert s.loc[1, "drop_rate_mean"] == pytest.approx(0.5)
    assert s.loc[0, "drop_rate_mean"] == 0.0
    assert s.loc[1, "imbalance_mean"] == pytest.approx(3.0)  # [4,0,0]: max 4 / mean 4/3
    assert s.loc[1, "empty_experts_mean"] == 2
    assert s.loc[0, "slots"] == 3 + 4 + 5
    m = tr.load_matrix()
    assert m.loc[1].tolist() == [12, 0, 0]


def test_tracker_keeps_copies_and_validates():
    tr = ExpertLoadTracker(1, 3)
    plan = _counts_plan([1, 2, 3], [1, 2, 3])
    tr.update(0, plan)
    plan.expert_counts.fill_(9)  # e.g. a CUDA-graph buffer overwritten by the next replay
    assert tr.history().load.tolist() == [1, 2, 3]
    tr.update(0, plan, step=10)
    assert tr.history().step.tolist() == [0, 0, 0, 10, 10, 10]
    with pytest.raises(ValueError, match="layer=1"):
        tr.update(1, plan)
    with pytest.raises(ValueError, match="num_experts=4"):
        ExpertLoadTracker(1, 4).update(0, plan)
    assert ExpertLoadTracker(2, 3).history().empty


def test_plots_return_figures():
    from routerlib.viz import plot_assignment, plot_expert_load, plot_load_heatmap

    cfg = RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    sel = ref.select(torch.randn(64, 8), cfg)
    plan = ref.build_plan(sel, cfg)
    s = RoutingStats.from_plan(plan)
    fig = plot_expert_load(s)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    # capacity line and mean line are drawn at their values
    ys = sorted(line.get_ydata()[0] for line in ax.get_lines())
    assert ys == pytest.approx(sorted([s.load.mean(), plan.capacity]))
    assert isinstance(plot_expert_load(np.array([3, 1, 0, 4]), title="raw"), Figure)

    tr = ExpertLoadTracker(3, 8)
    for _ in range(4):
        for layer in range(3):
            tr.update(layer, plan)
    for by in ("layer", "step"):
        assert isinstance(plot_load_heatmap(tr, by=by), Figure)
    with pytest.raises(ValueError, match="by="):
        plot_load_heatmap(tr, by="expert")
    fig = plot_assignment(sel.topk_ids, sel.topk_weights, 8, max_tokens=16)
    assert isinstance(fig, Figure)


def test_widget_builds_and_reacts():
    pytest.importorskip("ipywidgets")
    from routerlib.widgets import routing_explorer

    ex = routing_explorer(num_experts=8, top_k=2, num_tokens=256, capacity_factor=1.0)
    assert ex.stats.num_experts == 8 and ex.stats.num_slots == 512
    png0, n0 = ex.image.value, ex.updates
    assert png0[:4] == b"\x89PNG"
    ex.controls["E"].value = 32
    assert ex.updates == n0 + 1
    assert ex.stats.num_experts == 32
    assert ex.image.value != png0
    # a strong skew under a tight capacity drops slots; dropless drops none
    ex.controls["zipf_s"].value = 2.0
    ex.controls["capacity_factor"].value = 0.5
    assert ex.stats.drop_rate > 0.3
    assert "drop rate" in ex.text.value
    ex.controls["dropless"].value = True
    assert ex.stats.drop_rate == 0.0 and ex.stats.capacity is None
    ex.controls["score_func"].value = "sigmoid"
    ex.controls["drop_policy"].value = "random"
    assert ex.cfg.score_func == "sigmoid" and ex.cfg.drop_policy == "random"
