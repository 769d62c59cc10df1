"""Quantized token payload: the reference of quantize-in-dispatch, its dequantization, and an MoE
layer forward whose experts receive the dequantized payload (the layer's output error).

    quantize_tokens(x, fmt, group)      x [T, D] -> (q [T, D], scales [T, G]) per token / 128 cols
    quantize_dispatch_reference(...)     the same, then the gather into expert-major rows [R, ...]
    quantize_dispatch(..., backend)      "torch" (the reference) or "triton" (kernels/quant.py:
                                         one pass, x read once)
    dequantize_rows(q, scales)           q * scale -> [R, D] in the requested dtype

Empty rows (padding, unfilled capacity) hold q = 0 with scale 0. The combine stays bf16/fp32.
"""

from __future__ import annotations

import torch

from routerlib import reference as ref
from routerlib.config import Backend
from routerlib.quant.router import FP8_MAX, INT8_MAX, quantize_fp8, quantize_int8
from routerlib.types import RouterOutput, RoutingPlan

FORMATS = ("fp8", "int8")
GROUP = 128


def _check(fmt: str, group: int | None, D: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: must be one of {FORMATS}")
    if group not in (None, GROUP):
        raise ValueError(f"group={group!r}: must be None (one scale per token) or {GROUP}")
    if group is not None and D % group:
        raise ValueError(f"group={group} needs D divisible by it, got D={D} (use group=None)")


def quantize_tokens(x: torch.Tensor, fmt: str = "fp8", group: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (q [T, D] e4m3 / int8, scales [T, G] fp32), G = 1 or D / group."""
    T, D = x.shape
    _check(fmt, group, D)
    g = D if group is None else group
    xg = x.reshape(T, D // g if D else 0, g) if D else x.reshape(T, 0, 1)
    q, scale = (quantize_fp8 if fmt == "fp8" else quantize_int8)(xg)  # [T, G, g], [T, G, 1]
    return q.reshape(T, D), scale.reshape(T, -1)


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                    ) -> torch.Tensor:
    """q [R, D] with scales [R, G] -> [R, D] = q * scale (fp32 product, then dtype)."""
    R, D = q.shape
    G = scales.shape[1]
    if G == 0 or D % G:
        raise ValueError(f"scales [R, G] must have G dividing D={D}, got {tuple(scales.shape)}")
    x = q.float().view(R, G, D // G) * scales.view(R, G, 1)
    return x.view(R, D).to(dtype)


def quantize_dispatch_reference(x: torch.Tensor, plan: RoutingPlan, fmt: str = "fp8",
                                group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each token, then gather expert-major: (q [R, D], scales [R, G])."""
    q, scales = quantize_tokens(x, fmt, group)
    # the gather copies bytes: dispatch the codes as uint8/int8 views and the scales as fp32
    codes = q.view(torch.uint8) if fmt == "fp8" else q
    rows = ref.dispatch(codes, plan)
    rows = rows.view(q.dtype) if fmt == "fp8" else rows
    return rows, ref.dispatch(scales, plan)


def quantize_dispatch(x: torch.Tensor, plan: RoutingPlan, fmt: str = "fp8",
                      group: int | None = None, backend: Backend = "torch"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [R, D], scales [R, G]) of x [T, D] in the plan's expert-major order. Inference only."""
    if backend == "triton":
        from routerlib.kernels.quant import quantize_dispatch as kernel

        return kernel(x, plan, fmt, group)
    if backend != "torch":
        raise ValueError(f"backend={backend!r}: must be 'torch' or 'triton'")
    return quantize_dispatch_reference(x, plan, fmt, group)


def payload_bytes(T: int, D: int, K: int, fmt: str | None, group: int | None = None,
                  x_bytes: int = 2) -> dict[str, int]:
    """HBM bytes of one dispatch (fmt None: the bf16 copy): x read once, T*K rows written."""
    read = T * D * x_bytes
    if fmt is None:
        rows = T * K * D * x_bytes
    else:
        G = 1 if group is None else D // group
        rows = T * K * (D + 4 * G)
    return {"read": read, "written": rows, "total": read + rows}


def qmax(fmt: str) -> float:
    return FP8_MAX if fmt == "fp8" else INT8_MAX


@torch.no_grad()
def moe_forward_quantized(layer, x: torch.Tensor, fmt: str | None = "fp8",
                          group: int | None = None, backend: Backend | None = None,
                          routed: RouterOutput | None = None) -> torch.Tensor:
    """An MoELayer's forward (eval, no shared-expert change) with the dispatched payload in
    fmt (None: the layer's own bf16/fp32 dispatch): router -> quantize-in-dispatch ->
    dequantize -> experts -> combine in x's dtype. Returns y of x's shape."""
    from routerlib import ops

    backend = backend or layer.cfg.backend
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [T, D]
    out = routed if routed is not None else layer.router(x2)
    if fmt is None:
        rows = ops.dispatch(x2, out.plan, backend)
    else:
        q, scales = quantize_dispatch(x2, out.plan, fmt, group, backend)
        rows = dequantize_rows(q, scales, x2.dtype)  # [R, D]
    if layer.cfg.expert_path == "loop":
        expert_out = layer.experts.forward_loop(rows, out.plan)
    else:
        expert_out = layer.experts.forward_batched(rows, out.plan)
    y = ops.combine(expert_out, out.plan, out.topk_weights, backend)
    if layer.shared is not None:
        from routerlib.layer import swiglu

        y = y + swiglu(x2, layer.shared.w_gate_up[0], layer.shared.w_down[0])
    return y.view(shape)
