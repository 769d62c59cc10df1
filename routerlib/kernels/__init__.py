"""Triton kernels for MoE routing, one module per op (kernel + launcher + autograd + custom op):

  topk.py      fused score + (group-limited) top-K + weights + loss statistics, and its backward
  plan.py      sort-free routing plan: histogram, offsets, ranks, capacity dropping, padding
  dispatch.py  gather tokens into expert-major rows (backward: a deterministic gather-sum)
  combine.py   weighted K-way sum back to tokens in fp32 (backward: scatter dual + weight grads)
  route_rows.py   the fast inference route: top-K with few threads per token and each slot's
                  rank inside its tile in the same pass, then a tile scan and an elementwise
                  place: 3 launches (2 at decode sizes, 1 when T fits a tile), or the same in
                  one cooperative launch with grid barriers (eager calls); the default where it
                  applies (ROUTERLIB_ROW_ROUTE=0 switches it off)
  _route_dispatch_kernels.py   the route and the dispatch in one launch up to 16 tokens
                  (route_dispatch below; every program plans all tokens itself)

Every op computes exactly what routerlib.reference computes; tests compare them.
On a machine without a GPU they run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.kernels import route_rows

# Re-exported eagerly: importing a submodule binds the package attribute of its name (dispatch,
# combine) to the module, which would shadow a lazily importing wrapper after its first call.
from routerlib.kernels.combine import combine as combine
from routerlib.kernels.dispatch import check_device, check_float
from routerlib.kernels.dispatch import dispatch as dispatch
from routerlib.kernels.plan import build_plan
from routerlib.kernels.topk import fused_topk
from routerlib.types import RoutingPlan, Selection


def route(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
          priority: torch.Tensor | None = None, need_stats: bool | None = None
          ) -> tuple[Selection, RoutingPlan]:
    """Triton route: fused top-K then the sort-free plan. Expert choice selects with the reference
    (a column top-C over tokens) and plans with it too.

    need_stats: whether Selection.prob_sum / zsq_sum (the loss sums) must be computed; None means
    when autograd records (training). Without them, the row-wise route (route_rows.py) runs where
    it applies, and the sums come back None."""
    ref.check_logits(logits, cfg)
    ref.gating.check_bias(bias, logits, cfg)
    if cfg.routing == "expert_choice":  # each expert's top-C tokens: kernels/expert_choice.py
        from routerlib.kernels.expert_choice import expert_choice

        return expert_choice(logits, cfg, bias)
    if need_stats is None:
        need_stats = torch.is_grad_enabled() and logits.requires_grad
    if route_rows.enabled() and route_rows.applies(logits, cfg, need_stats):
        return route_rows.route_rows(logits, cfg, bias)

    sel = fused_topk(logits, cfg, bias)
    plan = build_plan(sel.topk_ids, sel.topk_weights, cfg, priority)
    return sel, plan



def route_dispatch(logits: torch.Tensor, x: torch.Tensor, cfg: RouterConfig,
                   bias: torch.Tensor | None = None, priority: torch.Tensor | None = None,
                   need_stats: bool | None = None
                   ) -> tuple[Selection, RoutingPlan, torch.Tensor]:
    """route(logits, ...) then dispatch(x, plan): (selection, plan, rows [R, D]). At decode sizes
    of the row-wise route (route_rows.dispatch_mode; inference, x needing no gradient) the
    dispatch runs inside the route's launch: T <= 16 in one launch, every program planning all
    tokens itself (_route_dispatch_kernels.py); otherwise the two ops one after the other."""
    if x.dim() != 2 or x.shape[0] != logits.shape[0]:
        raise ValueError(f"x must be [T, D] with T = {logits.shape[0]} (the logits' rows), got "
                         f"shape {tuple(x.shape)}")
    if x.device != logits.device:
        raise ValueError(f"x is on {x.device} but the logits are on {logits.device}")
    check_float(x, "x")
    check_device(x, "x")
    if need_stats is None:
        need_stats = torch.is_grad_enabled() and logits.requires_grad
    mode = None
    if (logits.dim() == 2 and not (torch.is_grad_enabled() and x.requires_grad)
            and route_rows.enabled()):
        mode = route_rows.dispatch_mode(logits, x, cfg)
    if mode is not None:
        ref.check_logits(logits, cfg)
        ref.gating.check_bias(bias, logits, cfg)
        if route_rows.applies(logits, cfg, need_stats):
            return route_rows.route_dispatch_rows(logits, x, cfg, bias, mode)
    sel, plan = route(logits, cfg, bias, priority, need_stats)
    return sel, plan, dispatch(x, plan)
