"""The MoE experts in readable PyTorch: dispatch, one SwiGLU per expert, weighted combine.

    y[t] = sum_j w[t, j] * SwiGLU_e(x[t])  over kept slots j (e = the slot's expert)
    SwiGLU_e(x) = (silu(x @ Wg_e) * (x @ Wu_e)) @ Wd_e,  w_gate_up[e] = [Wg_e | Wu_e]  [D, 2F]

Everything in fp32 (the contract the fused kernels are compared with); autograd gives the
backward. A host loop over experts: clear, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routerlib.reference.dispatch import combine, dispatch
from routerlib.types import RoutingPlan


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [N, D], w_gate_up [D, 2F], w_down [F, D] -> [N, D]."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def experts(x: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, w_gate_up: torch.Tensor,
            w_down: torch.Tensor) -> torch.Tensor:
    """x [T, D], weights [T, S], w_gate_up [E, D, 2F], w_down [E, F, D] -> y [T, D] in x's dtype,
    computed in fp32."""
    rows = dispatch(x.float(), plan)  # [R, D] expert-major copies of the tokens
    out = torch.zeros_like(rows)  # [R, D]
    starts = plan.expert_offsets.tolist()
    counts = plan.kept_counts.tolist()
    # unbind: the backward stacks the experts' gradients once (indexing w[e] would allocate a
    # full-size gradient per expert)
    for lo, n, wgu, wd in zip(starts, counts, w_gate_up.unbind(0), w_down.unbind(0)):
        if n:
            out[lo:lo + n] = swiglu(rows[lo:lo + n], wgu.float(), wd.float())
    return combine(out, plan, weights.float()).to(x.dtype)  # [T, D]
