"""Comparison helpers: dtype tolerances, worst-coordinate messages, poisoning."""

from __future__ import annotations

import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None,
                 name: str = "tensor") -> None:
    """|a - e| <= tol * (1 + |e|) elementwise; on failure name the worst coordinate."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    tol = TOL.get(expected.dtype, 1e-5) if tol is None else tol
    a, e = actual.double().cpu(), expected.double().cpu()
    assert not torch.isnan(a).any() or torch.isnan(e).any(), f"{name}: NaN in actual"
    err = (a - e).abs() / (1 + e.abs())
    if err.numel() and err.max() > tol:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{name}: max rel err {err.max():.3e} > {tol:.1e} at {idx}: "
                             f"actual {a[idx].item()!r} expected {e[idx].item()!r}")


def assert_equal_int(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """Integer metadata must match exactly; on failure name the first differing coordinate."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.cpu().long(), expected.cpu().long()
    diff = (a != e).nonzero()
    if diff.numel():
        idx = tuple(int(i) for i in diff[0])
        raise AssertionError(f"{name}: {diff.shape[0]} entries differ, first at {idx}: "
                             f"actual {a[idx].item()} expected {e[idx].item()}")


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape filled with a value no correct kernel writes (NaN or -7777)."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -7777)


PLAN_FIELDS = ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot")


def assert_route_matches_reference(sel, plan, logits, cfg, bias=None, priority=None,
                                   tol: float = 1e-5) -> None:
    """A fast route's Selection and RoutingPlan equal the reference's: ids and every plan field
    exactly, weights and the loss sums (where the route computed them) within tol."""
    from routerlib import reference as ref

    want_sel = ref.select(logits, cfg, bias)
    want = ref.build_plan(want_sel, cfg, priority)
    assert_equal_int(sel.topk_ids, want_sel.topk_ids, "topk_ids")
    assert_close(sel.topk_weights, want_sel.topk_weights, tol=tol, name="topk_weights")
    if sel.prob_sum is not None or sel.zsq_sum is not None:
        assert_close(sel.prob_sum, want_sel.prob_sum, tol=max(tol, 1e-4), name="prob_sum")
        assert_close(sel.zsq_sum, want_sel.zsq_sum, tol=max(tol, 1e-4), name="zsq_sum")
    assert plan.capacity == want.capacity and plan.num_rows == want.num_rows
    for f in PLAN_FIELDS:
        assert_equal_int(getattr(plan, f), getattr(want, f), f)
