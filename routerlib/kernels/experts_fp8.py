"""fp8 fused experts (inference): the SwiGLU experts of routerlib.kernels.experts with e4m3 weights
in 128 x 128 blocks and e4m3 activations in 1 x 128 groups (DeepSeek-V3's recipe), fp32
accumulation, on the same ragged tile map and schedule (_experts_kernels._tile_of, _swizzle).

    xq, sx   = quantize_groups(x)                     [T, D] e4m3, [T, D/128] fp32
    up       acc_g, acc_u += (xq[token(r)] . Wq_gu[e]) * sx * s_w  per 128-deep K step
             h = silu(acc_g) * acc_u, quantized in the epilogue to hq [R, F] e4m3 with one scale
             per row and 128-column tile: hs [R, F/128] (BLOCK_N = 128 = the group)
    down     o[r] = w[slot(r)] * sum_k (hq . Wq_d[e]) * hs * s_w       [R, D] bf16
    sum      y[t] = sum_j o[slot_to_row[t, j]] in fp32 (the row-map gather_reduce)

Each K step is one 128-deep tl.dot of e4m3 tiles (fp32 result) scaled by the activation group's
scale [BLOCK_M] and the weight block's scale [BLOCK_N] before it joins the fp32 accumulator.
Weights are stored N-major with K contiguous ([E, N, K], the K-major B operand of Hopper's fp8
wgmma). Bytes: weights half of bf16's; x read once for quantization (2TD) plus the e4m3 rows the
GEMM gathers (TKD from L2), h written and read in e4m3 (2 x RF instead of 2 x 2RF).
With `payload=` the up GEMM reads an expert-major e4m3 buffer with 1 x 128 scales (what
quantize_dispatch(x, plan, "fp8", 128) writes, e.g. an all-to-all's receive buffer) instead of
gathering the tokens: the dispatched fp8 payload is dequantized in the GEMM's K loop.
Needs D and F multiples of 128. Under TRITON_INTERPRET=1 the tiles go into tl.dot as fp32 (the
interpreter's dot reads 8-bit floats as integers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from routerlib.kernels import _rowmap
from routerlib.kernels._experts_kernels import _swizzle, _tile_of
from routerlib.kernels.dispatch import check_device
from routerlib.kernels.experts import TileConfig, _block_e, _Plan, regime
from routerlib.kernels.quant import _round_fp8, _scale_inv, quantize_groups
from routerlib.types import RoutingPlan

BLOCK = 128  # weight blocks 128 x 128, activation groups 1 x 128, and the GEMMs' K step
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

EPI_SWIGLU_Q = 1  # h = silu(gate) * up, quantized to e4m3 with a scale per 128 columns
EPI_SCALE = 2  # out = weight[slot] * acc


@dataclass(frozen=True)
class Fp8ExpertWeights:
    """SwiGLU expert weights in e4m3 with one fp32 scale per 128 x 128 block, K contiguous.

    w_gate_up [E, 2F, D] e4m3 (gate rows 0..F-1, up rows F..2F-1), s_gate_up [E, 2F/128, D/128]
    w_down    [E, D, F]  e4m3,                                     s_down    [E, D/128, F/128]
    """

    w_gate_up: torch.Tensor
    s_gate_up: torch.Tensor
    w_down: torch.Tensor
    s_down: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_gate_up.shape[2]

    @property
    def ffn(self) -> int:
        return self.w_down.shape[2]

    @classmethod
    def from_weights(cls, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                     chunk: int = 8) -> Fp8ExpertWeights:
        """From the layer's w_gate_up [E, D, 2F] and w_down [E, F, D] (any float dtype),
        `chunk` experts at a time (fp32 temporaries of a chunk only)."""
        E, D, F2 = w_gate_up.shape
        F = F2 // 2
        if tuple(w_down.shape) != (E, F, D):
            raise ValueError(f"w_down must be {(E, F, D)} for w_gate_up {tuple(w_gate_up.shape)}, "
                             f"got {tuple(w_down.shape)}")
        if D % BLOCK or F % BLOCK:
            raise ValueError(f"fp8 experts need D and F multiples of {BLOCK}, got D={D} F={F}")
        parts = [quantize_blocks(w_gate_up[e:e + chunk].transpose(1, 2)) +
                 quantize_blocks(w_down[e:e + chunk].transpose(1, 2)) for e in range(0, E, chunk)]
        return cls(*(torch.cat([p[i] for p in parts]) for i in range(4)))

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_gate_up [E, D, 2F], w_down [E, F, D]) in fp32: what the fp8 kernels multiply by."""
        return (dequantize_blocks(self.w_gate_up, self.s_gate_up).transpose(1, 2),
                dequantize_blocks(self.w_down, self.s_down).transpose(1, 2))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.w_gate_up, self.s_gate_up, self.w_down, self.s_down))


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] -> (e4m3 [E, N, K] contiguous, fp32 scales [E, N/128, K/128]): one scale per
    128 x 128 block mapping its largest magnitude to 448 (round to nearest even)."""
    E, N, K = w.shape
    wb = w.float().reshape(E, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    amax = wb.abs().amax(dim=(2, 4), keepdim=True)
    qmax = torch.full_like(amax, FP8_MAX)
    inv = torch.where(amax > 0, qmax / amax.clamp(min=1e-30), torch.zeros_like(amax))
    q = (wb * inv).clamp_(-FP8_MAX, FP8_MAX).to(FP8).reshape(E, N, K).contiguous()
    return q, (amax / qmax).reshape(E, N // BLOCK, K // BLOCK)


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q [E, N, K] e4m3 with scales [E, N/128, K/128] -> fp32 [E, N, K]."""
    E, N, K = q.shape
    s = scales.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    return q.float() * s


@triton.jit
def _fp8_step(acc, a, sa, b_base, sb_base, offs_k, offs_n, kb, K, N, NB_K,
              UPCAST: tl.constexpr):
    """acc + (a . B[offs_n, offs_k]) * sa[:, None] * s_w[None, :] for one 128-deep step."""
    b = tl.load(b_base + offs_n[None, :].to(tl.int64) * K + offs_k[:, None],
                mask=(offs_n < N)[None, :], other=0.0)  # [128, BLOCK_N] e4m3, K contiguous
    sb = tl.load(sb_base + (offs_n // 128) * NB_K + kb, mask=offs_n < N, other=0.0)  # [BLOCK_N]
    if UPCAST:
        part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        part = tl.dot(a, b)
    return acc + part * sa[:, None] * sb[None, :]


@triton.jit
def _fp8_grouped_mm_kernel(
    a_ptr,     # A_GATHER: xq [T, K] e4m3 tokens; else hq [R, K] e4m3 rows
    sa_ptr,    # [T or R, K/128] fp32 group scales of A
    b_ptr,     # [E, N_B, K] e4m3 weights (N_B = 2N for the gate/up pair, else N)
    sb_ptr,    # [E, N_B/128, K/128] fp32 block scales
    out_ptr,   # EPI_SWIGLU_Q: hq [R, N] e4m3; EPI_SCALE: o [R, N] bf16 / fp16 / fp32
    so_ptr,    # EPI_SWIGLU_Q: [R, N/128] fp32 scales of hq
    row_to_slot_ptr,  # [R] int32
    counts_ptr,       # [E] int32 rows used by each expert
    offsets_ptr,      # [E + 1] int32 first row of each expert's segment
    weights_ptr,      # [T * S] fp32 combine weight of each slot
    N, K, S, E, M_TILES, NB_K, NB_N,  # NB_K = K / 128, NB_N = N_B / 128
    EPILOGUE: tl.constexpr, A_GATHER: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), M_TILES, num_n, GROUP_M)
    expert, row_lo, row_hi, valid = _tile_of(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if valid:
        offs_m = row_lo + tl.arange(0, BLOCK_M)  # [BLOCK_M] buffer rows
        row_ok = offs_m < row_hi
        slot = tl.load(row_to_slot_ptr + offs_m, mask=row_ok, other=-1)
        row_ok = row_ok & (slot >= 0)
        src = offs_m
        if A_GATHER:
            src = slot // S  # token of the row
        src64 = src.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        e64 = expert.to(tl.int64)
        b_base = b_ptr + e64 * NB_N * 128 * K
        sb_base = sb_ptr + e64 * NB_N * NB_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the up half (EPI_SWIGLU_Q)
        for kb in range(0, NB_K):
            offs_k = kb * 128 + tl.arange(0, 128)
            a = tl.load(a_ptr + src64[:, None] * K + offs_k[None, :], mask=row_ok[:, None],
                        other=0.0)  # [BLOCK_M, 128] e4m3
            sa = tl.load(sa_ptr + src64 * NB_K + kb, mask=row_ok, other=0.0)  # [BLOCK_M]
            acc = _fp8_step(acc, a, sa, b_base, sb_base, offs_k, offs_n, kb, K, N, NB_K,
                            UPCAST)
            if EPILOGUE == 1:
                acc2 = _fp8_step(acc2, a, sa, b_base + N * K, sb_base + (N // 128) * NB_K,
                                 offs_k, offs_n, kb, K, N, NB_K, UPCAST)
        rows64 = offs_m.to(tl.int64)
        n_ok = offs_n < N
        mask = (offs_m < row_hi)[:, None] & n_ok[None, :]
        out_ptrs = out_ptr + rows64[:, None] * N + offs_n[None, :]
        if EPILOGUE == 1:
            # BLOCK_N = 128: this tile is exactly one activation group of h per row
            h = acc * tl.sigmoid(acc) * acc2
            scale, inv = _scale_inv(tl.max(tl.abs(h), axis=1), 448.0)  # [BLOCK_M]
            hq = _round_fp8(tl.minimum(tl.maximum(h * inv[:, None], -448.0), 448.0))
            tl.store(out_ptrs, hq.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(so_ptr + rows64 * num_n + pid_n, scale, mask=offs_m < row_hi)
        else:
            w = tl.load(weights_ptr + slot, mask=row_ok, other=0.0)  # [BLOCK_M] fp32
            tl.store(out_ptrs, (acc * w[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


# Tiles: BLOCK_N is 128 for the up GEMM (its epilogue quantizes 128-column groups); the K step
# is 128 (one scale per step). Prefill: 128-row tiles, 8 warps; smaller batches: 64 / 16 rows.
_TILES = {"decode": (TileConfig(16, 128, BLOCK, 8, 4, 4), TileConfig(16, 128, BLOCK, 8, 4, 4)),
          "middle": (TileConfig(64, 128, BLOCK, 8, 4, 3), TileConfig(64, 128, BLOCK, 8, 4, 3)),
          "prefill": (TileConfig(128, 128, BLOCK, 8, 8, 3),
                      TileConfig(128, 128, BLOCK, 8, 8, 3))}
_INTERPRET_TILES = (TileConfig(16, 128, BLOCK, 4, 4, 1), TileConfig(16, 128, BLOCK, 4, 4, 1))


def _launch(p: _Plan, a, sa, b, sb, out, so, weights, n: int, k: int, epilogue: int,
            a_gather: bool, tile: TileConfig) -> None:
    m_tiles = p.m_tiles(tile.block_m)
    grid = (m_tiles * triton.cdiv(n, tile.block_n),)
    _fp8_grouped_mm_kernel[grid](
        a, sa, b, sb, out, so, p.row_to_slot, p.kept_counts, p.expert_offsets, weights,
        n, k, p.S, p.E, m_tiles, k // BLOCK, b.shape[1] // BLOCK,
        EPILOGUE=epilogue, A_GATHER=a_gather, UPCAST=_rowmap.interpreting(),
        BLOCK_E=_block_e(p.E), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        GROUP_M=tile.group_m, num_warps=tile.num_warps, num_stages=tile.num_stages)


def fp8_experts(x: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor,
                w: Fp8ExpertWeights, out_dtype: torch.dtype | None = None,
                payload: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[T, D] -> [T, D] (x's dtype, or out_dtype): y[t] = sum_j weights[t, j] * SwiGLU_e(x[t])
    with fp8 weights and activations (see the module docstring); inference only.

    payload: the dispatched rows already in e4m3 with 1 x 128 scales, (q [R, D], scales
    [R, D/128]) as routerlib.kernels.quant.quantize_dispatch(x, plan, "fp8", 128) writes them
    (an expert-parallel receive buffer): the up GEMM then reads them in place of gathering x.

    Equals routerlib.kernels.experts_fp8.fp8_experts_reference up to fp32 summation order (and
    the e4m3 rounding of h it can move by one step)."""
    if x.dim() != 2 or x.shape[1] != w.hidden:
        raise ValueError(f"x must be [T, {w.hidden}] (the weights' D), got {tuple(x.shape)}")
    if plan.num_experts != w.num_experts:
        raise ValueError(f"the plan routes to {plan.num_experts} experts, the weights hold "
                         f"{w.num_experts}")
    if plan.slot_to_row.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but the plan routes "
                         f"{plan.slot_to_row.shape[0]}")
    if weights.shape != plan.slot_to_row.shape:
        raise ValueError(f"weights must have shape {tuple(plan.slot_to_row.shape)}, got "
                         f"{tuple(weights.shape)}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("fp8_experts has no backward: call it under torch.no_grad() (train "
                         "with the bf16 fused experts)")
    check_device(x, "x")
    T, D = x.shape
    F = w.ffn
    out_dtype = out_dtype or x.dtype
    per_expert = plan.capacity if plan.capacity is not None else T
    p = _Plan(plan.slot_to_row.contiguous(), plan.row_to_slot.contiguous(),
              plan.kept_counts.contiguous(), plan.expert_offsets.contiguous(), per_expert)
    if T == 0 or p.R == 0:
        return torch.zeros((T, D), dtype=out_dtype, device=x.device)
    weights = weights.float().contiguous()
    up, down = (_INTERPRET_TILES if _rowmap.interpreting()
                else _TILES[regime(T * p.S, p.E)])
    if payload is None:
        aq, sa = quantize_groups(x, "fp8", BLOCK)  # [T, D] e4m3, [T, D/128]
    else:
        aq, sa = payload
        if (aq.dtype != FP8 or tuple(aq.shape) != (p.R, D)
                or tuple(sa.shape) != (p.R, D // BLOCK)):
            raise ValueError(f"payload must be (e4m3 [{p.R}, {D}], fp32 [{p.R}, {D // BLOCK}]) "
                             f"(quantize_dispatch(x, plan, 'fp8', 128)), got {aq.dtype} "
                             f"{tuple(aq.shape)} and {tuple(sa.shape)}")
        aq, sa = aq.contiguous(), sa.float().contiguous()
    hq = torch.empty((p.R, F), dtype=FP8, device=x.device)
    hs = torch.empty((p.R, F // BLOCK), dtype=torch.float32, device=x.device)
    _launch(p, aq, sa, w.w_gate_up, w.s_gate_up, hq, hs, weights, F, D, EPI_SWIGLU_Q,
            payload is None, up)
    o = _rowmap.empty((p.R, D), out_dtype, x.device)
    _launch(p, hq, hs, w.w_down, w.s_down, o, hs, weights, D, F, EPI_SCALE, False, down)
    return _rowmap.gather_reduce(o, p.slot_to_row)


def fp8_experts_reference(x: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor,
                          w: Fp8ExpertWeights) -> torch.Tensor:
    """The same arithmetic in readable torch (fp32): x quantized in 1 x 128 groups, the block
    weights dequantized, SwiGLU per expert, h quantized in 1 x 128 groups, weighted combine."""
    from routerlib import reference as ref
    from routerlib.quant.payload import dequantize_rows, quantize_tokens

    xq, sx = quantize_tokens(x, "fp8", BLOCK)
    rows = ref.dispatch(dequantize_rows(xq, sx, torch.float32), plan)  # [R, D]
    w_gu, w_d = w.dequantize()
    out = torch.zeros_like(rows)
    starts, counts = plan.expert_offsets.tolist(), plan.kept_counts.tolist()
    for e, (lo, n) in enumerate(zip(starts, counts)):
        if n:
            g, u = (rows[lo:lo + n] @ w_gu[e]).chunk(2, dim=-1)
            h = torch.nn.functional.silu(g) * u
            hq, hs = quantize_tokens(h, "fp8", BLOCK)
            out[lo:lo + n] = dequantize_rows(hq, hs, torch.float32) @ w_d[e]
    return ref.combine(out, plan, weights.float()).to(x.dtype)
