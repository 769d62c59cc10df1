"""Result dataclasses shared by the reference and the kernels: the contract between them.

A *slot* is one (token, choice) pair, flattened as s = t*S + j (S = K for token choice, S = E
for expert choice). A *row* is one line of the expert-major buffer that the experts read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """What the scoring + selection stage produces.

    topk_ids:     [T, S] int32 expert of each slot
    topk_weights: [T, S] fp32  combine weight of each slot (after renormalisation and scaling)
    scores:       [T, E] fp32  softmax/sigmoid of the logits (no bias), or None where a fast path
                  did not materialise them
    prob_sum:     [E] fp32     sum over tokens of each token's distribution over experts (softmax
                  scores, or sigmoid scores normalised per token): the P_e of the balance loss
                  is prob_sum / T. Differentiable.
    zsq_sum:      [] fp32      sum over tokens of logsumexp(logits)^2 (z-loss = zsq_sum / T).
    expert_rank:  [T, S] int32 or None; expert choice only: the slot's rank in its expert's pick
                  list (-1 if the expert did not pick the token)
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    scores: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None
    zsq_sum: torch.Tensor | None = None
    expert_rank: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.topk_ids.dtype == torch.int32, self.topk_ids.dtype
        assert self.topk_weights.shape == self.topk_ids.shape
        assert self.topk_weights.dtype == torch.float32, self.topk_weights.dtype
        assert self.scores is None or self.scores.dtype == torch.float32, self.scores.dtype

    @classmethod
    def of_kernel(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Selection:
        """The selection of a kernel whose outputs are int32 / fp32 [T, K] by construction
        (the fast route: views of one allocation), without __post_init__'s checks: they cost ~1.5 us
        of host time an eager route. The kernels' tests compare these outputs with the
        reference's, dtypes and shapes included."""
        sel = cls.__new__(cls)
        sel.__dict__.update(topk_ids=topk_ids, topk_weights=topk_weights, scores=None,
                            prob_sum=None, zsq_sum=None, expert_rank=None)
        return sel


@dataclass
class RoutingPlan:
    """Routing metadata: where every slot goes in the expert-major buffer. Computed without a sort.

    expert_counts:  [E]    int32  slots routed to each expert, before capacity
    kept_counts:    [E]    int32  slots each expert keeps (= expert_counts when dropless)
    expert_offsets: [E+1]  int32  first row of each expert's segment; segments are padded to
                                  pad_to_multiple (ragged) or are exactly C long (capacity);
                                  expert_offsets[E] = rows in use
    slot_to_row:    [T, S] int32  buffer row of each slot, -1 if the slot is dropped / not picked
    row_to_slot:    [R]    int32  slot that fills each row (token = slot // S), -1 for empty rows
    capacity:       C, or None for the dropless ragged layout
    num_rows:       R, a static bound that depends on shapes only (never on the data):
                    E*C (capacity) or T*S + E*(pad_to_multiple-1) (ragged)
    """

    expert_counts: torch.Tensor
    kept_counts: torch.Tensor
    expert_offsets: torch.Tensor
    slot_to_row: torch.Tensor
    row_to_slot: torch.Tensor
    capacity: int | None
    num_rows: int

    def __post_init__(self) -> None:
        for name in ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row",
                     "row_to_slot"):
            t = getattr(self, name)
            assert t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}"
        assert self.row_to_slot.shape == (self.num_rows,)

    @classmethod
    def of_kernel(cls, expert_counts: torch.Tensor, kept_counts: torch.Tensor,
                  expert_offsets: torch.Tensor, slot_to_row: torch.Tensor,
                  row_to_slot: torch.Tensor, capacity: int | None, num_rows: int
                  ) -> RoutingPlan:
        """A plan of a kernel's int32 outputs of the right shapes by construction (see
        Selection.of_kernel), without __post_init__'s checks (~2 us of host time)."""
        plan = cls.__new__(cls)
        plan.__dict__.update(expert_counts=expert_counts, kept_counts=kept_counts,
                             expert_offsets=expert_offsets, slot_to_row=slot_to_row,
                             row_to_slot=row_to_slot, capacity=capacity, num_rows=num_rows)
        return plan

    @property
    def num_experts(self) -> int:
        return self.expert_counts.shape[0]

    @property
    def slots_per_token(self) -> int:
        return self.slot_to_row.shape[1]

    def num_dropped(self) -> torch.Tensor:
        """Token-slots routed to an expert but not kept (a 0-d int tensor; no host sync)."""
        return (self.expert_counts.sum() - self.kept_counts.sum()).to(torch.int64)


@dataclass
class RouterOutput:
    """Everything the router returns for one forward pass."""

    logits: torch.Tensor  # [T, E] the gate logits (fp32)
    selection: Selection
    plan: RoutingPlan
    aux_loss: torch.Tensor  # 0-d fp32, already multiplied by its coefficient (0 if off)
    z_loss: torch.Tensor  # 0-d fp32, already multiplied by its coefficient (0 if off)

    @property
    def topk_ids(self) -> torch.Tensor:
        return self.selection.topk_ids

    @property
    def topk_weights(self) -> torch.Tensor:
        return self.selection.topk_weights
