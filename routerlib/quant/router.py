"""Router precision paths: gate modules that compute the logits x @ W^T [T, E] in a chosen precision
and always hand fp32 logits to the scoring and top-K (softmax and top-K stay fp32 in every path).

    fp32         fp32 operands, fp32 GEMM: the reference every path is measured against
    bf16, fp16   the mixed-precision router: operands rounded to bf16/fp16, products accumulated
                 and written in fp32 (on CUDA torch.mm(..., out_dtype=float32); elsewhere the same
                 arithmetic emulated in fp32: a product of two 16-bit floats is exact in fp32)
    bf16_logits  what nn.Linear in bf16 does: bf16 GEMM whose logits are rounded to bf16 before
                 the softmax (kept as the naive baseline the mixed-precision router fixes)
    int8         int8 weights with one scale per expert (per output channel) and int8 activations
                 with one scale per token, int32 accumulation (torch._int_mm where it applies,
                 an exact float64 emulation elsewhere), then logits = acc * s_x[t] * s_w[e]
    int8_wo      int8 weights per channel, fp16 activations (weight-only), fp32 accumulation
    fp8          e4m3 weights per channel and e4m3 activations per token (torch._scaled_mm with
                 row-wise scales where it runs: Hopper, and the CPU; a dequantizing fp32 reference
                 elsewhere), fp32 accumulation and output

Training: every gate keeps the Router's own weight parameter as an fp32/bf16 *master* weight and
quantizes it on the fly; the backward is straight-through (the gradient of x @ W^T with the master
weight, as if no rounding happened), so an optimizer keeps updating the master weight. In eval mode
the quantized weight is cached until the parameter changes (its version counter).

`set_router_precision(model, precision)` swaps the gate of every routerlib Router in a model for
one of these, sharing the trained weight (state_dict keys stay `gate.weight`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "fp16", "bf16_logits", "int8", "int8_wo", "fp8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "bf16_logits", "int8", "int8_wo", "fp8")

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")


# ----------------------------------------------------------------------------------------------
# Quantizers (reference: readable torch, reused by the tests and the payload path)
# ----------------------------------------------------------------------------------------------

def absmax_scale(x: torch.Tensor, qmax: float, dim: int = -1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, inverse) in fp32 (keepdim): scale = amax(|x|) / qmax and inverse =
    qmax / amax (0 for an all-zero row), computed as the kernels compute them."""
    amax = x.float().abs().amax(dim=dim, keepdim=True)
    q = torch.full_like(amax, qmax)  # tensor / tensor: IEEE division (a scalar divisor may be
    inv = torch.where(amax > 0, q / amax.clamp(min=1e-30), torch.zeros_like(amax))  # a reciprocal
    return amax / q, inv


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row along dim: (q int8, scale fp32 keepdim) with
    x ~= q * scale; round half to even, codes in [-127, 127]."""
    scale, inv = absmax_scale(x, INT8_MAX, dim)
    q = torch.round((x.float() * inv).clamp_(-INT8_MAX, INT8_MAX)).to(torch.int8)
    return q, scale


def quantize_fp8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 with one scale per row along dim: (q, scale fp32 keepdim), x ~= q * scale; the
    row's largest magnitude maps to 448 (round to nearest even, saturating)."""
    scale, inv = absmax_scale(x, FP8_MAX, dim)
    q = (x.float() * inv).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in fp32 (scale broadcast along the quantized dimension)."""
    return q.float() * scale


# ----------------------------------------------------------------------------------------------
# The GEMMs of each path: x [T, D], w [E, D] -> logits [T, E] fp32
# ----------------------------------------------------------------------------------------------

# GEMMs this torch build refused on a device, with the error: the path then runs its exact
# emulation there (the benchmark prints this, so a slow fallback is never mistaken for the GEMM)
FALLBACKS: dict[tuple[str, str], str] = {}


def _fell_back(name: str, dev: torch.device) -> bool:
    return (name, str(dev)) in FALLBACKS


def _mm_fp32_out(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a [T, D] @ b_t [D, E] of 16-bit operands, fp32 accumulation and fp32 output."""
    if a.is_cuda and not _fell_back("mm_out_dtype", a.device):
        try:
            return torch.mm(a, b_t, out_dtype=torch.float32)
        except (RuntimeError, TypeError) as e:
            FALLBACKS[("mm_out_dtype", str(a.device))] = str(e).splitlines()[0]
    return a.float() @ b_t.float()  # exact products; fp32 sums (the order may differ)


def _int8_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [T, D] int8 @ wq[E, D]^T int8 -> [T, E] exact integer sums (int32 range or float64)."""
    T, D = xq.shape
    E = wq.shape[0]
    if (xq.is_cuda and T > 16 and D % 8 == 0 and E % 8 == 0
            and not _fell_back("int_mm", xq.device)):
        try:
            return torch._int_mm(xq, wq.t()).double()
        except (RuntimeError, NotImplementedError) as e:
            FALLBACKS[("int_mm", str(xq.device))] = str(e).splitlines()[0]
    # float64 holds every sum exactly: |sum| <= 127^2 * D < 2^53
    return xq.double() @ wq.double().t()


def _fp8_mm(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor
            ) -> torch.Tensor:
    """(xq * sx) @ (wq * sw)^T with fp32 accumulation: xq [T, D] e4m3, sx [T, 1], wq [E, D] e4m3,
    sw [E, 1]. torch._scaled_mm with row-wise scales where it runs, else the dequantized GEMM."""
    dev = xq.device
    T, D = xq.shape
    E = wq.shape[0]
    if not _fell_back("scaled_mm", dev) and D % 16 == 0 and E % 16 == 0:
        try:
            return torch._scaled_mm(xq, wq.t(), scale_a=sx.float().contiguous(),
                                    scale_b=sw.float().t().contiguous(), out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError) as e:  # no row-wise fp8 GEMM here
            FALLBACKS[("scaled_mm", str(dev))] = str(e).splitlines()[0]
    return fp8_mm_reference(xq, sx, wq, sw)


def fp8_mm_reference(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor
                     ) -> torch.Tensor:
    """The dequantizing reference of the fp8 gate GEMM (fp32 everywhere)."""
    return dequantize(xq, sx) @ dequantize(wq, sw).t()


def quantize_weight(w: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored form of the gate weight [E, D] for a path: (w_q, per-expert scale [E, 1])."""
    if precision in ("int8", "int8_wo"):
        return quantize_int8(w)
    if precision == "fp8":
        return quantize_fp8(w)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "bf16_logits": torch.bfloat16}[precision]
    return w.detach().to(dtype), None


def gate_logits(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None,
                precision: str) -> torch.Tensor:
    """Logits [T, E] fp32 of x [T, D] with the stored weight of `precision` (quantize_weight)."""
    if precision == "fp32":
        return x.float() @ w_q.t()
    if precision in ("bf16", "fp16"):
        return _mm_fp32_out(x.to(w_q.dtype), w_q.t())
    if precision == "bf16_logits":
        return (x.to(torch.bfloat16) @ w_q.t()).float()
    if precision == "int8":
        xq, sx = quantize_int8(x)
        return (_int8_mm(xq, w_q) * sx.double() * w_scale.double().t()).float()
    if precision == "int8_wo":
        return _mm_fp32_out(x.to(torch.float16), w_q.t().to(torch.float16)) * w_scale.t()
    if precision == "fp8":
        xq, sx = quantize_fp8(x)
        return _fp8_mm(xq, sx, w_q, w_scale)
    raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized path's logits. Backward: the gradient of x @ W^T with the master
    weight W (straight-through: the rounding is treated as the identity)."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_scale, precision):
        ctx.save_for_backward(x, weight)
        return gate_logits(x, w_q, w_scale, precision)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None


class QuantGate(nn.Module):
    """A bias-free gate D -> E computing fp32 logits in `precision` from a master weight [E, D].

    Drop-in for Router.gate: `weight` is the same Parameter (shared when built from a Linear), so
    checkpoints and optimizers see no difference. x may be any float dtype of the weight's device.
    """

    def __init__(self, weight: nn.Parameter, precision: Precision = "bf16"):
        super().__init__()
        check_precision(precision)
        if weight.dim() != 2:
            raise ValueError(f"gate weight must be [E, D], got shape {tuple(weight.shape)}")
        self.weight = weight
        self.precision = precision
        self._cache: tuple[tuple[int, int], torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, precision: Precision = "bf16") -> QuantGate:
        if linear.bias is not None:
            raise ValueError("QuantGate wraps a bias-free gate; this Linear has a bias")
        return cls(linear.weight, precision)

    def extra_repr(self) -> str:
        E, D = self.weight.shape
        return f"in_features={D}, out_features={E}, precision={self.precision!r}"

    def stored_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The quantized weight and its per-expert scales, cached while the weight is unchanged."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._cache is None or self._cache[0] != key:
            w_q, scale = quantize_weight(self.weight.detach(), self.precision)
            self._cache = (key, w_q, scale)
        return self._cache[1], self._cache[2]

    def weight_bytes(self) -> int:
        """Bytes of the stored weight and its scales (what one gate GEMM reads of W)."""
        w_q, scale = self.stored_weight()
        n = w_q.numel() * w_q.element_size()
        return n + (scale.numel() * scale.element_size() if scale is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"x must be [T, {self.weight.shape[1]}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {x.dtype}")
        w_q, w_scale = self.stored_weight()
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _StraightThrough.apply(x, self.weight, w_q, w_scale, self.precision)
        return gate_logits(x, w_q, w_scale, self.precision)


def set_router_precision(model: nn.Module, precision: Precision) -> int:
    """Give every routerlib Router in `model` (or `model` itself) a QuantGate of `precision` over
    its current gate weight. Returns how many routers changed; raises if there is none."""
    from routerlib.router import Router

    check_precision(precision)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers:
        raise ValueError(f"{type(model).__name__} holds no routerlib Router")
    for r in routers:
        r.gate = QuantGate(r.gate.weight, precision)
    return len(routers)
