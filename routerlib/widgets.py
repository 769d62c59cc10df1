"""Interactive explorers for notebooks (ipywidgets, imported lazily).

routing_explorer(): sliders and menus for E, K, T, capacity factor (or dropless), drop policy,
input skew (Zipf exponent) and score function; every change recomputes the reference routing on
the CPU and redraws the load bar chart and the drop-rate line. The chart is rendered to PNG bytes
in an ipywidgets.Image, so the explorer builds and updates without a browser or a kernel (tests
drive it headless through its controls and read `explorer.stats`).
"""

from __future__ import annotations

import io

import torch

from routerlib import reference as ref
from routerlib.bench.inputs import InputSpec, make_logits
from routerlib.config import RouterConfig
from routerlib.metrics import RoutingStats


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


class RoutingExplorer:
    """The explorer's state: controls (dict of widgets), the current config and stats, and the
    widget to display (`.widget`, or display the explorer itself in a notebook)."""

    def __init__(self, num_experts: int = 16, top_k: int = 2, num_tokens: int = 512,
                 capacity_factor: float = 1.25, dropless: bool = False,
                 drop_policy: str = "position", zipf_s: float = 0.0,
                 score_func: str = "softmax", seed: int = 0):
        import ipywidgets as w  # lazy: routerlib itself does not need ipywidgets

        self.seed = seed
        style = {"description_width": "110px"}
        self.controls = {
            "E": w.IntSlider(value=num_experts, min=2, max=256, description="experts E",
                             style=style),
            "K": w.IntSlider(value=top_k, min=1, max=8, description="top-k K", style=style),
            "T": w.IntSlider(value=num_tokens, min=8, max=8192, step=8, description="tokens T",
                             style=style),
            "capacity_factor": w.FloatSlider(value=capacity_factor, min=0.25, max=4.0,
                                             step=0.05, description="capacity factor",
                                             style=style),
            "dropless": w.Checkbox(value=dropless, description="dropless"),
            "drop_policy": w.Dropdown(options=["position", "priority", "random"],
                                      value=drop_policy, description="drop policy",
                                      style=style),
            "zipf_s": w.FloatSlider(value=zipf_s, min=0.0, max=2.5, step=0.05,
                                    description="skew (zipf s)", style=style),
            "score_func": w.Dropdown(options=["softmax", "sigmoid"], value=score_func,
                                     description="score func", style=style),
        }
        self.text = w.HTML()
        self.image = w.Image(format="png")
        self.cfg: RouterConfig | None = None
        self.stats: RoutingStats | None = None
        self.error: str | None = None
        self.updates = 0
        for c in self.controls.values():
            c.observe(self._on_change, names="value")
        left = w.VBox(list(self.controls.values()))
        self.widget = w.VBox([w.HBox([left, self.image]), self.text])
        self.update()

    def _on_change(self, change) -> None:
        self.update()

    def values(self) -> dict:
        return {k: c.value for k, c in self.controls.items()}

    def update(self) -> None:
        """Recompute the routing from the controls and redraw (called on every change)."""
        from routerlib.viz import plot_expert_load

        v = self.values()
        E, K, T = int(v["E"]), int(v["K"]), int(v["T"])
        K = min(K, E)
        try:
            cfg = RouterConfig(num_experts=E, top_k=K, score_func=v["score_func"],
                               renormalize=True,
                               capacity_factor=None if v["dropless"] else v["capacity_factor"],
                               drop_policy=v["drop_policy"])
        except ValueError as e:
            self.error = str(e)
            self.text.value = f"<b>invalid:</b> {e}"
            return
        logits = make_logits(InputSpec("zipf", zipf_s=v["zipf_s"]), T, E, seed=self.seed)
        priority = None
        if cfg.drop_policy == "random":  # build_plan wants the keys even when dropless
            g = torch.Generator().manual_seed(self.seed + 3)
            priority = torch.rand(T, K, generator=g)
        sel = ref.select(logits, cfg)
        plan = ref.build_plan(sel, cfg, priority)
        self.cfg, self.error = cfg, None
        self.stats = RoutingStats.from_plan(plan, sel.topk_ids)
        s = self.stats
        cap = "dropless" if cfg.dropless else f"C = {plan.capacity}"
        self.text.value = (f"<b>drop rate {s.drop_rate:.1%}</b> ({s.dropped} of {s.num_slots} "
                           f"slots; {s.tokens_dropped} tokens lose every slot) &middot; {cap} "
                           f"&middot; imbalance {s.imbalance:.2f} &middot; CV {s.cv:.2f} "
                           f"&middot; entropy {s.entropy:.3f} &middot; empty experts "
                           f"{s.empty_experts}")
        fig = plot_expert_load(s, title=f"E={E}, K={K}, T={T}, {cfg.score_func}, "
                                        f"zipf s={v['zipf_s']:g}")
        self.image.value = _png(fig)
        self.updates += 1

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def routing_explorer(**kwargs) -> RoutingExplorer:
    """Build the routing explorer (see RoutingExplorer for the starting values)."""
    return RoutingExplorer(**kwargs)
