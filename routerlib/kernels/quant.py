"""Quantize-in-dispatch: gather token rows into the expert-major buffer as fp8 (e4m3) or int8 with
per-token or per-128-column scales, in one pass that reads x once.

    scale[t, g] = amax(|x[t, group g]|) / QMAX          (QMAX: 448 for e4m3, 127 for int8)
    q[row]      = round(x[t] / scale[t, g])            for each kept slot (t, j) -> row
    scales[row] = scale[t, :]                           empty rows: q = 0, scale = 0

Memory traffic at T=16384, D=4096, K=8: bf16 dispatch reads 2*T*D and writes 2*T*K*D bytes
(1.21 GB); this one reads 2*T*D and writes T*K*D + 4*T*K*(D/GROUP) (0.67 GB with one scale per
row): 1.8x fewer bytes in all, 2x fewer in the buffer the experts (or an all-to-all) read.

Rounding: both formats round to nearest even in fp32 arithmetic (a magic-number add, then a
subtraction), so the value stored is exact in the target type and the cast rounds nothing. For
e4m3 this also sidesteps the Triton interpreter's float8 conversion, which does not carry a
rounded-up mantissa into the exponent (7.89 became 4.0); the kernel therefore runs exactly on the
CPU under TRITON_INTERPRET=1 too.

Per-token scales need the row's amax before the first write: up to D = 8192 a program holds the
whole row in one tile (one read); beyond it reads the row twice (the second read from L2).
Per-128 scales are one pass at any D.
Launch configs: autotuned on a GPU (key: D, S, group, format); the heuristic under the
interpreter or with ROUTERLIB_QUANT_DISPATCH_CONFIG="BLOCK_T=..,BLOCK_D=..,num_warps=..".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from routerlib.kernels import _rowmap
from routerlib.kernels.common import interpreting, next_pow2
from routerlib.kernels.dispatch import check_rows
from routerlib.types import RoutingPlan

# Tuning pin (read once): 'default', or 'BLOCK_T=..,BLOCK_D=..,num_warps=..'; unset = autotune.
_PIN = os.environ.get("ROUTERLIB_QUANT_DISPATCH_CONFIG", "")

FP8_DTYPE = torch.float8_e4m3fn
FORMATS = {"fp8": (FP8_DTYPE, 448.0), "int8": (torch.int8, 127.0)}
GROUP = 128  # columns per scale in block mode (DeepSeek-V3's 1x128 activation groups)


@triton.jit
def _round_fp8(v):
    """Round fp32 v (|v| <= 448) to the nearest e4m3 value (ties to even), returned in fp32.
    The spacing of e4m3 around v is 2^(max(e, -6) - 3) for v in [2^e, 2^(e+1)) (below 2^-6 the
    subnormal spacing 2^-9); adding and subtracting 1.5 * 2^23 * spacing rounds v to it."""
    bits = v.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF  # biased exponent of |v|
    step_exp = tl.maximum(exp, 127 - 6) - 3  # biased exponent of the e4m3 spacing
    magic = ((step_exp + 23) << 23) | (1 << 22)  # 1.5 * 2^23 * spacing
    m = magic.to(tl.float32, bitcast=True)
    return (v + m) - m


@triton.jit
def _round_int(v):
    """Round fp32 v (|v| <= 2^22) to the nearest integer, ties to even (as torch.round)."""
    return (v + 12582912.0) - 12582912.0  # 1.5 * 2^23


@triton.jit
def _scale_inv(amax, QMAX: tl.constexpr):
    """(amax / QMAX, QMAX / amax or 0) with IEEE-rounded divisions: bf16 inputs often land
    exactly on a rounding tie, where a one-ulp error in the inverse would change the code."""
    qmax = tl.zeros_like(amax) + QMAX
    scale = tl.math.div_rn(amax, qmax)
    inv = tl.where(amax > 0, tl.math.div_rn(qmax, tl.maximum(amax, 1e-30)), 0.0)
    return scale, inv


@triton.jit
def _quantize(v, inv, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    v = tl.minimum(tl.maximum(v * inv, -QMAX), QMAX)
    if IS_INT:
        return _round_int(v)
    return _round_fp8(v)


@triton.jit
def _write_slots(q, toks64, tmask, d, m, S, D, slot_to_row_ptr, q_ptr,
                 S_UNROLL: tl.constexpr):
    """Write the quantized block q [BLOCK_T, BLOCK_D] to the row of every kept slot."""
    val = q.to(q_ptr.dtype.element_ty)
    for j in tl.static_range(S_UNROLL):
        row = tl.load(slot_to_row_ptr + toks64 * S + j, mask=tmask, other=-1)  # [BLOCK_T]
        kept = row >= 0
        tl.store(q_ptr + row.to(tl.int64)[:, None] * D + d[None, :], val, mask=m & kept[:, None])


@triton.jit
def _write_scales(scale, toks64, tmask, gcols, S, G, slot_to_row_ptr, scale_ptr,
                  S_UNROLL: tl.constexpr):
    """Write scales [BLOCK_T, NG] to columns gcols of the [R, G] scale matrix of every kept slot."""
    for j in tl.static_range(S_UNROLL):
        row = tl.load(slot_to_row_ptr + toks64 * S + j, mask=tmask, other=-1)  # [BLOCK_T]
        kept = row >= 0
        tl.store(scale_ptr + row.to(tl.int64)[:, None] * G + gcols[None, :], scale,
                 mask=kept[:, None] & (gcols < G)[None, :])


@triton.jit
def _quant_dispatch_kernel(
    x_ptr,            # [T, D]  bf16 / fp16 / fp32 tokens
    slot_to_row_ptr,  # [T, S]  int32, -1 = dropped slot
    row_to_slot_ptr,  # [R]     int32, -1 = empty row
    q_ptr,            # [R, D]  fp8 e4m3 or int8 rows, expert-major
    scale_ptr,        # [R, G]  fp32 scales (G = 1 per token, or D / GROUP)
    T, R, D, S, G,
    S_UNROLL: tl.constexpr,    # S (the slot loop is unrolled)
    QMAX: tl.constexpr,        # 448.0 (e4m3) or 127.0 (int8)
    IS_INT: tl.constexpr,
    GROUP: tl.constexpr,       # 0: a scale per token; else columns a scale (divides BLOCK_D)
    ZERO_GROUPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_PASS: tl.constexpr,    # one scale per token and BLOCK_D >= D: the row fits one tile
):
    pid = tl.program_id(0)
    num_token_blocks = tl.cdiv(T, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    if pid < num_token_blocks:
        toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = toks < T
        toks64 = toks.to(tl.int64)
        xrow = x_ptr + toks64[:, None] * D
        if ONE_PASS:
            # the whole row in one tile: one read, amax and codes from registers
            d = cols
            m = tmask[:, None] & (d < D)[None, :]
            x = tl.load(xrow + d[None, :], mask=m, other=0.0).to(tl.float32)
            scale, inv = _scale_inv(tl.max(tl.abs(x), axis=1), QMAX)  # [BLOCK_T]
            _write_scales(scale[:, None], toks64, tmask, tl.arange(0, 1), S, G, slot_to_row_ptr,
                          scale_ptr, S_UNROLL)
            q = _quantize(x, inv[:, None], QMAX, IS_INT)
            _write_slots(q, toks64, tmask, d, m, S, D, slot_to_row_ptr, q_ptr, S_UNROLL)
        elif GROUP == 0:
            # pass 1: the row's amax; pass 2 re-reads the row (from cache) and writes the slots
            amax = tl.zeros([BLOCK_T], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + cols
                m = tmask[:, None] & (d < D)[None, :]
                x = tl.load(xrow + d[None, :], mask=m, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            scale, inv = _scale_inv(amax, QMAX)  # [BLOCK_T]
            _write_scales(scale[:, None], toks64, tmask, tl.arange(0, 1), S, G, slot_to_row_ptr,
                          scale_ptr, S_UNROLL)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + cols
                m = tmask[:, None] & (d < D)[None, :]
                x = tl.load(xrow + d[None, :], mask=m, other=0.0).to(tl.float32)
                q = _quantize(x, inv[:, None], QMAX, IS_INT)
                _write_slots(q, toks64, tmask, d, m, S, D, slot_to_row_ptr, q_ptr, S_UNROLL)
        else:
            NG: tl.constexpr = BLOCK_D // GROUP
            gl = tl.arange(0, NG)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + cols
                m = tmask[:, None] & (d < D)[None, :]
                x = tl.load(xrow + d[None, :], mask=m, other=0.0).to(tl.float32)
                x3 = tl.reshape(x, [BLOCK_T, NG, GROUP])
                amax = tl.max(tl.abs(x3), axis=2)  # [BLOCK_T, NG]
                scale, inv = _scale_inv(amax, QMAX)
                q = _quantize(x3, inv[:, :, None], QMAX, IS_INT)
                q = tl.reshape(q, [BLOCK_T, BLOCK_D])
                _write_slots(q, toks64, tmask, d, m, S, D, slot_to_row_ptr, q_ptr, S_UNROLL)
                _write_scales(scale, toks64, tmask, d0 // GROUP + gl, S, G, slot_to_row_ptr,
                              scale_ptr, S_UNROLL)
    else:
        # Empty rows (padding, unfilled capacity): q = 0 and scale = 0, so they dequantize to 0.
        zero = tl.zeros([BLOCK_T, BLOCK_D], dtype=q_ptr.dtype.element_ty)
        for g in tl.static_range(ZERO_GROUPS):
            rows = ((pid - num_token_blocks) * ZERO_GROUPS + g) * BLOCK_T + tl.arange(0, BLOCK_T)
            in_range = rows < R
            slot = tl.load(row_to_slot_ptr + rows, mask=in_range, other=0)
            is_empty = in_range & (slot < 0)
            if tl.sum(is_empty.to(tl.int32), axis=0) > 0:
                rows64 = rows.to(tl.int64)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + cols
                    tl.store(q_ptr + rows64[:, None] * D + d[None, :], zero,
                             mask=is_empty[:, None] & (d < D)[None, :])
                for g0 in range(0, G, BLOCK_D):
                    gc = g0 + cols
                    tl.store(scale_ptr + rows64[:, None] * G + gc[None, :],
                             tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32),
                             mask=is_empty[:, None] & (gc < G)[None, :])


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
            for bd in (1024, 2048, 4096, 8192) for bt in (1, 2) for w in (4, 8)
            if bt * bd <= 8192]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Per-token scales: the tile that holds a whole row (one pass; up to D = 8192). Per-128
    scales: 1024- or 2048-column tiles (never wider than D needs)."""
    D = named_args["D"]
    group = kwargs.get("GROUP", named_args.get("GROUP", 0))
    want = max(GROUP, min(8192, next_pow2(D)))
    if group == 0:
        keep = [c for c in configs if c.kwargs["BLOCK_D"] == want]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_D"] in (1024, 2048)
                and c.kwargs["BLOCK_D"] <= max(1024, want)]
    return keep or configs[:1]


_ONE_PASS = {"ONE_PASS": lambda a: a["GROUP"] == 0 and a["BLOCK_D"] >= a["D"]}
_quant_dispatch_plain = triton.heuristics(_ONE_PASS)(_quant_dispatch_kernel)
_quant_dispatch_tuned = triton.autotune(
    configs=_configs(), key=["D", "S", "G", "GROUP", "IS_INT"],
    prune_configs_by={"early_config_prune": _prune},
)(_quant_dispatch_plain)


def default_config(D: int) -> dict[str, int]:
    """The interpreter's config: a whole row a tile (one pass with per-token scales)."""
    block_d = max(GROUP, min(8192, next_pow2(D)))
    return {"BLOCK_T": max(1, min(4, 2048 // block_d)), "BLOCK_D": block_d, "num_warps": 4}


def _alloc_codes(shape: tuple[int, int], dtype: torch.dtype, device: torch.device
                 ) -> torch.Tensor:
    """The code buffer; under the tests' poisoning filled with a code no row gets (NaN for e4m3,
    -128 for int8), so a row the kernel forgets shows up."""
    if not _rowmap.POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype == torch.int8:
        return torch.full(shape, -128, dtype=dtype, device=device)
    return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(dtype)


def check_format(fmt: str, group: int | None, D: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: must be one of {tuple(FORMATS)}")
    if group not in (None, GROUP):
        raise ValueError(f"group={group!r}: must be None (one scale per token) or {GROUP}")
    if group is not None and D % group:
        raise ValueError(f"group={group} needs D divisible by it, got D={D} (use group=None)")


def quantize_dispatch(x: torch.Tensor, plan: RoutingPlan, fmt: str = "fp8",
                      group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (q [R, D] in fp8 e4m3 / int8, scales [R, G] fp32) in the plan's expert-major
    order, quantized on the way (G = 1 with group=None, else D / 128); rows[r] ~= q[r] * scale.

    Equals routerlib.quant.payload.quantize_dispatch_reference exactly (codes and scales). For
    inference and expert-parallel payloads: no autograd (x must not need a gradient)."""
    check_rows(x, "x", plan.slot_to_row.shape[0], plan)
    T, D = x.shape
    check_format(fmt, group, D)
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("quantize_dispatch has no backward: call it under torch.no_grad() or "
                         "on a detached x (train with the bf16 dispatch)")
    return _quantize_rows(x, plan.slot_to_row, plan.row_to_slot, fmt, group)


def quantize_groups(x: torch.Tensor, fmt: str = "fp8", group: int | None = GROUP
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (q [T, D], scales [T, G]) in token order (the same kernel with the identity
    map: what a GEMM that gathers tokens itself reads, e.g. the fp8 experts' 1 x 128 groups)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    check_format(fmt, group, x.shape[1])
    T = x.shape[0]
    ident = torch.arange(T, dtype=torch.int32, device=x.device)
    return _quantize_rows(x, ident[:, None], ident, fmt, group)


def _quantize_rows(x: torch.Tensor, slot_to_row: torch.Tensor, row_to_slot: torch.Tensor,
                   fmt: str, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    T, D = x.shape
    dtype, qmax = FORMATS[fmt]
    x = x.contiguous()
    slot_to_row = slot_to_row.contiguous()
    row_to_slot = row_to_slot.contiguous()
    S = slot_to_row.shape[1]
    if S > _rowmap.MAX_UNROLL:
        raise ValueError(f"quantize_dispatch unrolls the slot loop: S={S} > {_rowmap.MAX_UNROLL} "
                         "(expert choice is not supported; use the bf16 dispatch)")
    R = row_to_slot.shape[0]
    G = 1 if group is None else D // group
    q = _alloc_codes((R, D), dtype, x.device)
    scales = _rowmap.empty((R, G), torch.float32, x.device)
    if R == 0 or D == 0:
        return q, scales.zero_()
    args = (x, slot_to_row, row_to_slot, q, scales, T, R, D, S, G)
    flags = dict(S_UNROLL=S, QMAX=qmax, IS_INT=fmt == "int8", GROUP=group or 0,
                 ZERO_GROUPS=_rowmap.ZERO_GROUPS)

    def grid(meta: dict) -> tuple[int]:
        bt = meta["BLOCK_T"]
        return (triton.cdiv(T, bt) + triton.cdiv(R, bt * _rowmap.ZERO_GROUPS),)

    pin = _PIN.strip()
    if pin == "default" or (not pin and interpreting()):
        pin = default_config(D)
    else:
        pin = _rowmap.parse_pin("ROUTERLIB_QUANT_DISPATCH_CONFIG", pin, D)
    if pin is None:
        _quant_dispatch_tuned[grid](*args, **flags)
    else:
        if group is not None and pin["BLOCK_D"] % group:
            raise ValueError(f"ROUTERLIB_QUANT_DISPATCH_CONFIG: BLOCK_D={pin['BLOCK_D']} must be "
                             f"a multiple of the scale group {group}")
        _quant_dispatch_plain[grid](*args, **flags, **pin)
    return q, scales
