"""Triton kernels for MoE routing, one module per op (kernel + launcher + autograd + custom op):

  topk.py      fused score + (group-limited) top-K + weights + loss statistics, and its backward
  plan.py      sort-free routing plan: histogram, offsets, ranks, capacity dropping, padding
               (with topk.py: the training path, every router and drop policy)
  fast_route/  the fast inference route (score + top-K + plan in one to three launches) and the
               route + dispatch in one launch at decode sizes
  dispatch.py  gather tokens into expert-major rows (backward: a deterministic gather-sum)
  combine.py   weighted K-way sum back to tokens in fp32 (backward: scatter dual + weight grads)
  common.py    helpers every kernel shares

Every op computes exactly what routerlib.reference computes; tests compare them.
On a machine without a GPU they run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from routerlib import reference as ref
from routerlib.config import RouterConfig

# the inference route's package is fast_route/, not route/: route() below would shadow it
from routerlib.kernels import fast_route as fast

# Re-exported eagerly: importing a submodule binds the package attribute of its name (dispatch,
# combine) to the module, which would shadow a lazily importing wrapper after its first call.
from routerlib.kernels.combine import combine as combine
from routerlib.kernels.dispatch import check_device, check_float
from routerlib.kernels.dispatch import dispatch as dispatch
from routerlib.kernels.plan import build_plan
from routerlib.kernels.topk import fused_topk
from routerlib.types import RoutingPlan, Selection


def route(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
          priority: torch.Tensor | None = None, need_stats: bool | None = None,
          launch: fast.RouteLaunch | None = None) -> tuple[Selection, RoutingPlan]:
    """Triton route: fused top-K then the sort-free plan. Expert choice selects with the reference
    (a column top-C over tokens) and plans with it too.

    need_stats: whether Selection.prob_sum / zsq_sum (the loss sums) must be computed; None means
    when autograd records (training). Without them, the fast route (fast_route/) runs where it
    applies, and the sums come back None. launch: the fast route's launch configuration
    (default: route.launch_config's choice for the shape)."""
    ref.check_logits(logits, cfg)
    ref.gating.check_bias(bias, logits, cfg)
    if cfg.routing == "expert_choice":  # each expert's top-C tokens: kernels/expert_choice.py
        from routerlib.kernels.expert_choice import expert_choice

        return expert_choice(logits, cfg, bias)
    if need_stats is None:
        need_stats = torch.is_grad_enabled() and logits.requires_grad
    if fast.applies(logits, cfg, need_stats):
        return fast.route_rows(logits, cfg, bias, launch, priority)

    sel = fused_topk(logits, cfg, bias)
    plan = build_plan(sel.topk_ids, sel.topk_weights, cfg, priority)
    return sel, plan



def route_dispatch(logits: torch.Tensor, x: torch.Tensor, cfg: RouterConfig,
                   bias: torch.Tensor | None = None, priority: torch.Tensor | None = None,
                   need_stats: bool | None = None, launch: fast.RouteLaunch | None = None
                   ) -> tuple[Selection, RoutingPlan, torch.Tensor]:
    """route(logits, ...) then dispatch(x, plan): (selection, plan, rows [R, D]). At decode sizes
    of the fast route (inference, x needing no gradient, T <= 16 by default) the dispatch runs
    inside the route's launch, every program planning all tokens itself; otherwise the two ops
    one after the other."""
    if x.dim() != 2 or x.shape[0] != logits.shape[0]:
        raise ValueError(f"x must be [T, D] with T = {logits.shape[0]} (the logits' rows), got "
                         f"shape {tuple(x.shape)}")
    if x.device != logits.device:
        raise ValueError(f"x is on {x.device} but the logits are on {logits.device}")
    check_float(x, "x")
    check_device(x, "x")
    if need_stats is None:
        need_stats = torch.is_grad_enabled() and logits.requires_grad
    if (logits.dim() == 2 and not (torch.is_grad_enabled() and x.requires_grad)
            and fast.dispatch_in_one(logits.shape[0], x.shape[1], launch)):
        ref.check_logits(logits, cfg)
        ref.gating.check_bias(bias, logits, cfg)
        if fast.applies(logits, cfg, need_stats) and cfg.drop_policy == "position":
            return fast.route_dispatch_rows(logits, x, cfg, bias, launch)
    sel, plan = route(logits, cfg, bias, priority, need_stats, launch)
    return sel, plan, dispatch(x, plan)
