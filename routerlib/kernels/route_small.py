"""Decode-size routing in ONE launch: score + top-K + loss sums + the whole plan in one program.

At decode sizes (T*E small enough for one program's registers) every stage of the routing path is
launch-bound: the general path takes four launches (top-K, its loss-sum reduction, the plan's
histogram and its rank/scatter). Here one program holds the [T, E] tile, selects with the same
`_select_tile` as the top-K kernel, and builds the plan for the "position" drop policy in
registers: slots are ordered t*K + k and a token takes an expert at most once, so a slot's rank
inside its expert is the number of earlier tokens that chose that expert, an exclusive cumsum of
the chosen mask down the token axis. Offsets are a cumsum across experts; the empty rows of the
buffer are marked -1 by the same program.

Scope: token choice, drop_policy="position", no gradient needed (inference/decode), not under
torch.compile, next_pow2(T) * next_pow2(E) <= MAX_TILE. routerlib.kernels.route uses it when
ROUTERLIB_SMALL_ROUTE=1 (off by default until it is measured on a GPU); everything else goes
through the general path. Results are identical to the general path (and the reference).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from routerlib.config import RouterConfig
from routerlib.kernels._topk_kernels import _load_bias, _route_tile, next_pow2
from routerlib.reference.plan import num_rows
from routerlib.types import RoutingPlan, Selection

MAX_TILE = 8192  # elements of the [T, E] tile one program holds


def enabled() -> bool:
    return os.environ.get("ROUTERLIB_SMALL_ROUTE", "0") == "1"


def applies(logits: torch.Tensor, cfg: RouterConfig) -> bool:
    """Whether the one-launch route handles this call (see the module docstring)."""
    T, E = logits.shape
    return (cfg.routing == "token_choice" and cfg.drop_policy == "position" and T >= 1
            and next_pow2(T) * max(2, next_pow2(E)) <= MAX_TILE
            and not (torch.is_grad_enabled() and logits.requires_grad)
            and not torch.compiler.is_compiling())


@triton.jit
def _layout(counts, cols, C, E: tl.constexpr, CAPACITY: tl.constexpr, PAD: tl.constexpr):
    """(kept [BLOCK_E], starts [BLOCK_E], rows in use) from the routed counts: capacity layout
    e*C with kept = min(count, C), or ragged segments padded to PAD. Padding columns hold 0."""
    if CAPACITY:
        kept = tl.minimum(counts, C)
        starts = cols * C
        total = E * C
    else:
        kept = counts
        padded = (kept + PAD - 1) // PAD * PAD
        starts = tl.cumsum(padded, axis=0) - padded
        total = tl.sum(padded, axis=0)
    return kept, starts, total


@triton.jit
def _mark_empty_rows(row_to_slot_ptr, r, starts, kept, cols, cmask, R, BLOCK_R: tl.constexpr):
    """Write -1 to the rows r that no slot fills. A row belongs to the last expert whose segment
    starts at or before it, and is empty unless it lies within that expert's kept count (rows
    past the last segment too). Filled rows are written by their slots, never here."""
    starts_real = tl.where(cmask, starts, 2147483647)
    e_of_r = tl.sum((starts_real[None, :] <= r[:, None]).to(tl.int32), axis=1) - 1
    onehot = cols[None, :] == e_of_r[:, None]  # [BLOCK_R, BLOCK_E]
    start_r = tl.sum(tl.where(onehot, starts[None, :], 0), axis=1)
    kept_r = tl.sum(tl.where(onehot, kept[None, :], 0), axis=1)
    tl.store(row_to_slot_ptr + r, tl.full([BLOCK_R], -1, tl.int32),
             mask=(r < R) & (r - start_r >= kept_r))


@triton.jit
def _route_small_kernel(
    logits_ptr,  # (T, E) fp32/bf16/fp16, row stride stride_t
    bias_ptr,  # (E,) selection bias; read only if HAS_BIAS
    ids_ptr,  # (T, K) int32 out
    weights_ptr,  # (T, K) fp32 out
    prob_sum_ptr,  # (E,) fp32 out
    zsq_sum_ptr,  # () fp32 out
    counts_ptr,  # (E,) int32 out: slots routed to each expert
    kept_ptr,  # (E,) int32 out
    offsets_ptr,  # (E+1,) int32 out
    slot_to_row_ptr,  # (T, K) int32 out
    row_to_slot_ptr,  # (R,) int32 out
    T, stride_t, scale, C, R,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, N_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP2_SUM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    CAPACITY: tl.constexpr,  # C experts-rows each (E x C layout); else ragged, padded to PAD
    PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    chosen, slot, q, lse_sq = _route_tile(
        logits_ptr, stride_t, _load_bias(bias_ptr, cols, cmask, BLOCK_E, HAS_BIAS), ids_ptr,
        weights_ptr, rows, rows < T, cols, cmask, scale, E, K, BLOCK_T, BLOCK_E, SIGMOID,
        SOFTMAX_AFTER, RENORM, HAS_BIAS, KEY_LOGITS, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, TOP2_SUM,
        BLOCK_G)  # chosen, slot: [BLOCK_T, BLOCK_E]
    tl.store(prob_sum_ptr + cols, tl.sum(q, axis=0), mask=cmask)
    tl.store(zsq_sum_ptr, tl.sum(lse_sq, axis=0))

    # the plan, "position" policy: rank in expert = earlier tokens that chose the same expert
    ch = chosen.to(tl.int32)
    erank = tl.cumsum(ch, axis=0) - ch  # [BLOCK_T, BLOCK_E]
    counts = tl.sum(ch, axis=0)  # [BLOCK_E]
    kept, starts, total = _layout(counts, cols, C, E, CAPACITY, PAD)
    keep = chosen & (erank < kept[None, :])
    row = starts[None, :] + erank
    tl.store(slot_to_row_ptr + slot, tl.where(keep, row, -1), mask=chosen)
    tl.store(row_to_slot_ptr + row, slot.to(tl.int32), mask=keep)
    tl.store(counts_ptr + cols, counts, mask=cmask)
    tl.store(kept_ptr + cols, kept, mask=cmask)
    tl.store(offsets_ptr + cols, starts, mask=cmask)
    tl.store(offsets_ptr + E, total)
    for r0 in range(0, R, BLOCK_R):
        _mark_empty_rows(row_to_slot_ptr, r0 + tl.arange(0, BLOCK_R), starts, kept, cols, cmask,
                         R, BLOCK_R)


def route_small(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None
                ) -> tuple[Selection, RoutingPlan]:
    """The one-launch route; the caller checks `applies` (and validated the inputs)."""
    T, E = logits.shape
    K = cfg.top_k
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    C = cfg.capacity(T)
    R = num_rows(T, cfg)
    i32 = dict(dtype=torch.int32, device=dev)
    ids, slot_to_row = torch.empty((T, K), **i32), torch.empty((T, K), **i32)
    weights = torch.empty((T, K), dtype=torch.float32, device=dev)
    prob_sum = torch.empty((E,), dtype=torch.float32, device=dev)
    zsq_sum = torch.empty((), dtype=torch.float32, device=dev)
    counts, kept = torch.empty((E,), **i32), torch.empty((E,), **i32)
    offsets, row_to_slot = torch.empty((E + 1,), **i32), torch.empty((R,), **i32)
    block_t, block_e = next_pow2(T), max(2, next_pow2(E))
    n_groups = cfg.n_groups
    _route_small_kernel[(1,)](
        logits, bias if bias is not None else logits, ids, weights, prob_sum, zsq_sum,
        counts, kept, offsets, slot_to_row, row_to_slot,
        T, logits.stride(0), float(cfg.routed_scaling_factor), C or 0, R,
        E=E, K=K, BLOCK_T=block_t, BLOCK_E=block_e,
        SIGMOID=cfg.score_func == "sigmoid", SOFTMAX_AFTER=cfg.softmax_after_topk,
        RENORM=cfg.renormalize, HAS_BIAS=bias is not None,
        KEY_LOGITS=cfg.softmax_after_topk or (bias is None and n_groups == 1),
        N_GROUPS=n_groups, GROUP_SIZE=E // n_groups, TOPK_GROUPS=cfg.topk_groups,
        TOP2_SUM=cfg.group_score == "top2_sum" and E // n_groups > 1,
        BLOCK_G=max(2, next_pow2(n_groups)),
        CAPACITY=C is not None, PAD=cfg.pad_to_multiple,
        BLOCK_R=max(16, min(1024, 8192 // block_e)),
        num_warps=4 if block_t * block_e <= 4096 else 8,
    )
    sel = Selection(topk_ids=ids, topk_weights=weights, scores=None, prob_sum=prob_sum,
                    zsq_sum=zsq_sum)
    plan = RoutingPlan(expert_counts=counts, kept_counts=kept, expert_offsets=offsets,
                       slot_to_row=slot_to_row, row_to_slot=row_to_slot, capacity=C,
                       num_rows=R)
    return sel, plan
