"""Routing in three launches and no sort, for any T: the plan's counting sort folded into top-K.

The general path runs top-K (+ a loss-sum reduction), then the plan's histogram and a fused
rank/scatter that ranks slots with an in-register sort: four launches. Here:

  1. _route_tiles_kernel   one program per tile of BLOCK_T tokens: `_select_tile` (as top-K),
                           writes ids and weights, its loss-sum partials, its expert histogram
                           and each slot's rank among the tile's earlier tokens: with slots
                           ordered t*K + k and one slot per (token, expert), that rank is an
                           exclusive cumsum of the chosen mask down the token axis. No sort.
  2. _route_scan_kernel    per block of expert columns: exclusive scan of the tile histograms
                           down the tiles (each tile's prefix), the totals, and the column sums of
                           the loss partials, in a fixed order (deterministic).
  3. _route_scatter_kernel one program per tile: rank = tile prefix + in-tile rank, kept iff
                           rank < C, row = segment start + rank; writes slot_to_row and
                           row_to_slot. Extra programs mark the empty rows -1; program 0 writes
                           the counts and offsets.

Scope: token choice, drop_policy="position", no gradient needed, not under torch.compile.
routerlib.kernels.route uses it when ROUTERLIB_FUSED_ROUTE=1 (off by default until measured on a
GPU); results are identical to the general path and the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from routerlib.config import RouterConfig
from routerlib.kernels._topk_kernels import _load_bias, _route_tile, next_pow2
from routerlib.kernels.route_small import _layout, _mark_empty_rows
from routerlib.reference.plan import num_rows
from routerlib.types import RoutingPlan, Selection


def enabled() -> bool:
    return os.environ.get("ROUTERLIB_FUSED_ROUTE", "0") == "1"


def applies(logits: torch.Tensor, cfg: RouterConfig) -> bool:
    return (cfg.routing == "token_choice" and cfg.drop_policy == "position"
            and logits.shape[0] >= 1 and cfg.num_experts <= 4096
            and not (torch.is_grad_enabled() and logits.requires_grad)
            and not torch.compiler.is_compiling())


@triton.jit
def _route_tiles_kernel(
    logits_ptr, bias_ptr,
    ids_ptr,  # (T, K) int32 out
    weights_ptr,  # (T, K) fp32 out
    lrank_ptr,  # (T, K) int32 out: rank of the slot among its tile's earlier tokens
    hist_ptr,  # (NT, BLOCK_E) int32 out: experts chosen in each tile
    part_ptr,  # (NT, E+1) fp32 out: loss-sum partials of each tile
    T, stride_t, scale,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, N_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP2_SUM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    tile = tl.program_id(0)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    chosen, slot, q, lse_sq = _route_tile(
        logits_ptr, stride_t, _load_bias(bias_ptr, cols, cmask, BLOCK_E, HAS_BIAS), ids_ptr,
        weights_ptr, rows, rows < T, cols, cmask, scale, E, K, BLOCK_T, BLOCK_E, SIGMOID,
        SOFTMAX_AFTER, RENORM, HAS_BIAS, KEY_LOGITS, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, TOP2_SUM,
        BLOCK_G)  # chosen, slot: [BLOCK_T, BLOCK_E]
    ch = chosen.to(tl.int32)
    tl.store(lrank_ptr + slot, tl.cumsum(ch, axis=0) - ch, mask=chosen)
    tl.store(hist_ptr + tile * BLOCK_E + cols, tl.sum(ch, axis=0))
    tl.store(part_ptr + tile * (E + 1) + cols, tl.sum(q, axis=0), mask=cmask)
    tl.store(part_ptr + tile * (E + 1) + E, tl.sum(lse_sq, axis=0))


@triton.jit
def _route_scan_kernel(
    hist_ptr,  # (NT, BLOCK_E) int32
    prefix_ptr,  # (NT, BLOCK_E) int32 out: slots of each expert in the earlier tiles
    counts_ptr,  # (E,) int32 out
    part_ptr,  # (NT, E+1) fp32
    prob_sum_ptr,  # (E,) fp32 out
    zsq_sum_ptr,  # () fp32 out
    NT,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    run = tl.zeros([BLOCK_C], tl.int32)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, NT, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        hmask = (p < NT)[:, None] & (cols < BLOCK_E)[None, :]
        h = tl.load(hist_ptr + p[:, None] * BLOCK_E + cols[None, :], mask=hmask, other=0)
        tl.store(prefix_ptr + p[:, None] * BLOCK_E + cols[None, :],
                 tl.cumsum(h, axis=0) - h + run[None, :], mask=hmask)
        run += tl.sum(h, axis=0)
        pmask = (p < NT)[:, None] & (cols < E + 1)[None, :]
        acc += tl.sum(tl.load(part_ptr + p[:, None] * (E + 1) + cols[None, :], mask=pmask,
                              other=0.0), axis=0)
    tl.store(counts_ptr + cols, run, mask=cols < E)
    tl.store(prob_sum_ptr + cols, acc, mask=cols < E)
    tl.store(zsq_sum_ptr + cols * 0, acc, mask=cols == E)


@triton.jit
def _route_scatter_kernel(
    ids_ptr, lrank_ptr, prefix_ptr, counts_ptr,
    kept_ptr, offsets_ptr,  # (E,), (E+1,) int32 out (program 0)
    slot_to_row_ptr,  # (T*K,) int32 out
    row_to_slot_ptr,  # (R,) int32 out
    N, NT, C, R,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    CAPACITY: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    counts = tl.load(counts_ptr + cols, mask=cmask, other=0)
    kept, starts, total = _layout(counts, cols, C, E, CAPACITY, PAD)
    if pid == 0:
        tl.store(kept_ptr + cols, kept, mask=cmask)
        tl.store(offsets_ptr + cols, starts, mask=cmask)
        tl.store(offsets_ptr + E, total)
    if pid < NT:
        j = tl.arange(0, BLOCK_S)
        s = pid * BLOCK_T * K + j  # this tile's slots
        smask = (j < BLOCK_T * K) & (s < N)
        e = tl.load(ids_ptr + s, mask=smask, other=0)
        rank = (tl.load(prefix_ptr + pid * BLOCK_E + e, mask=smask, other=0)
                + tl.load(lrank_ptr + s, mask=smask, other=0))
        onehot = cols[None, :] == e[:, None]  # [BLOCK_S, BLOCK_E]: the slot's expert's kept/start
        kept_e = tl.sum(tl.where(onehot, kept[None, :], 0), axis=1)
        start_e = tl.sum(tl.where(onehot, starts[None, :], 0), axis=1)
        keep = smask & (rank < kept_e)
        row = start_e + rank
        tl.store(slot_to_row_ptr + s, tl.where(keep, row, -1), mask=smask)
        tl.store(row_to_slot_ptr + row, s.to(tl.int32), mask=keep)
    else:
        r = (pid - NT) * BLOCK_R + tl.arange(0, BLOCK_R)
        _mark_empty_rows(row_to_slot_ptr, r, starts, kept, cols, cmask, R, BLOCK_R)


def route_fused(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
                block_t: int | None = None) -> tuple[Selection, RoutingPlan]:
    """The three-launch route; the caller checks `applies` (and validated the inputs).
    block_t: tokens per tile (a power of two; None picks ~2048 tile elements)."""
    T, E = logits.shape
    K = cfg.top_k
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    C = cfg.capacity(T)
    R = num_rows(T, cfg)
    block_e = max(2, next_pow2(E))
    block_t = block_t or max(1, min(128, 2048 // block_e))
    NT = triton.cdiv(T, block_t)
    i32 = dict(dtype=torch.int32, device=dev)
    ids, lrank = torch.empty((T, K), **i32), torch.empty((T, K), **i32)
    weights = torch.empty((T, K), dtype=torch.float32, device=dev)
    hist, prefix = torch.empty((NT, block_e), **i32), torch.empty((NT, block_e), **i32)
    part = torch.empty((NT, E + 1), dtype=torch.float32, device=dev)
    n_groups = cfg.n_groups
    _route_tiles_kernel[(NT,)](
        logits, bias if bias is not None else logits, ids, weights, lrank, hist, part,
        T, logits.stride(0), float(cfg.routed_scaling_factor),
        E=E, K=K, BLOCK_T=block_t, BLOCK_E=block_e,
        SIGMOID=cfg.score_func == "sigmoid", SOFTMAX_AFTER=cfg.softmax_after_topk,
        RENORM=cfg.renormalize, HAS_BIAS=bias is not None,
        KEY_LOGITS=cfg.softmax_after_topk or (bias is None and n_groups == 1),
        N_GROUPS=n_groups, GROUP_SIZE=E // n_groups, TOPK_GROUPS=cfg.topk_groups,
        TOP2_SUM=cfg.group_score == "top2_sum" and E // n_groups > 1,
        BLOCK_G=max(2, next_pow2(n_groups)), num_warps=4)
    counts = torch.empty((E,), **i32)
    prob_sum = torch.empty((E,), dtype=torch.float32, device=dev)
    zsq_sum = torch.empty((), dtype=torch.float32, device=dev)
    block_c = max(2, min(next_pow2(E + 1), 64))
    block_p = max(2, min(next_pow2(NT), 4096 // block_c))
    _route_scan_kernel[(triton.cdiv(max(block_e, E + 1), block_c),)](
        hist, prefix, counts, part, prob_sum, zsq_sum, NT,
        E=E, BLOCK_E=block_e, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    kept, offsets = torch.empty((E,), **i32), torch.empty((E + 1,), **i32)
    slot_to_row, row_to_slot = torch.empty((T, K), **i32), torch.empty((R,), **i32)
    block_r = max(16, min(1024, 8192 // block_e))
    _route_scatter_kernel[(NT + triton.cdiv(R, block_r),)](
        ids, lrank, prefix, counts, kept, offsets, slot_to_row, row_to_slot,
        T * K, NT, C or 0, R,
        E=E, K=K, BLOCK_T=block_t, BLOCK_E=block_e, CAPACITY=C is not None,
        PAD=cfg.pad_to_multiple, BLOCK_R=block_r, BLOCK_S=next_pow2(block_t * K), num_warps=4)
    sel = Selection(topk_ids=ids, topk_weights=weights, scores=None, prob_sum=prob_sum,
                    zsq_sum=zsq_sum)
    plan = RoutingPlan(expert_counts=counts, kept_counts=kept, expert_offsets=offsets,
                       slot_to_row=slot_to_row, row_to_slot=row_to_slot, capacity=C,
                       num_rows=R)
    return sel, plan
