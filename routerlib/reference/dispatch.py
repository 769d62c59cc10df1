"""Dispatch (gather tokens into expert-major rows) and combine (weighted K-way sum back), in
readable PyTorch; autograd gives the backward (a gather's backward is a scatter-add)."""

from __future__ import annotations

import torch

from routerlib.types import RoutingPlan


def _check_rows(t: torch.Tensor, name: str, rows: int | None, ref: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, the plan needs {rows}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the plan is on {ref.device}")


def dispatch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[T, D] -> [R, D]: row r holds x[row_to_slot[r] // S]; empty rows are zero."""
    T = plan.slot_to_row.shape[0]
    _check_rows(x, "x", T, plan.row_to_slot)
    S = plan.slots_per_token
    slot = plan.row_to_slot.long()
    token = torch.where(slot >= 0, slot // S, T)  # T points at the zero row below
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return x_pad.index_select(0, token)


def combine(expert_out: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor) -> torch.Tensor:
    """[R, D] -> [T, D]: y[t] = sum_j weights[t, j] * expert_out[slot_to_row[t, j]], in fp32.
    A dropped slot (row -1) adds nothing; the residual carries its token."""
    _check_rows(expert_out, "expert_out", plan.num_rows, plan.row_to_slot)
    if weights.shape != plan.slot_to_row.shape:
        raise ValueError(f"weights must have shape {tuple(plan.slot_to_row.shape)}, got "
                         f"{tuple(weights.shape)}")
    if weights.device != plan.slot_to_row.device:
        raise ValueError(f"weights is on {weights.device} but the plan is on "
                         f"{plan.slot_to_row.device}")
    T, S = plan.slot_to_row.shape
    R, D = expert_out.shape
    rows = plan.slot_to_row.long()
    valid = rows >= 0
    out_pad = torch.cat([expert_out, expert_out.new_zeros(1, D)])
    rows = torch.where(valid, rows, R)
    w = weights.float() * valid
    y = expert_out.new_zeros(T, D, dtype=torch.float32)
    for j in range(S):  # one K-way term at a time: T*D of fp32 live, not T*S*D
        y = y + w[:, j, None] * out_pad.index_select(0, rows[:, j]).float()
    return y.to(expert_out.dtype)
