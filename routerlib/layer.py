"""MoELayer: router + E SwiGLU experts + dispatch/combine, an nn.Module that drops in for an MLP.

Three expert paths compute the same thing (MoEConfig.expert_path):
  fused    the Triton kernels of routerlib.kernels.experts: the up GEMM reads the tokens through
           the plan, the down GEMM's epilogue applies the combine weights, no dispatched copy
           (the default with backend="triton");
  batched  dispatch, one grouped GEMM per projection over the expert-major buffer
           (torch._grouped_mm / bmm), combine (the default with backend="torch");
  loop     dispatch, one matmul chain per expert over its rows, combine: readable, for comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routerlib import ops
from routerlib.config import MoEConfig
from routerlib.router import Router
from routerlib.types import RouterOutput, RoutingPlan


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [N, D], w_gate_up [D, 2F], w_down [F, D] -> [N, D]."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch._grouped_mm wants bf16 and 16-byte aligned strides (CUDA sm90, or the CPU fallback).
    return (hasattr(torch, "_grouped_mm") and a.dtype == b.dtype == torch.bfloat16
            and a.shape[-1] * 2 % 16 == 0 and b.shape[-1] * 2 % 16 == 0)


class SwiGLUExperts(nn.Module):
    """E experts, each SwiGLU(D -> F -> D). Weights: w_gate_up [E, D, 2F], w_down [E, F, D]."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        E, D, Fw = num_experts, hidden_size, ffn_size
        self.w_gate_up = nn.Parameter(torch.empty(E, D, 2 * Fw, device=device, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E, Fw, D, device=device, dtype=dtype))
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(D))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(Fw))

    def forward_loop(self, rows: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """rows [R, D] expert-major -> [R, D]; one SwiGLU per expert segment (a host sync)."""
        out = torch.zeros_like(rows)
        offsets = plan.expert_offsets.tolist()
        for e in range(self.w_gate_up.shape[0]):
            lo, hi = offsets[e], offsets[e + 1]
            if hi > lo:
                out[lo:hi] = swiglu(rows[lo:hi], self.w_gate_up[e], self.w_down[e])
        return out

    def forward_batched(self, rows: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """rows [R, D] -> [R, D] with grouped GEMMs and no host sync (capacity: a bmm over
        [E, C, D]; ragged: torch._grouped_mm over the offsets)."""
        E = self.w_gate_up.shape[0]
        if plan.capacity is not None:
            x = rows.view(E, plan.capacity, -1)  # [E, C, D]
            gate, up = torch.bmm(x, self.w_gate_up).chunk(2, dim=-1)
            return torch.bmm(F.silu(gate) * up, self.w_down).view_as(rows)
        # the second GEMM reads the [R, F] activations: F needs the same 16-byte alignment
        if (_grouped_mm_ok(rows, self.w_gate_up) and _grouped_mm_ok(rows, self.w_down)
                and _grouped_mm_ok(self.w_down[0].t(), self.w_down)):
            ends = plan.expert_offsets[1:]  # [E] int32 cumulative row ends
            h = torch._grouped_mm(rows, self.w_gate_up, offs=ends)  # [R, 2F]
            gate, up = h.chunk(2, dim=-1)
            out = torch._grouped_mm((F.silu(gate) * up).contiguous(), self.w_down, offs=ends)
            # rows past offsets[E] are unused padding that _grouped_mm leaves undefined
            used = torch.arange(rows.shape[0], device=rows.device) < plan.expert_offsets[E]
            return torch.where(used[:, None], out, 0)
        return self.forward_loop(rows, plan)

    def forward_fused(self, x: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor
                      ) -> torch.Tensor:
        """x [T, D] -> y [T, D] = the weighted sum over each token's kept slots of its experts'
        outputs: dispatch, experts and combine in the fused Triton kernels."""
        from routerlib.kernels.experts import fused_experts

        return fused_experts(x, plan, weights, self.w_gate_up, self.w_down)


class MoELayer(nn.Module):
    """x [T, D] (or [B, S, D]) -> (y, RouterOutput). y has x's shape and dtype."""

    def __init__(self, cfg: MoEConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        r = cfg.router
        self.router = Router(cfg.hidden_size, r, backend=cfg.backend, device=device, dtype=dtype)
        self.experts = SwiGLUExperts(r.num_experts, cfg.hidden_size, cfg.ffn_size, device, dtype)
        self.shared = None
        if cfg.shared_expert_size:
            self.shared = SwiGLUExperts(1, cfg.hidden_size, cfg.shared_expert_size, device, dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        seq_len = shape[1] if x.dim() == 3 else None
        x2 = x.reshape(-1, shape[-1])  # [T, D]
        out = self.router(x2, seq_len=seq_len, generator=generator)
        backend = self.cfg.backend
        path = self.cfg.expert_path
        if path == "auto":
            path = "fused" if backend == "triton" else "batched"
        if path == "fused":
            y = self.experts.forward_fused(x2, out.plan, out.topk_weights)  # [T, D]
        else:
            rows = ops.dispatch(x2, out.plan, backend)  # [R, D]
            if path == "loop":
                expert_out = self.experts.forward_loop(rows, out.plan)
            else:
                expert_out = self.experts.forward_batched(rows, out.plan)
            y = ops.combine(expert_out, out.plan, out.topk_weights, backend)  # [T, D]
        if self.shared is not None:
            y = y + swiglu(x2, self.shared.w_gate_up[0], self.shared.w_down[0])
        return y.view(shape), out
