"""Interactive explorers for notebooks (ipywidgets, imported lazily).

routing_explorer(): sliders and menus for E, K, T, capacity factor (or dropless), drop policy,
input skew (Zipf exponent) and score function; every change recomputes the reference routing on
the CPU and redraws the load bar chart and the drop-rate line.

text_routing_explorer(): the routing of a language model (the trained MoE LM, or a toy model
labelled so) over a passage of the real validation text: choose the layer, the passage, the
strategy (token or expert choice), capacity factor (or dropless), K, precision (fp32/bf16) and
backend; see the token -> expert heatmap with the tokens as labels, the per-expert load, the
dropped slots and the drop rate.

Charts are rendered to PNG bytes in an ipywidgets.Image, so the explorers build and update
without a browser or a kernel (tests drive them headless through their controls and read
`explorer.stats`).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os

import torch

from routerlib import ops
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


def validation_passages(num: int = 6, length: int = 40, seed: int = 0
                        ) -> dict[str, torch.Tensor]:
    """{name: [length] long}: passages of the validation text (routerlib.models.data), each
    starting after a line break (seeded positions); named by their first words."""
    from routerlib.models.data import load_corpus, token_pieces

    val = torch.from_numpy(load_corpus().val.astype("int64"))
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    while len(out) < num:
        start = int(torch.randint(0, len(val) - 4 * length, (1,), generator=g))
        pieces = token_pieces(val[start:start + 2 * length].tolist())
        nl = next((i for i, p in enumerate(pieces) if p.endswith("\n")), 0) + 1
        ids = val[start + nl:start + nl + length]
        name = "".join(token_pieces(ids[:8].tolist())).strip().replace("\n", " ")[:32]
        out.setdefault(f"{len(out) + 1}. {name}", ids)
    return out


def token_labels(ids: torch.Tensor) -> list[str]:
    """Printable labels of token ids (newlines and tabs escaped, leading spaces shown as '·')."""
    from routerlib.models.data import token_pieces

    labels = []
    for p in token_pieces(ids.tolist()):
        p = p.replace("\n", "\\n").replace("\t", "\\t")
        stripped = p.lstrip(" ")
        labels.append("·" * (len(p) - len(stripped)) + stripped or "·")
    return labels


def _backends() -> list[str]:
    """triton where its kernels can run: a GPU, or the interpreter (TRITON_INTERPRET=1)."""
    ok = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    return ["torch", "triton"] if ok else ["torch"]


class TextRoutingExplorer:
    """Routing of a language model's MoE layers over passages of text, re-routed with the
    chosen strategy, capacity factor, K, precision and backend.

    model: a routerlib.models.MoETransformer (its forward returns each MoE layer's router
    logits); label: what the model is (e.g. "trained, step 3000" or "toy-untrained");
    passages: {name: [S] long token ids}."""

    def __init__(self, model, passages: dict[str, torch.Tensor], label: str = "",
                 layer: int = 0, strategy: str = "token_choice",
                 capacity_factor: float = 1.0, dropless: bool = False, top_k: int | None = None,
                 precision: str = "fp32", backend: str = "torch"):
        import ipywidgets as w

        if not passages:
            raise ValueError("passages is empty: give at least one {name: token ids}")
        self.model, self.label, self.passages = model.eval(), label, passages
        self.base_cfg: RouterConfig = model.cfg.router
        self.num_layers = len(model.moe_layers)
        E = self.base_cfg.num_experts
        style = {"description_width": "110px"}
        self.controls = {
            "layer": w.IntSlider(value=layer, min=0, max=self.num_layers - 1,
                                 description="MoE layer", style=style),
            "passage": w.Dropdown(options=list(passages), description="passage", style=style),
            "strategy": w.Dropdown(options=["token_choice", "expert_choice"], value=strategy,
                                   description="strategy", style=style),
            "capacity_factor": w.FloatSlider(value=capacity_factor, min=0.25, max=4.0,
                                             step=0.05, description="capacity factor",
                                             style=style),
            "dropless": w.Checkbox(value=dropless, description="dropless (token choice)"),
            "K": w.IntSlider(value=top_k or self.base_cfg.top_k, min=1, max=E,
                             description="top-k K", style=style),
            "precision": w.ToggleButtons(options=["fp32", "bf16"], value=precision,
                                         description="precision", style=style),
            "backend": w.ToggleButtons(options=_backends(), value=backend,
                                       description="backend", style=style),
        }
        self.text = w.HTML()
        self.image = w.Image(format="png")
        self._logits: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._models: dict[str, object] = {"fp32": self.model}
        self.cfg: RouterConfig | None = None
        self.stats: RoutingStats | None = None
        self.error: str | None = None
        self.updates = 0
        for c in self.controls.values():
            c.observe(self._on_change, names="value")
        head = w.HTML(f"<b>{label}</b>") if label else w.HTML()
        self.widget = w.VBox([head, w.HBox([w.VBox(list(self.controls.values())), self.text]),
                              self.image])
        self.update()

    def _on_change(self, change) -> None:
        self.update()

    def values(self) -> dict:
        return {k: c.value for k, c in self.controls.items()}

    @torch.no_grad()
    def layer_logits(self, passage: str, precision: str) -> list[torch.Tensor]:
        """[S, E] router logits of every MoE layer for one passage (cached), the model run in
        fp32 or bf16."""
        key = (passage, precision)
        if key not in self._logits:
            if precision not in self._models:
                self._models[precision] = copy.deepcopy(self.model).to(torch.bfloat16)
            m = self._models[precision]
            device = next(m.parameters()).device
            out = m(self.passages[passage].view(1, -1).to(device))
            self._logits[key] = [r.logits.detach() for r in out.router]
        return self._logits[key]

    def update(self) -> None:
        """Re-route the chosen layer's logits with the controls' settings and redraw."""
        from routerlib.viz import plot_token_routing

        v = self.values()
        ec = v["strategy"] == "expert_choice"
        try:
            cfg = dataclasses.replace(
                self.base_cfg, routing=v["strategy"], top_k=int(v["K"]),
                capacity_factor=None if v["dropless"] and not ec else v["capacity_factor"],
                n_groups=1 if ec else self.base_cfg.n_groups,
                topk_groups=1 if ec else self.base_cfg.topk_groups,
                softmax_after_topk=False if ec else self.base_cfg.softmax_after_topk,
                drop_policy="position" if self.base_cfg.drop_policy == "random"
                else self.base_cfg.drop_policy)
        except ValueError as e:
            self.error = str(e)
            self.text.value = f"<b>invalid:</b> {e}"
            return
        layer = int(v["layer"])
        logits = self.layer_logits(v["passage"], v["precision"])[layer]  # [S, E]
        bias = self.model.moe_layers[layer].router.expert_bias
        bias = None if bias is None else bias.to(logits.device)
        sel, plan = ops.route(logits, cfg, bias, None, v["backend"], need_stats=False)
        self.cfg, self.error = cfg, None
        self.stats = RoutingStats.from_plan(plan)
        s = self.stats
        cap = "dropless" if cfg.dropless else f"C = {plan.capacity}"
        self.text.value = (f"<b>drop rate {s.drop_rate:.1%}</b><br>{s.dropped} of "
                           f"{s.num_slots} slots dropped; {s.tokens_dropped} tokens lose every "
                           f"slot<br>{cap} &middot; imbalance {s.imbalance:.2f} &middot; "
                           f"empty experts {s.empty_experts}")
        ids = self.passages[v["passage"]]
        fig = plot_token_routing(sel.topk_ids, sel.topk_weights, plan.slot_to_row,
                                 cfg.num_experts, token_labels(ids), plan.capacity,
                                 title=f"layer {layer}, {v['strategy']}, K={cfg.top_k}, {cap}, "
                                       f"{v['precision']}, {v['backend']}: drop rate "
                                       f"{s.drop_rate:.1%}")
        self.image.value = _png(fig)
        self.updates += 1

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def text_routing_explorer(model=None, results: str = "results", num_passages: int = 6,
                          length: int = 40, **kwargs) -> TextRoutingExplorer:
    """The explorer over the trained LM (the newest model.pt under `results`; else a random toy
    model, labelled "toy-untrained") and passages of the validation text."""
    label = kwargs.pop("label", "")
    if model is None:
        from routerlib.bench.inference import find_checkpoint, load_lm

        model, label = load_lm(find_checkpoint(results))
    return TextRoutingExplorer(model, validation_passages(num_passages, length),
                               label=label or "model", **kwargs)
