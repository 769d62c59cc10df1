"""routerlib.reference.plan: counts, capacity dropping by policy, offsets (capacity layout and
padded ragged layout), slot_to_row / row_to_slot; hand cases, naive agreement, invariants."""

from __future__ import annotations

import dataclasses

import naive
import pytest
import torch
from helpers import assert_equal_int
from hypothesis import given
from hypothesis import strategies as st

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.types import RoutingPlan, Selection


def selection(ids: list[list[int]], weights: list[list[float]] | None = None) -> Selection:
    t = torch.tensor(ids, dtype=torch.int32)
    w = torch.ones(t.shape) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return Selection(topk_ids=t, topk_weights=w)


def check_invariants(plan: RoutingPlan, sel: Selection, cfg: RouterConfig) -> None:
    """What every plan must satisfy, whatever the policy and layout."""
    T, S = sel.topk_ids.shape
    E, C = cfg.num_experts, plan.capacity
    counts, kept = plan.expert_counts.long(), plan.kept_counts.long()
    offsets = plan.expert_offsets.long()
    s2r, r2s = plan.slot_to_row.long().reshape(-1), plan.row_to_slot.long()
    ids = sel.topk_ids.long().reshape(-1)
    for name in ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot"):
        assert getattr(plan, name).dtype == torch.int32, name
    assert counts.shape == (E,) and offsets.shape == (E + 1,) and plan.slot_to_row.shape == (T, S)
    assert C == cfg.capacity(T) and plan.num_rows == ref.num_rows(T, cfg) == r2s.shape[0]

    # every token-slot is dispatched or counted dropped (expert choice: or not picked)
    n_kept = int((s2r >= 0).sum())
    assert n_kept == int(kept.sum())
    if cfg.routing == "token_choice":
        assert_equal_int(counts, torch.bincount(ids, minlength=E), "expert_counts")
        assert int(kept.sum() + plan.num_dropped()) == T * S
    else:
        assert int(plan.num_dropped()) == 0 and torch.equal(counts, kept)
        assert_equal_int(counts, (sel.expert_rank >= 0).sum(0), "picked per expert")
    assert plan.num_dropped().dtype == torch.int64 and plan.num_dropped().dim() == 0
    assert_equal_int(kept, counts if C is None else counts.clamp(max=C), "kept_counts")

    # offsets: start at 0, monotone, exactly C apart or padded to the block
    assert offsets[0] == 0 and (offsets[1:] >= offsets[:-1]).all()
    sizes = offsets[1:] - offsets[:-1]
    if C is not None:
        assert (sizes == C).all()
    else:
        block = cfg.pad_to_multiple
        assert ((sizes % block) == 0).all()  # padded to the block
        assert (sizes >= kept).all() and (sizes - kept < block).all()  # by less than a block
    assert offsets[E] <= plan.num_rows

    # each kept slot sits inside its expert's segment, within capacity, rows used once
    slots = torch.arange(T * S)
    k = s2r >= 0
    rows, e = s2r[k], ids[k]
    assert (rows >= offsets[e]).all() and (rows < offsets[e] + kept[e]).all()
    if C is not None:
        assert (rows - offsets[e] < C).all()
    assert rows.unique().numel() == rows.numel()
    # row_to_slot and slot_to_row are inverse on kept slots; the other rows are empty
    assert_equal_int(r2s[rows], slots[k], "row_to_slot[slot_to_row]")
    filled = r2s >= 0
    assert int(filled.sum()) == n_kept
    assert_equal_int(s2r[r2s[filled]], torch.arange(plan.num_rows)[filled],
                     "slot_to_row[row_to_slot]")


def check_against_naive(plan: RoutingPlan, sel: Selection, cfg: RouterConfig,
                        priority: torch.Tensor | None = None) -> None:
    """The reference plan equals the naive walk over the slots, integer for integer."""
    T = sel.topk_ids.shape[0]
    rank = None if sel.expert_rank is None else sel.expert_rank.tolist()
    npl = naive.build_plan(sel.topk_ids.tolist(), sel.topk_weights.tolist(), cfg, T, priority,
                           rank)
    assert plan.capacity == npl.capacity and plan.num_rows == npl.num_rows
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)
    assert_equal_int(plan.expert_counts, i32(npl.expert_counts), "expert_counts")
    assert_equal_int(plan.kept_counts, i32(npl.kept_counts), "kept_counts")
    assert_equal_int(plan.expert_offsets, i32(npl.expert_offsets), "expert_offsets")
    assert_equal_int(plan.slot_to_row, i32(npl.slot_to_row).reshape(plan.slot_to_row.shape),
                     "slot_to_row")
    assert_equal_int(plan.row_to_slot, i32(npl.row_to_slot), "row_to_slot")


# ---------------------------------------------------------------------------------------------
# hand-checked cases

IDS_4x1 = [[0], [0], [1], [0]]  # expert 0 gets tokens 0, 1, 3; expert 1 gets token 2


def test_position_capacity_by_hand():
    # T=4, E=2, K=1, cf=1: C = ceil(4/2) = 2, so expert 0 keeps its first two arrivals
    cfg = RouterConfig(num_experts=2, top_k=1, capacity_factor=1.0)
    plan = ref.build_plan(selection(IDS_4x1), cfg)
    assert plan.capacity == 2 and plan.num_rows == 4
    assert plan.expert_counts.tolist() == [3, 1]
    assert plan.kept_counts.tolist() == [2, 1]
    assert plan.expert_offsets.tolist() == [0, 2, 4]
    assert plan.slot_to_row.tolist() == [[0], [1], [2], [-1]]  # token 3 arrives last: dropped
    assert plan.row_to_slot.tolist() == [0, 1, 2, -1]
    assert int(plan.num_dropped()) == 1


def test_priority_capacity_by_hand():
    # same routing; expert 0 serves by weight: token 3 (.7), token 1 (.5), token 0 (.1) dropped
    cfg = RouterConfig(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="priority")
    plan = ref.build_plan(selection(IDS_4x1, [[0.1], [0.5], [0.9], [0.7]]), cfg)
    assert plan.slot_to_row.tolist() == [[-1], [1], [2], [0]]
    assert plan.row_to_slot.tolist() == [3, 1, 2, -1]


def test_random_capacity_by_hand():
    # random keys: expert 0 serves token 0 (.8), token 1 (.3), then token 3 (.1) is dropped
    cfg = RouterConfig(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="random")
    prio = torch.tensor([[0.8], [0.3], [0.0], [0.1]])
    plan = ref.build_plan(selection(IDS_4x1, [[0.1], [0.5], [0.9], [0.7]]), cfg, prio)
    assert plan.slot_to_row.tolist() == [[0], [1], [2], [-1]]
    assert plan.row_to_slot.tolist() == [0, 1, 2, -1]


def test_priority_ties_go_to_lower_slot_by_hand():
    # all weights equal: priority order is slot order, i.e. the position policy
    cfg = RouterConfig(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="priority")
    plan = ref.build_plan(selection(IDS_4x1, [[0.5]] * 4), cfg)
    assert plan.slot_to_row.tolist() == [[0], [1], [2], [-1]]


def test_ragged_padded_by_hand():
    # T=3, K=2, E=3, dropless, pad 4. Slots in arrival order s=t*2+j:
    #   0:(t0,e0) 1:(t0,e2) 2:(t1,e2) 3:(t1,e0) 4:(t2,e2) 5:(t2,e1)
    # counts [2, 1, 3]; each segment padded to 4 -> offsets [0, 4, 8, 12];
    # R = T*S + E*(4-1) = 6 + 9 = 15
    cfg = RouterConfig(num_experts=3, top_k=2, pad_to_multiple=4)
    plan = ref.build_plan(selection([[0, 2], [2, 0], [2, 1]]), cfg)
    assert plan.capacity is None and plan.num_rows == 15
    assert plan.expert_counts.tolist() == [2, 1, 3] == plan.kept_counts.tolist()
    assert plan.expert_offsets.tolist() == [0, 4, 8, 12]
    assert plan.slot_to_row.tolist() == [[0, 8], [9, 1], [10, 4]]
    expected = [-1] * 15
    for row, slot in ((0, 0), (1, 3), (4, 5), (8, 1), (9, 2), (10, 4)):
        expected[row] = slot
    assert plan.row_to_slot.tolist() == expected
    assert int(plan.num_dropped()) == 0


def test_ragged_unpadded_with_empty_expert_by_hand():
    # expert 1 gets nothing: an empty segment, offsets [0, 2, 2, 3]
    cfg = RouterConfig(num_experts=3, top_k=1)
    plan = ref.build_plan(selection([[2], [0], [0]]), cfg)
    assert plan.expert_offsets.tolist() == [0, 2, 2, 3]
    assert plan.slot_to_row.tolist() == [[2], [0], [1]]
    assert plan.row_to_slot.tolist() == [1, 2, 0]


def test_expert_choice_plan_by_hand():
    # the expert-choice case of test_reference_gating: expert 0 picks tokens 0 then 2, expert 1
    # tokens 1 then 3; C = 2 so offsets [0, 2, 4]; slot = t*E + e
    cfg = RouterConfig(num_experts=2, top_k=1, routing="expert_choice", capacity_factor=1.0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0]])
    sel = ref.select(logits, cfg)
    plan = ref.build_plan(sel, cfg)
    assert plan.expert_counts.tolist() == [2, 2] == plan.kept_counts.tolist()
    assert plan.expert_offsets.tolist() == [0, 2, 4]
    assert plan.slot_to_row.tolist() == [[0, -1], [-1, 2], [1, -1], [-1, 3]]
    assert plan.row_to_slot.tolist() == [0, 4, 3, 7]
    assert int(plan.num_dropped()) == 0


def test_capacity_rows_follow_policy_order_by_hand():
    # K=2, E=2, C = ceil(1*3*2/2) = 3: nothing dropped, but rows inside an expert follow the
    # priority order: expert 0 gets weights .2 (t0), .9 (t1), .5 (t2) -> rows t1, t2, t0
    cfg = RouterConfig(num_experts=2, top_k=2, capacity_factor=1.0, drop_policy="priority")
    sel = selection([[0, 1], [0, 1], [0, 1]], [[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    plan = ref.build_plan(sel, cfg)
    assert plan.slot_to_row.tolist() == [[2, 3], [0, 5], [1, 4]]


# ---------------------------------------------------------------------------------------------
# agreement with the naive walk + invariants, random inputs

# (T, E, K, selection overrides, edge covered)
SHAPES = [
    (1, 4, 2, {}, "a single token"),
    (7, 5, 2, {}, "odd T, E not a power of two"),
    (16, 6, 1, {}, "k=1"),
    (5, 6, 6, {}, "k=E: every expert gets every token"),
    (9, 1, 1, {}, "one expert"),
    (12, 8, 3, dict(score_func="sigmoid", n_groups=4, topk_groups=2, renormalize=True),
     "groups leave experts empty"),
    (13, 7, 2, dict(renormalize=True), "renormalised (weights tie often)"),
]
# (plan overrides, what it covers)
LAYOUTS = [
    (dict(), "dropless"),
    (dict(pad_to_multiple=4), "dropless padded to 4"),
    (dict(pad_to_multiple=3), "dropless padded to 3"),
    (dict(capacity_factor=0.5), "heavy dropping"),
    (dict(capacity_factor=1.25), "light dropping"),
    (dict(capacity_factor=1.0, min_capacity=4), "min_capacity"),
    (dict(capacity_factor=16.0), "nothing dropped"),
]
POLICIES = ["position", "priority", "random"]


def _route(T: int, E: int, K: int, overrides: dict, seed: int, ties: bool = False):
    cfg = RouterConfig(num_experts=E, top_k=K, **overrides)
    g = torch.Generator().manual_seed(seed)
    if ties:
        logits = torch.randint(-2, 3, (T, E), generator=g).float() / 2 + 0.1
    else:
        logits = torch.randn(T, E, generator=g)
    sel = ref.select(logits, cfg)
    prio = torch.rand(T, cfg.slots_per_token, generator=g)
    if ties:
        prio = (prio * 4).floor()  # equal random keys: ties to the lower slot
    return cfg, sel, prio


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout, lwhy", LAYOUTS, ids=[w for _, w in LAYOUTS])
@pytest.mark.parametrize("T, E, K, overrides, why", SHAPES, ids=[s[4] for s in SHAPES])
def test_plan_matches_naive(T, E, K, overrides, why, layout, lwhy, policy):
    cfg, sel, prio = _route(T, E, K, {**overrides, **layout, "drop_policy": policy}, seed=T + E,
                            ties=(T % 2 == 1))
    prio = prio if policy == "random" else None
    plan = ref.build_plan(sel, cfg, prio)
    check_invariants(plan, sel, cfg)
    check_against_naive(plan, sel, cfg, prio)


@pytest.mark.parametrize("T, E, K, cf", [(9, 5, 2, 1.0), (1, 3, 1, 2.0), (6, 4, 3, 0.5),
                                         (5, 3, 1, 8.0), (8, 8, 2, 1.25)])
def test_expert_choice_plan_matches_naive(T, E, K, cf):
    cfg, sel, _ = _route(T, E, K, dict(routing="expert_choice", capacity_factor=cf), seed=T)
    plan = ref.build_plan(sel, cfg)
    check_invariants(plan, sel, cfg)
    check_against_naive(plan, sel, cfg)


@pytest.mark.parametrize("layout", [dict(), dict(pad_to_multiple=8), dict(capacity_factor=1.0)])
def test_all_tokens_to_one_expert(layout):
    T, E, K = 10, 6, 2
    logits = torch.randn(T, E)
    logits[:, 3] += 100.0  # expert 3 first for every token, the others share the second slot
    cfg = RouterConfig(num_experts=E, top_k=K, **layout)
    sel = ref.select(logits, cfg)
    plan = ref.build_plan(sel, cfg)
    check_invariants(plan, sel, cfg)
    check_against_naive(plan, sel, cfg)
    assert plan.expert_counts[3] == T
    if cfg.capacity_factor is not None:  # C = ceil(10*2/6) = 4: 6 of expert 3's 10 dropped
        assert plan.kept_counts[3] == 4 and int(plan.num_dropped()) >= 6
        assert plan.slot_to_row[:4, 0].tolist() == [12, 13, 14, 15]  # the first four arrivals
        assert (plan.slot_to_row[4:, 0] == -1).all()


def test_plan_empty_batch():
    cfg = RouterConfig(num_experts=3, top_k=2, pad_to_multiple=4)
    sel = selection([[0, 1]])
    sel = Selection(topk_ids=sel.topk_ids[:0], topk_weights=sel.topk_weights[:0])
    plan = ref.build_plan(sel, cfg)
    assert plan.expert_offsets.tolist() == [0, 0, 0, 0] and plan.num_rows == 9
    assert (plan.row_to_slot == -1).all() and int(plan.num_dropped()) == 0


def test_num_rows_depends_on_shapes_only():
    cfg = RouterConfig(num_experts=4, top_k=2, pad_to_multiple=8)
    rows = {ref.build_plan(_route(6, 4, 2, dict(pad_to_multiple=8), seed=s)[1], cfg).num_rows
            for s in range(4)}
    assert rows == {6 * 2 + 4 * 7}
    assert ref.num_rows(6, RouterConfig(num_experts=4, top_k=2, capacity_factor=1.0)) == 4 * 3


@st.composite
def plan_inputs(draw):
    """Random (not top-k) ids, weights drawn from a small set (ties), any policy and layout."""
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, 3))
    T = draw(st.integers(1, 8))
    kw: dict = dict(num_experts=E, top_k=min(K, E), drop_policy=draw(st.sampled_from(POLICIES)))
    if draw(st.booleans()):
        kw.update(capacity_factor=draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 4.0])),
                  min_capacity=draw(st.integers(1, 3)))
    else:
        kw.update(pad_to_multiple=draw(st.sampled_from([1, 2, 4, 5])))
    cfg = RouterConfig(**kw)
    S = cfg.top_k
    ids = draw(st.lists(st.lists(st.integers(0, E - 1), min_size=S, max_size=S), min_size=T,
                        max_size=T))
    w = draw(st.lists(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=S, max_size=S),
                      min_size=T, max_size=T))
    prio = torch.tensor(draw(st.lists(st.lists(st.sampled_from([0.1, 0.2, 0.7]), min_size=S,
                                               max_size=S), min_size=T, max_size=T)))
    return cfg, selection(ids, w), prio


@given(plan_inputs())
def test_plan_property(inputs):
    cfg, sel, prio = inputs
    plan = ref.build_plan(sel, cfg, prio)
    check_invariants(plan, sel, cfg)
    check_against_naive(plan, sel, cfg, prio if cfg.drop_policy == "random" else None)


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_random_policy_needs_priority():
    cfg = RouterConfig(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="random")
    with pytest.raises(ValueError, match=r"drop_policy='random' needs a priority tensor"):
        ref.build_plan(selection(IDS_4x1), cfg)


def test_random_policy_priority_shape():
    cfg = RouterConfig(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="random")
    with pytest.raises(ValueError, match=r"priority must have shape \(4, 1\), got \(4, 2\)"):
        ref.build_plan(selection(IDS_4x1), cfg, torch.rand(4, 2))


def test_of_kernel_constructors_set_every_field():
    """Selection/RoutingPlan.of_kernel skip __post_init__ (route_rows' eager host path): they
    must still set every dataclass field, to the value given or the field's default, so that a
    field added later cannot go missing on the fast path."""
    ids = torch.arange(6, dtype=torch.int32).reshape(3, 2)
    weights = torch.rand(3, 2)
    sel = Selection.of_kernel(ids, weights)
    full = Selection(topk_ids=ids, topk_weights=weights)
    plan_args = dict(expert_counts=torch.tensor([2, 4], dtype=torch.int32),
                     kept_counts=torch.tensor([2, 3], dtype=torch.int32),
                     expert_offsets=torch.tensor([0, 2, 5], dtype=torch.int32),
                     slot_to_row=torch.tensor([[0, 2], [1, 3], [4, -1]], dtype=torch.int32),
                     row_to_slot=torch.tensor([0, 2, 1, 3, 4], dtype=torch.int32),
                     capacity=3, num_rows=5)
    plan = RoutingPlan.of_kernel(*plan_args.values())
    for fast, checked in ((sel, full), (plan, RoutingPlan(**plan_args))):
        names = [f.name for f in dataclasses.fields(checked)]
        assert list(vars(fast)) == names
        for n in names:
            assert getattr(fast, n) is getattr(checked, n), n
