"""Triton kernels for MoE routing, one module per op (kernel + launcher + autograd + custom op):

  topk.py      fused score + (group-limited) top-K + weights + loss statistics, and its backward
  plan.py      sort-free routing plan: histogram, offsets, ranks, capacity dropping, padding
  dispatch.py  gather tokens into expert-major rows (backward: a deterministic gather-sum)
  combine.py   weighted K-way sum back to tokens in fp32 (backward: scatter dual + weight grads)
  route_small.py  decode sizes: score + top-K + plan in one launch (opt-in: ROUTERLIB_SMALL_ROUTE=1)
  route_fused.py  any size: top-K with the plan's counting sort folded in, 3 launches, no sort
                  (opt-in: ROUTERLIB_FUSED_ROUTE=1)

Every op computes exactly what routerlib.reference computes; tests compare them.
On a machine without a GPU they run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from routerlib import reference as ref
from routerlib.config import RouterConfig

# Re-exported eagerly: importing a submodule binds the package attribute of its name (dispatch,
# combine) to the module, which would shadow a lazily importing wrapper after its first call.
from routerlib.kernels.combine import combine as combine
from routerlib.kernels.dispatch import dispatch as dispatch
from routerlib.types import RoutingPlan, Selection


def route(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
          priority: torch.Tensor | None = None) -> tuple[Selection, RoutingPlan]:
    """Triton route: fused top-K then the sort-free plan. Expert choice selects with the reference
    (a column top-C over tokens) and plans with it too."""
    ref.check_logits(logits, cfg)
    ref.gating.check_bias(bias, logits, cfg)
    if cfg.routing == "expert_choice":
        sel = ref.select(logits, cfg, bias)
        return sel, ref.build_plan(sel, cfg, priority)
    from routerlib.kernels import route_fused, route_small
    from routerlib.kernels.plan import build_plan
    from routerlib.kernels.topk import fused_topk

    if route_small.enabled() and route_small.applies(logits, cfg):
        return route_small.route_small(logits, cfg, bias)  # decode sizes: one launch
    if route_fused.enabled() and route_fused.applies(logits, cfg):
        return route_fused.route_fused(logits, cfg, bias)  # three launches, no sort

    sel = fused_topk(logits, cfg, bias)
    plan = build_plan(sel.topk_ids, sel.topk_weights, cfg, priority)
    return sel, plan

