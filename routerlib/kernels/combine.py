"""Combine: the weighted K-way sum of expert rows back to tokens, and its backward.

    y[t] = sum_j weights[t, j] * expert_out[slot_to_row[t, j]]     fp32 accumulation, dropped
                                                                   slots (row -1) add nothing
    grad_expert_out[slot_to_row[t, j]] = weights[t, j] * grad_y[t]   (zero for empty rows)
    grad_weights[t, j] = <grad_y[t], expert_out[slot_to_row[t, j]]>  fp32 (0 for dropped slots)

Memory traffic (bytes per element s): forward reads T*K*D*s (+ T*K*8 of indices and weights) and
writes T*D*s, the floor; backward reads grad_y once (T*D*s) and the kept expert rows (T*K*D*s),
writes grad_expert_out (R*D*s) and grad_weights, all in one kernel. The kernels live in
`_rowmap.py`: forward is `gather_reduce`, backward is `scatter_rows` with weights and dots.

Two ways in, same kernels (see dispatch.py): `CombineFunction` for eager, the custom op
`torch.ops.routerlib.combine` (+ `routerlib::combine_backward`) for torch.compile and CUDA graphs.
"""

from __future__ import annotations

import torch

from routerlib.kernels import _rowmap
from routerlib.kernels.dispatch import check_rows
from routerlib.types import RoutingPlan


def _combine_backward(grad_y: torch.Tensor, expert_out: torch.Tensor, slot_to_row: torch.Tensor,
                      row_to_slot: torch.Tensor, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out, grad_w = _rowmap.scatter_rows(grad_y, slot_to_row, row_to_slot, weights=weights,
                                            dot_src=expert_out, out_dtype=expert_out.dtype)
    return grad_out, grad_w


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile, CUDA graphs)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("routerlib::combine", mutates_args=())
def combine_op(expert_out: torch.Tensor, slot_to_row: torch.Tensor, row_to_slot: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """[R, D] -> [T, D]. row_to_slot is unused forward; the backward needs it (empty rows)."""
    return _rowmap.gather_reduce(expert_out, slot_to_row, weights)


@combine_op.register_fake
def _combine_fake(expert_out, slot_to_row, row_to_slot, weights):
    return expert_out.new_empty((slot_to_row.shape[0], expert_out.shape[1]))


@torch.library.custom_op("routerlib::combine_backward", mutates_args=())
def combine_backward_op(grad_y: torch.Tensor, expert_out: torch.Tensor, slot_to_row: torch.Tensor,
                        row_to_slot: torch.Tensor, weights: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_expert_out [R, D] in expert_out's dtype, grad_weights [T, S] fp32)."""
    return _combine_backward(grad_y, expert_out, slot_to_row, row_to_slot, weights)


@combine_backward_op.register_fake
def _combine_backward_fake(grad_y, expert_out, slot_to_row, row_to_slot, weights):
    return torch.empty_like(expert_out), weights.new_empty(slot_to_row.shape, dtype=torch.float32)


def _combine_setup(ctx, inputs, output) -> None:
    expert_out, slot_to_row, row_to_slot, weights = inputs
    ctx.save_for_backward(expert_out, slot_to_row, row_to_slot, weights)


def _combine_grad(ctx, grad_y):
    expert_out, slot_to_row, row_to_slot, weights = ctx.saved_tensors
    grad_out, grad_w = torch.ops.routerlib.combine_backward(grad_y, expert_out, slot_to_row,
                                                            row_to_slot, weights)
    return grad_out, None, None, grad_w


combine_op.register_autograd(_combine_grad, setup_context=_combine_setup)


# ----------------------------------------------------------------------------------------------
# Eager autograd path
# ----------------------------------------------------------------------------------------------

class CombineFunction(torch.autograd.Function):
    """Same maths as the custom op, without the dispatcher's Python overhead (decode sizes)."""

    @staticmethod
    def forward(ctx, expert_out: torch.Tensor, slot_to_row: torch.Tensor,
                row_to_slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(expert_out, slot_to_row, row_to_slot, weights)
        return _rowmap.gather_reduce(expert_out, slot_to_row, weights)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        expert_out, slot_to_row, row_to_slot, weights = ctx.saved_tensors
        grad_out, grad_w = _combine_backward(grad_y, expert_out, slot_to_row, row_to_slot, weights)
        return grad_out, None, None, grad_w


def combine(expert_out: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor) -> torch.Tensor:
    """[R, D] -> [T, D]: y[t] = sum_j weights[t, j] * expert_out[slot_to_row[t, j]], accumulated in
    fp32, returned in expert_out's dtype. A dropped slot (row -1) adds nothing.

    weights: [T, S] (fp32; other float dtypes are cast, and their gradient cast back).
    Differentiable in expert_out and weights. Equals routerlib.reference.combine.
    """
    check_rows(expert_out, "expert_out", plan.num_rows, plan)
    if weights.shape != plan.slot_to_row.shape:
        raise ValueError(f"weights must have shape {tuple(plan.slot_to_row.shape)}, got "
                         f"{tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a float tensor, got {weights.dtype}")
    if weights.device != expert_out.device:
        raise ValueError(f"weights is on {weights.device} but expert_out is on "
                         f"{expert_out.device}")
    weights = weights.float()
    if torch.compiler.is_compiling():
        return torch.ops.routerlib.combine(expert_out, plan.slot_to_row, plan.row_to_slot, weights)
    return CombineFunction.apply(expert_out, plan.slot_to_row, plan.row_to_slot, weights)
