"""routerlib.reference.dispatch: dispatch (gather into expert-major rows) and combine (weighted
K-way sum back, fp32 accumulation); hand cases, naive agreement, invariants, gradients, errors."""

from __future__ import annotations

import naive
import pytest
import torch
from helpers import TOL, assert_close, poison_like
from hypothesis import given
from hypothesis import strategies as st

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.types import RoutingPlan, Selection

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def route(T: int, E: int, K: int, seed: int = 0, **overrides) -> tuple[RouterConfig, Selection,
                                                                        RoutingPlan]:
    cfg = RouterConfig(num_experts=E, top_k=K, **overrides)
    g = torch.Generator().manual_seed(seed)
    sel = ref.select(torch.randn(T, E, generator=g), cfg)
    prio = torch.rand(T, cfg.slots_per_token, generator=g)
    return cfg, sel, ref.build_plan(sel, cfg, prio)


def hand_plan() -> RoutingPlan:
    # T=3, K=2, E=3 ragged, pad 2 (see test_reference_plan's hand case for the layout rules):
    # slots 0:(t0,e0) 1:(t0,e2) 2:(t1,e2) 3:(t1,e0) 4:(t2,e2) 5:(t2,e1)
    # counts [2, 1, 3] padded to 2 -> [2, 2, 4], offsets [0, 2, 4, 8]; R = 6 + 3 = 9
    cfg = RouterConfig(num_experts=3, top_k=2, pad_to_multiple=2)
    ids = torch.tensor([[0, 2], [2, 0], [2, 1]], dtype=torch.int32)
    plan = ref.build_plan(Selection(topk_ids=ids, topk_weights=torch.ones(3, 2)), cfg)
    assert plan.row_to_slot.tolist() == [0, 3, 5, -1, 1, 2, 4, -1, -1]
    return plan


# ---------------------------------------------------------------------------------------------
# hand-checked cases


def test_dispatch_by_hand():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    rows = ref.dispatch(x, hand_plan())
    # row r holds x[slot // 2]: tokens 0, 1, 2, (empty), 0, 1, 2, (empty), (empty)
    expected = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [0.0, 0.0], [1.0, 10.0],
                             [2.0, 20.0], [3.0, 30.0], [0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(rows, expected)


def test_combine_by_hand():
    plan = hand_plan()  # slot_to_row [[0, 4], [5, 1], [6, 2]]
    out = torch.arange(9, dtype=torch.float32)[:, None].repeat(1, 2)  # row r holds [r, r]
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.1, 0.0]])
    y = ref.combine(out, plan, w)
    # t0: .5*row0 + .25*row4 = 1; t1: 1*row5 + 2*row1 = 7; t2: .1*row6 + 0*row2 = .6
    assert_close(y, torch.tensor([[1.0, 1.0], [7.0, 7.0], [0.6, 0.6]]))


def test_combine_dropped_slot_adds_nothing_by_hand():
    # T=4, E=2, K=1, C=2: token 3 is dropped (slot_to_row -1); its output row is zero even with a
    # huge weight, and no row's content reaches it
    cfg = RouterConfig(num_experts=2, top_k=1, capacity_factor=1.0)
    ids = torch.tensor([[0], [0], [1], [0]], dtype=torch.int32)
    plan = ref.build_plan(Selection(topk_ids=ids, topk_weights=torch.ones(4, 1)), cfg)
    out = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = ref.combine(out, plan, torch.tensor([[1.0], [1.0], [1.0], [1e30]]))
    assert y.tolist() == [[1.0], [2.0], [3.0], [0.0]]


# ---------------------------------------------------------------------------------------------
# agreement with the naive loops

# (T, E, K, plan overrides, edge covered)
CASES = [
    (1, 4, 2, {}, "a single token"),
    (7, 5, 2, dict(pad_to_multiple=4), "odd T, padded segments"),
    (16, 6, 1, dict(capacity_factor=0.5), "k=1 with heavy dropping"),
    (5, 6, 6, {}, "k=E"),
    (9, 1, 1, dict(capacity_factor=1.0), "one expert"),
    (11, 7, 3, dict(capacity_factor=1.25, drop_policy="priority"), "priority dropping"),
    (10, 8, 2, dict(capacity_factor=0.75, drop_policy="random"), "random dropping"),
    (9, 5, 2, dict(routing="expert_choice", capacity_factor=1.0), "expert choice"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E, K, overrides, why", CASES, ids=[c[4] for c in CASES])
def test_dispatch_combine_match_naive(T, E, K, overrides, why, dtype):
    cfg, sel, plan = route(T, E, K, seed=T * E, **overrides)
    D = 5
    x = torch.randn(T, D).to(dtype)
    rows = ref.dispatch(x, plan)
    assert rows.dtype == dtype and rows.shape == (plan.num_rows, D)
    assert torch.equal(rows, naive.dispatch(x, plan.row_to_slot.tolist(), cfg.slots_per_token))

    expert_out = torch.randn(plan.num_rows, D).to(dtype)
    empty = plan.row_to_slot < 0
    expert_out[empty] = poison_like(expert_out[empty])  # unused rows must never be read
    y = ref.combine(expert_out, plan, sel.topk_weights)
    assert y.dtype == dtype and y.shape == (T, D)
    expected = naive.combine(expert_out, plan.slot_to_row.tolist(), sel.topk_weights)
    # one rounding to dtype after an fp32 sum: the dtype's tolerance
    assert_close(y, expected.to(dtype), tol=TOL[dtype], name="combine")


@given(T=st.integers(1, 8), E=st.integers(1, 6), K=st.integers(1, 3), D=st.integers(1, 4),
       cf=st.sampled_from([None, 0.5, 1.0, 2.0]), pad=st.sampled_from([1, 2, 4]),
       policy=st.sampled_from(["position", "priority", "random"]), seed=st.integers(0, 999))
def test_dispatch_combine_property(T, E, K, D, cf, pad, policy, seed):
    K = min(K, E)
    cfg, sel, plan = route(T, E, K, seed, capacity_factor=cf, pad_to_multiple=pad,
                           drop_policy=policy)
    x = torch.randn(T, D, dtype=torch.float64)
    rows = ref.dispatch(x, plan)
    assert torch.equal(rows, naive.dispatch(x, plan.row_to_slot.tolist(), K))
    # combine(dispatch(x)) with unit weights returns (number of kept slots of t) * x[t]
    kept = (plan.slot_to_row >= 0).sum(1, keepdim=True).double()  # [T, 1]
    y = ref.combine(rows, plan, torch.ones(T, K))
    assert_close(y, kept * x, tol=1e-6, name="combine(dispatch(x))")
    w = sel.topk_weights
    assert_close(ref.combine(rows, plan, w),
                 naive.combine(rows, plan.slot_to_row.tolist(), w), tol=1e-6, name="combine")


# ---------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("overrides", [dict(), dict(pad_to_multiple=4),
                                       dict(capacity_factor=0.5),
                                       dict(capacity_factor=0.5, drop_policy="priority"),
                                       dict(routing="expert_choice", capacity_factor=1.0)],
                         ids=["dropless", "padded", "capacity", "priority", "expert choice"])
def test_combine_of_dispatch_is_k_times_x_on_kept_slots(overrides):
    T, E, K, D = 12, 5, 3, 4
    cfg, _, plan = route(T, E, K, seed=7, **overrides)
    S = cfg.slots_per_token
    x = torch.randn(T, D)
    rows = ref.dispatch(x, plan)
    # empty rows are zero, filled rows are their token's row
    filled = plan.row_to_slot >= 0
    assert (rows[~filled] == 0).all()
    assert torch.equal(rows[filled], x[plan.row_to_slot[filled].long() // S])
    kept = plan.slot_to_row >= 0  # [T, S]
    y = ref.combine(rows, plan, torch.ones(T, S))
    assert_close(y, kept.sum(1, keepdim=True) * x, name="combine(dispatch(x))")
    if cfg.routing == "token_choice" and cfg.capacity_factor is None:
        assert_close(y, K * x, name="dropless: K*x")
    # only kept slots contribute: changing the weights of dropped slots changes nothing
    w = torch.rand(T, S)
    w_noise = torch.where(kept, w, torch.full_like(w, 1e6))
    assert torch.equal(ref.combine(rows, plan, w), ref.combine(rows, plan, w_noise))


def test_combine_accumulates_in_fp32():
    # one term of 256 then 127 terms of 1 (bf16 rows): a bf16 running sum stalls at 256 (256 + 1
    # rounds back to 256), the fp32 sum is 383, which rounds once to the bf16 value 384
    T, E = 1, 128
    cfg = RouterConfig(num_experts=E, top_k=E)
    plan = ref.build_plan(ref.select(torch.zeros(T, E), cfg), cfg)
    out = torch.ones(plan.num_rows, 1, dtype=torch.bfloat16)
    w = torch.ones(T, E)
    w[0, 0] = 256.0
    y = ref.combine(out, plan, w)
    assert y.dtype == torch.bfloat16 and y.item() == 384.0


# ---------------------------------------------------------------------------------------------
# gradients


def test_dispatch_gradcheck():
    _, _, plan = route(6, 4, 2, seed=1, capacity_factor=0.75, pad_to_multiple=1)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.dispatch(t, plan), (x,))


def test_dispatch_backward_is_scatter_add():
    cfg, _, plan = route(7, 4, 3, seed=2, pad_to_multiple=2)
    x = torch.randn(7, 3, requires_grad=True)
    g = torch.randn(plan.num_rows, 3)
    ref.dispatch(x, plan).backward(g)
    expected = torch.zeros(7, 3)
    for r, s in enumerate(plan.row_to_slot.tolist()):
        if s >= 0:
            expected[s // cfg.slots_per_token] += g[r]
    assert_close(x.grad, expected)


@pytest.mark.parametrize("overrides", [dict(pad_to_multiple=2), dict(capacity_factor=0.75),
                                       dict(routing="expert_choice", capacity_factor=1.0)],
                         ids=["ragged", "capacity", "expert choice"])
def test_combine_gradcheck(overrides):
    # combine accumulates in fp32 by design, also for float64 inputs: the finite-difference step
    # and tolerances are sized for fp32 outputs (a wrong gradient is O(1) off here)
    cfg, sel, plan = route(5, 4, 2, seed=3, **overrides)
    out = torch.randn(plan.num_rows, 3, dtype=torch.float64, requires_grad=True)
    w = sel.topk_weights.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda o, ww: ref.combine(o, plan, ww), (out, w),
                                    eps=1e-3, atol=1e-4, rtol=1e-3)


def test_combine_gradients_by_formula():
    # d y[t] / d w[t, j] = expert_out[row(t, j)] (0 if dropped); d y / d expert_out[row] = w
    cfg, sel, plan = route(6, 4, 2, seed=4, capacity_factor=0.5)
    out = torch.randn(plan.num_rows, 3, requires_grad=True)
    w = torch.rand(6, 2, requires_grad=True)
    gy = torch.randn(6, 3)
    ref.combine(out, plan, w).backward(gy)
    exp_w = torch.zeros(6, 2)
    exp_out = torch.zeros(plan.num_rows, 3)
    for t, rows in enumerate(plan.slot_to_row.tolist()):
        for j, r in enumerate(rows):
            if r >= 0:
                exp_w[t, j] = (gy[t] * out[r].detach()).sum()
                exp_out[r] += w[t, j].detach() * gy[t]
    assert int(plan.num_dropped()) > 0  # the case covers dropped slots
    assert_close(w.grad, exp_w, name="dw")
    assert_close(out.grad, exp_out, name="d expert_out")


# ---------------------------------------------------------------------------------------------
# bad inputs


@pytest.fixture
def small() -> tuple[Selection, RoutingPlan]:
    _, sel, plan = route(4, 3, 2, seed=5)  # T=4, S=2, R=8 rows
    return sel, plan


def test_dispatch_rejects_wrong_rank(small):
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \(4,\)"):
        ref.dispatch(torch.zeros(4), small[1])


def test_dispatch_rejects_wrong_token_count(small):
    with pytest.raises(ValueError, match=r"x has 5 rows, the plan needs 4"):
        ref.dispatch(torch.zeros(5, 2), small[1])


def test_dispatch_rejects_other_device(small):
    with pytest.raises(ValueError, match=r"x is on meta but the plan is on cpu"):
        ref.dispatch(torch.zeros(4, 2, device="meta"), small[1])


def test_combine_rejects_wrong_rank(small):
    sel, plan = small
    with pytest.raises(ValueError, match=r"expert_out must be 2-D, got shape \(8, 2, 1\)"):
        ref.combine(torch.zeros(8, 2, 1), plan, sel.topk_weights)


def test_combine_rejects_wrong_row_count(small):
    sel, plan = small
    with pytest.raises(ValueError, match=r"expert_out has 7 rows, the plan needs 8"):
        ref.combine(torch.zeros(7, 2), plan, sel.topk_weights)


def test_combine_rejects_wrong_weights_shape(small):
    _, plan = small
    with pytest.raises(ValueError, match=r"weights must have shape \(4, 2\), got \(4, 3\)"):
        ref.combine(torch.zeros(8, 2), plan, torch.ones(4, 3))


def test_combine_rejects_other_device(small):
    sel, plan = small
    with pytest.raises(ValueError, match=r"expert_out is on meta but the plan is on cpu"):
        ref.combine(torch.zeros(8, 2, device="meta"), plan, sel.topk_weights)
    with pytest.raises(ValueError, match=r"weights is on meta but the plan is on cpu"):
        ref.combine(torch.zeros(8, 2), plan, sel.topk_weights.to("meta"))
