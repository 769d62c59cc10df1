"""The routing plan in readable PyTorch: counts, offsets, each slot's row, capacity dropping.

The reference ranks slots inside their expert with a stable sort (simple to read). The kernels
compute the same ranks without a sort (histogram + scan + local rank): the results must be equal
integer for integer.

Order inside an expert (and so which slots survive capacity) follows the drop policy:
    position: slot index s = t*S + j (arrival order; token-major)
    priority: weight descending, then slot index (Batch Prioritized Routing)
    random:   a random key per slot descending, then slot index
"""

from __future__ import annotations

import torch

from routerlib.config import RouterConfig
from routerlib.types import RoutingPlan, Selection


def num_rows(num_tokens: int, cfg: RouterConfig) -> int:
    """R: rows of the expert buffer, a bound that depends on shapes only (CUDA-graph friendly)."""
    C = cfg.capacity(num_tokens)
    if C is not None:
        return cfg.num_experts * C
    return num_tokens * cfg.slots_per_token + cfg.num_experts * (cfg.pad_to_multiple - 1)


def policy_order(sel: Selection, cfg: RouterConfig, priority: torch.Tensor | None) -> torch.Tensor:
    """[T*S] slot indices in the order the drop policy serves them."""
    n = sel.topk_ids.numel()
    slots = torch.arange(n, device=sel.topk_ids.device)
    if cfg.drop_policy == "position":
        return slots
    if cfg.drop_policy == "priority":
        key = sel.topk_weights.detach().reshape(-1).float()
    else:
        if priority is None:
            raise ValueError("drop_policy='random' needs a priority tensor of random keys [T, S]")
        if priority.shape != sel.topk_ids.shape:
            raise ValueError(f"priority must have shape {tuple(sel.topk_ids.shape)}, got "
                             f"{tuple(priority.shape)}")
        key = priority.reshape(-1).float()
    return torch.sort(key, descending=True, stable=True).indices  # ties: lower slot first


def rank_in_expert(flat_ids: torch.Tensor, order: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's 0-based place among the slots of its expert, in `order`.
    Returns (rank, counts)."""
    ids_in_order = flat_ids[order].long()
    counts = torch.bincount(ids_in_order, minlength=num_experts)  # [E]
    by_expert = torch.sort(ids_in_order, stable=True).indices  # grouped by expert, order kept
    starts = torch.cumsum(counts, 0) - counts  # [E] exclusive prefix
    rank_sorted = torch.arange(order.numel(), device=order.device) - starts[ids_in_order[by_expert]]
    rank = torch.empty_like(flat_ids, dtype=torch.long)
    rank[order[by_expert]] = rank_sorted
    return rank, counts


def build_plan(sel: Selection, cfg: RouterConfig, priority: torch.Tensor | None = None
               ) -> RoutingPlan:
    """Turn a selection into a RoutingPlan (see routerlib.types.RoutingPlan for every field)."""
    T, S = sel.topk_ids.shape
    E = cfg.num_experts
    device = sel.topk_ids.device
    C = cfg.capacity(T)
    flat_ids = sel.topk_ids.reshape(-1).long()  # [T*S]

    if cfg.routing == "expert_choice":
        rank = sel.expert_rank.reshape(-1).long()
        kept = rank >= 0
        counts = torch.bincount(flat_ids[kept], minlength=E)
    else:
        rank, counts = rank_in_expert(flat_ids, policy_order(sel, cfg, priority), E)
        kept = torch.ones_like(rank, dtype=torch.bool) if C is None else rank < C

    kept_counts = counts if C is None else counts.clamp(max=C)
    if C is not None:
        offsets = torch.arange(E + 1, device=device) * C
    else:
        block = cfg.pad_to_multiple
        padded = (kept_counts + block - 1) // block * block
        offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), padded.cumsum(0)])

    R = num_rows(T, cfg)
    slot_to_row = torch.where(kept, offsets[flat_ids] + rank, -1)  # [T*S]
    row_to_slot = torch.full((R,), -1, dtype=torch.long, device=device)
    slots = torch.arange(T * S, device=device)
    row_to_slot[slot_to_row[kept]] = slots[kept]
    return RoutingPlan(
        expert_counts=counts.to(torch.int32),
        kept_counts=kept_counts.to(torch.int32),
        expert_offsets=offsets.to(torch.int32),
        slot_to_row=slot_to_row.view(T, S).to(torch.int32),
        row_to_slot=row_to_slot.to(torch.int32),
        capacity=C,
        num_rows=R,
    )
