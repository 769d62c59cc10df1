"""Dispatch: gather token rows into the expert-major buffer, and its backward.

    rows[r] = x[row_to_slot[r] // S]      (zero where row_to_slot[r] == -1)
    grad_x[t] = sum_j grad_rows[slot_to_row[t, j]] over kept slots, in fp32

Memory traffic (bytes per element s): forward reads T*D*s and writes R*D*s (the floor: each token
row is read once and written to its K rows; empty rows get zeros); backward reads T*K*D*s and
writes T*D*s. The kernels live in `_rowmap.py` (dispatch forward is `scatter_rows`, its backward
is `gather_reduce` with unit weights: the dual of a gather is a scatter-add, written here as a
gather over slot_to_row so that it is deterministic and needs no atomics).

Two ways in, same kernels:
  - `DispatchFunction` (torch.autograd.Function): the eager path, lowest Python overhead.
  - `torch.ops.routerlib.dispatch` (torch.library custom op with register_fake and
    register_autograd): what torch.compile sees, so it neither graph-breaks nor syncs; CUDA graphs
    can capture it (after autotuning has run once, or with a pinned config).
`dispatch(x, plan)` picks the custom op while compiling and the Function otherwise.
"""

from __future__ import annotations

import torch

from routerlib.kernels import _rowmap
from routerlib.types import RoutingPlan


def check_device(t: torch.Tensor, name: str) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not t.is_cuda and not _rowmap.interpreting():
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 to run them on the CPU)")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _rowmap.SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype must be float32, bfloat16 or float16, got {t.dtype}")


def check_rows(t: torch.Tensor, name: str, rows: int, plan: RoutingPlan) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows (shape {tuple(t.shape)}), the plan needs "
                         f"{rows}")
    if t.device != plan.slot_to_row.device:
        raise ValueError(f"{name} is on {t.device} but the plan is on {plan.slot_to_row.device}")
    check_float(t, name)
    check_device(t, name)


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile, CUDA graphs)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("routerlib::dispatch", mutates_args=())
def dispatch_op(x: torch.Tensor, slot_to_row: torch.Tensor, row_to_slot: torch.Tensor
                ) -> torch.Tensor:
    """[T, D] -> [R, D] with R = row_to_slot.shape[0] and S = slot_to_row.shape[1]."""
    return _rowmap.scatter_rows(x, slot_to_row, row_to_slot)[0]


@dispatch_op.register_fake
def _dispatch_fake(x, slot_to_row, row_to_slot):
    return x.new_empty((row_to_slot.shape[0], x.shape[1]))


@torch.library.custom_op("routerlib::dispatch_backward", mutates_args=())
def dispatch_backward_op(grad_rows: torch.Tensor, slot_to_row: torch.Tensor) -> torch.Tensor:
    """[R, D] -> [T, D]: grad_x[t] = sum_j grad_rows[slot_to_row[t, j]] (fp32 accumulation)."""
    return _rowmap.gather_reduce(grad_rows, slot_to_row)


@dispatch_backward_op.register_fake
def _dispatch_backward_fake(grad_rows, slot_to_row):
    return grad_rows.new_empty((slot_to_row.shape[0], grad_rows.shape[1]))


def _dispatch_setup(ctx, inputs, output) -> None:
    _, slot_to_row, _ = inputs
    ctx.save_for_backward(slot_to_row)


def _dispatch_grad(ctx, grad_rows):
    (slot_to_row,) = ctx.saved_tensors
    return torch.ops.routerlib.dispatch_backward(grad_rows, slot_to_row), None, None


dispatch_op.register_autograd(_dispatch_grad, setup_context=_dispatch_setup)


# ----------------------------------------------------------------------------------------------
# Eager autograd path
# ----------------------------------------------------------------------------------------------

class DispatchFunction(torch.autograd.Function):
    """Same maths as the custom op, without the dispatcher's Python overhead (decode sizes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot_to_row: torch.Tensor, row_to_slot: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(slot_to_row)
        return _rowmap.scatter_rows(x, slot_to_row, row_to_slot)[0]

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (slot_to_row,) = ctx.saved_tensors
        return _rowmap.gather_reduce(grad_rows, slot_to_row), None, None


def dispatch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[T, D] -> [R, D]: row r holds x[row_to_slot[r] // S]; empty rows are zero.

    Differentiable in x. Equals routerlib.reference.dispatch (bit for bit: a copy).
    """
    check_rows(x, "x", plan.slot_to_row.shape[0], plan)
    if torch.compiler.is_compiling():
        return torch.ops.routerlib.dispatch(x, plan.slot_to_row, plan.row_to_slot)
    return DispatchFunction.apply(x, plan.slot_to_row, plan.row_to_slot)
