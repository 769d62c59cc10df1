"""Sort-free routing plan in Triton: histogram, offsets, ranks, capacity dropping, padding.

Equal, integer for integer, to routerlib.reference.plan.build_plan for token-choice routing, for
every drop policy, capacity and padding. No host synchronisation and static output shapes, so the
plan can be captured in a CUDA graph and traced by torch.compile (custom op
"routerlib::routing_plan").

How (N = T*K slots, s = t*K + k): a counting sort of the slot ids by expert.
  1. _block_hist_kernel: per block of BLOCK slots, a histogram over experts (partials [NB, E],
     they stay in L2);
  2. _plan_kernel, per block, in one fused program: total counts and the prefix of earlier blocks
     (each program sums the partials itself: no scan launch), kept counts (min(count, C)),
     offsets (e*C, or the exclusive prefix of kept counts padded to pad_to_multiple), each slot's
     stable rank (block prefix + its place after an in-register tl.sort of the block's
     (expert, index) keys), slot_to_row / row_to_slot, and -1 on the empty rows it owns.
  When N <= SINGLE_MAX_SLOTS, step 1 disappears: one program does it all (1 launch).
  priority / random: step 2 writes the slots grouped by expert to scratch, and _key_rank_kernel
  counts, for each slot, the same-expert slots that beat it (key desc, slot asc): O(count_e^2)
  comparisons per expert, in parallel tiles. Correct for any data; slow when one expert gets a
  huge batch (65536 slots to one expert: ~2e9 comparisons).

Measured (CUDA graph, per plan, H200 then H100 similar): T=16384, E=128, K=8 position 15.6-16 us
(2 launches); T=64 4.0 us and T=128 9.0 us (1 launch); T=512 12 us; T=65536, E=256-512 90-101 us;
priority T=16384 113 us (H100, 3 launches).
tl.sort of a large block is the cost (one 4096-slot program: 69 us). A variant with 128-slot
blocks, a separate scan launch and [128, 128] comparisons instead of the sort measured slower
(23 us at T=16384; 3 launches). Open: a faster in-block rank.

Launches (num_launches): position 1 (N <= SINGLE_MAX_SLOTS) or 2; priority/random one more.
Outputs come from torch.empty: no fill kernels, no host sync, static shapes.

Memory traffic (position): ids N*4 bytes read twice, slot_to_row N*4 and row_to_slot R*4 written,
partials NB*E*4 written once and read back by each of the NB programs (from L2).
"""

from __future__ import annotations

from fractions import Fraction

import torch
import triton

from routerlib.config import RouterConfig
from routerlib.kernels._plan_kernels import _block_hist_kernel, _key_rank_kernel, _plan_kernel
from routerlib.types import RoutingPlan

SINGLE_MAX_SLOTS = 1024  # up to this many slots (T*K) the plan is one program, one launch
_POLICIES = ("position", "priority", "random")
_KEY_BI, _KEY_BJ = 64, 256  # tile of the priority-rank comparisons


def _new_int32(n: int, device: torch.device) -> torch.Tensor:
    """Allocates an output (tests swap in a poisoning allocator: every entry must be written)."""
    return torch.empty(n, dtype=torch.int32, device=device)


@torch._dynamo.assume_constant_result
def _capacity_ratio(capacity_factor: float) -> tuple[int, int]:
    """capacity_factor as the exact decimal fraction (num, den) that RouterConfig.capacity uses;
    a constant for torch.compile, which cannot trace Fraction (a float argument: torch 2.11's
    dynamo cannot pass a frozen dataclass to an assume_constant_result function)."""
    f = Fraction(str(capacity_factor))
    return f.numerator, f.denominator


def _shapes(num_tokens: int, cfg: RouterConfig) -> tuple[int | None, int]:
    """(C, R) = (cfg.capacity(T), reference num_rows) in integer arithmetic that torch.compile
    traces (T may be symbolic). tests/test_kernel_plan.py checks it against cfg.capacity."""
    E, K = cfg.num_experts, cfg.top_k
    if cfg.capacity_factor is None:
        return None, num_tokens * K + E * (cfg.pad_to_multiple - 1)
    num, den = _capacity_ratio(cfg.capacity_factor)
    C = max(cfg.min_capacity, -(-(num * num_tokens * K) // (den * E)))  # ceil
    return C, E * C


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block_size(num_slots: int, num_experts: int, block_slots: int | None) -> int:
    """Slots per program. Auto: one program up to SINGLE_MAX_SLOTS; beyond, blocks of 1024-4096
    slots, larger when there are many blocks x experts (each program sums all the partials)."""
    if block_slots is not None:
        if block_slots < 16 or block_slots & (block_slots - 1):
            raise ValueError(f"block_slots={block_slots}: must be a power of two >= 16")
        return block_slots
    if num_slots <= SINGLE_MAX_SLOTS:
        return max(16, _pow2(num_slots))
    block = 1024
    while block < 4096 and triton.cdiv(num_slots, block) * _pow2(num_experts) > 128 * 128:
        block *= 2
    return block


def num_launches(num_slots: int, cfg: RouterConfig, block_slots: int | None = None) -> int:
    """Kernel launches build_plan makes for T*K = num_slots (no other device work, no sync)."""
    single = triton.cdiv(num_slots, _block_size(num_slots, cfg.num_experts, block_slots)) <= 1
    return (1 if single else 2) + (cfg.drop_policy != "position")


def _plan_impl(topk_ids: torch.Tensor, key: torch.Tensor | None, num_experts: int, capacity: int,
               pad_to_multiple: int, num_rows: int, policy: str, block_slots: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The launches. capacity < 0: dropless ragged layout. key: [T, K] fp32 for priority/random."""
    T, K = topk_ids.shape
    N, E, R = T * K, num_experts, num_rows
    dev = topk_ids.device
    ids = topk_ids.contiguous().view(-1)  # [N]
    capacity_mode = capacity >= 0
    group = policy != "position"
    block = _block_size(N, E, block_slots if block_slots > 0 else None)
    e_pad = max(16, _pow2(E))
    nb = max(1, triton.cdiv(N, block))
    single = nb == 1
    if E * nb >= 2**31 or R >= 2**31 or N >= 2**31:
        raise ValueError(f"T*K={N} slots, num_rows={R} or num_experts={E} x {nb} blocks "
                         "overflows int32")

    i32 = dict(dtype=torch.int32, device=dev)
    counts, kept = _new_int32(E, dev), _new_int32(E, dev)
    offsets = _new_int32(E + 1, dev)
    slot_to_row = _new_int32(N, dev)
    row_to_slot = _new_int32(R, dev)
    partial = ids if single else torch.empty(nb, e_pad, **i32)  # unused when single
    if group:
        scratch = torch.empty(3, N, **i32)  # grouped slots, experts, sortable keys
        seg = torch.empty(E + 1, **i32)
        key_flat = key.contiguous().view(-1)
    else:
        scratch, seg, key_flat = row_to_slot.new_empty(3, 1), offsets, ids  # unused

    fill_w = capacity if capacity_mode else pad_to_multiple - 1
    fill_w = max(1, fill_w)
    n_cand = E * fill_w if (capacity_mode or pad_to_multiple > 1) else 0
    tail = 0 if capacity_mode else E * (pad_to_multiple - 1)
    fill = 1024 if block >= 1024 else max(128, block)
    num_warps = 4 if block <= 1024 else 8

    if not single:
        _block_hist_kernel[(nb,)](ids, partial, N, BLOCK=block, E_PAD=e_pad, num_warps=4)
    _plan_kernel[(nb,)](
        ids, key_flat, partial, counts, kept, offsets, slot_to_row, row_to_slot,
        seg, scratch[0], scratch[1], scratch[2],
        N, E, max(capacity, 0), pad_to_multiple, R, nb, fill_w,
        triton.cdiv(n_cand, nb), triton.cdiv(tail, nb),
        CAPACITY=capacity_mode, GROUP=group, SINGLE=single, BLOCK=block, E_PAD=e_pad,
        PB=max(1, min(_pow2(nb), 4096 // e_pad)), FILL=fill, num_warps=num_warps)
    if group:
        _key_rank_kernel[(triton.cdiv(N, _KEY_BI),)](
            scratch[0], scratch[1], scratch[2], seg, offsets, slot_to_row, row_to_slot,
            N, max(capacity, 0), CAPACITY=capacity_mode, BI=_KEY_BI, BJ=_KEY_BJ, num_warps=4)
    return counts, kept, offsets, slot_to_row.view(T, K), row_to_slot


@torch.library.custom_op("routerlib::routing_plan", mutates_args=())
def routing_plan(topk_ids: torch.Tensor, key: torch.Tensor | None, num_experts: int,
                 capacity: int, pad_to_multiple: int, num_rows: int, policy: str,
                 block_slots: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert_counts [E], kept_counts [E], expert_offsets [E+1], slot_to_row [T, K],
    row_to_slot [R]), all int32. capacity < 0 means dropless; key [T, K] fp32 orders the slots
    of an expert for policy 'priority' / 'random' (None for 'position'); block_slots 0 = auto."""
    return _plan_impl(topk_ids, key, num_experts, capacity, pad_to_multiple, num_rows, policy,
                      block_slots)


@routing_plan.register_fake
def _(topk_ids, key, num_experts, capacity, pad_to_multiple, num_rows, policy, block_slots=0):
    new = lambda *shape: topk_ids.new_empty(shape, dtype=torch.int32)
    return (new(num_experts), new(num_experts), new(num_experts + 1), new(*topk_ids.shape),
            new(num_rows))


def build_plan(topk_ids: torch.Tensor, topk_weights: torch.Tensor, cfg: RouterConfig,
               priority: torch.Tensor | None = None, *, block_slots: int | None = None
               ) -> RoutingPlan:
    """The routing plan of token-choice routing (see routerlib.types.RoutingPlan for the fields).

    topk_ids:     [T, K] int32 expert of each slot
    topk_weights: [T, K] fp32  its weight: the key of drop_policy='priority'
    priority:     [T, K] random keys for drop_policy='random' (larger first)
    block_slots:  slots per program (a power of two); None picks one. Small values force the
                  multi-block path (tests).
    """
    if cfg.routing != "token_choice":
        raise ValueError(f"routing={cfg.routing!r}: the kernel plan is for token_choice; expert "
                         "choice plans with routerlib.reference.build_plan")
    if topk_ids.dtype != torch.int32 or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be a [T, K] int32 tensor, got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    T, K = topk_ids.shape
    if K != cfg.top_k:
        raise ValueError(f"topk_ids has K={K} columns, cfg.top_k={cfg.top_k}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have shape {tuple(topk_ids.shape)}, got "
                         f"{tuple(topk_weights.shape)}")
    if cfg.drop_policy not in _POLICIES:
        raise ValueError(f"drop_policy={cfg.drop_policy!r}: must be one of {_POLICIES}")
    key = None
    if cfg.drop_policy == "priority":
        key = topk_weights.detach().float()
    elif cfg.drop_policy == "random":
        if priority is None:
            raise ValueError("drop_policy='random' needs a priority tensor of random keys [T, S]")
        if priority.shape != topk_ids.shape:
            raise ValueError(f"priority must have shape {tuple(topk_ids.shape)}, got "
                             f"{tuple(priority.shape)}")
        key = priority.detach().float()
    C, R = _shapes(T, cfg)
    args = (topk_ids, key, cfg.num_experts, -1 if C is None else C, cfg.pad_to_multiple, R,
            cfg.drop_policy, block_slots or 0)
    # eager calls launch directly (the custom-op dispatcher costs host time at decode sizes);
    # torch.compile traces the op
    impl = routing_plan if torch.compiler.is_compiling() else _plan_impl
    counts, kept, offsets, slot_to_row, row_to_slot = impl(*args)
    return RoutingPlan(expert_counts=counts, kept_counts=kept, expert_offsets=offsets,
                       slot_to_row=slot_to_row, row_to_slot=row_to_slot, capacity=C, num_rows=R)


__all__ = ["SINGLE_MAX_SLOTS", "build_plan", "num_launches", "routing_plan"]
