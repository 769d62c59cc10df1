"""The fast inference route: score + top-K + plan with no sort, in one to three launches.

  select.py, select_packed.py   top-K with few threads per token: the exact insertion into
                                register lists, or packed int32 keys sorted by a network
  ranks.py                      each slot's rank inside its tile of tokens, by counting
  place.py                      layout, the scan of the tile counts, the elementwise place
  kernels.py                    the kernels: select, scan, place, the one-launch route with grid
                                barriers, the route + dispatch in one launch (decode sizes)
  config.py                     RouteLaunch: the launch configuration, chosen once per shape
  launch.py, sync.py            the host side: cached launch plans, direct launches, barriers

Scope (`applies`): token choice, up to MAX_GROUPS groups (group-limited selection: a first pass
over each token's columns keeps its best groups, select.py _group_bits), K <= 8, E <= 512,
fp32/bf16/fp16 logits, no gradient and no loss sums needed (inference), not while torch.compile
traces. The priority and random drop policies rank every expert's slots by key: their plan is
kernels/plan.py's over the fast selection. Everything else takes the training path
(kernels/topk.py + kernels/plan.py). The results equal the reference's: the same ids, ranks and
rows, integer for integer; weights to fp32 rounding.
"""

from __future__ import annotations

import torch

from routerlib.config import RouterConfig
from routerlib.kernels.fast_route.config import RouteLaunch, launch_config
from routerlib.kernels.fast_route.launch import dispatch_in_one, route_dispatch_rows, route_rows

MAX_K = 8
MAX_E = 512
MAX_GROUPS = 32  # group limit: a token's kept groups are an int32 bitmask
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def applies(logits: torch.Tensor, cfg: RouterConfig, need_stats: bool) -> bool:
    """Whether the fast route computes this call (else the training path does)."""
    return (cfg.routing == "token_choice" and cfg.n_groups <= MAX_GROUPS
            and cfg.top_k <= MAX_K and cfg.num_experts <= MAX_E
            and logits.dtype in _DTYPES and logits.shape[0] >= 1 and not need_stats
            and not (torch.is_grad_enabled() and logits.requires_grad)
            and not torch.compiler.is_compiling())


__all__ = ["MAX_E", "MAX_K", "RouteLaunch", "applies", "dispatch_in_one", "launch_config",
           "route_dispatch_rows", "route_rows"]
