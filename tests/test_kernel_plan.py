"""Triton routing plan (routerlib.kernels.plan) == reference plan, integer for integer.

CPU: run with TRITON_INTERPRET=1 (small shapes). GPU: the same tests plus large shapes (gpu mark).
Outputs are poisoned (the allocator of the kernel module is swapped for one that fills -7777), so
an entry that no kernel writes shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equal_int, poison_like

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.kernels import plan as kplan
from routerlib.types import RoutingPlan, Selection

FIELDS = ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def poisoned(n: int, device: torch.device) -> torch.Tensor:
        return poison_like(torch.empty(n, dtype=torch.int32, device=device))

    monkeypatch.setattr(kplan, "_new_int32", poisoned)


def _ids(pattern: str, T: int, E: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """[T, K] int32 expert ids with K distinct experts per token, drawn by pattern."""
    if pattern == "uniform":
        pool = torch.arange(E)
        weights = torch.ones(T, E)
    elif pattern == "skewed":  # a few hot experts: capacity drops, long segments
        weights = torch.rand(T, E, generator=gen) ** 8 + 1e-3
        weights[:, 0] += 50.0
        pool = torch.arange(E)
    elif pattern == "empty":  # only the lower half of the experts is ever chosen (empty experts)
        pool = torch.arange(max(K, (E + 1) // 2))
        weights = torch.ones(T, pool.numel())
    elif pattern == "one":  # choice 0 of every token is expert 0 (all-to-one when K = 1)
        rest = [torch.randperm(E - 1, generator=gen)[:K - 1] + 1 for _ in range(T)]
        return torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), r]) for r in rest]).int()
    else:
        raise ValueError(pattern)
    picks = torch.multinomial(weights, K, replacement=False, generator=gen)  # [T, K]
    return pool[picks].int()


def _weights(T: int, K: int, ties: bool, gen: torch.Generator) -> torch.Tensor:
    w = torch.rand(T, K, generator=gen)
    return (w * 4).floor() / 4 if ties else w  # ties: only 4 distinct values


def _check(ids: torch.Tensor, w: torch.Tensor, cfg: RouterConfig, prio: torch.Tensor | None,
           block: int | None = None) -> RoutingPlan:
    """Kernel plan == reference plan in every field, plus the plan's invariants."""
    got = kplan.build_plan(ids, w, cfg, prio, block_slots=block)
    want = ref.build_plan(Selection(ids, w), cfg, prio)
    assert got.capacity == want.capacity and got.num_rows == want.num_rows
    for name in FIELDS:
        assert_equal_int(getattr(got, name), getattr(want, name), name)
    # invariants: every slot kept or dropped; row_to_slot inverts slot_to_row on kept slots
    T, K = ids.shape
    s2r = got.slot_to_row.reshape(-1).long()
    kept = s2r >= 0
    assert int(got.kept_counts.sum()) == int(kept.sum())
    assert int(kept.sum()) + int(got.num_dropped()) == T * K
    assert int(got.expert_counts.sum()) == T * K
    r2s = got.row_to_slot.long()
    assert torch.equal(r2s[s2r[kept]].cpu(), torch.arange(T * K, device=s2r.device)[kept].cpu())
    assert int((r2s >= 0).sum()) == int(kept.sum())
    return got


def _cfg(E, K, cf, pad, policy, min_cap=1):
    return RouterConfig(num_experts=E, top_k=K, capacity_factor=cf, min_capacity=min_cap,
                        pad_to_multiple=pad, drop_policy=policy)


# (T, E, K, capacity_factor, min_capacity, pad_to_multiple): each line names its edge
SHAPES = [
    (1, 1, 1, None, 1, 1),  # one slot, one expert
    (1, 8, 8, 1.0, 1, 4),  # one token, K = E
    (5, 3, 2, 0.5, 1, 16),  # heavy dropping, non-power-of-two E; padding > segment
    (5, 3, 3, None, 1, 4),  # K = E dropless padded
    (37, 13, 2, 1.25, 1, 1),  # odd sizes, Switch-like capacity
    (37, 13, 1, None, 1, 16),  # top-1 ragged, pad 16
    (37, 8, 2, 4.0, 1, 1),  # capacity far above counts: mostly empty rows
    (37, 64, 2, 0.5, 3, 1),  # min_capacity wins over the factor
    (300, 8, 2, 1.0, 1, 4),  # several blocks when forced
    (300, 64, 1, None, 1, 16),  # many experts, ragged
    (300, 130, 2, 1.25, 1, 1),  # E > 128, not a power of two
    (37, 130, 1, None, 1, 4),  # E > T*K: most experts empty
]
POLICIES = ("position", "priority", "random")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T,E,K,cf,min_cap,pad", SHAPES)
def test_plan_from_reference_select(device, T, E, K, cf, min_cap, pad, policy):
    """ids and weights from reference.select on random logits (weights tie-free, realistic)."""
    cfg = _cfg(E, K, cf, pad, policy, min_cap)
    logits = torch.randn(T, E, device=device) * 3
    sel = ref.select(logits, cfg)
    prio = torch.rand(T, K, device=device)
    _check(sel.topk_ids, sel.topk_weights, cfg, prio)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("pattern", ["uniform", "skewed", "empty", "one"])
@pytest.mark.parametrize("T,E,K,cf,pad", [
    (37, 8, 2, 1.0, 1),
    (37, 13, 3, None, 4),
    (300, 3, 1, 0.5, 1),
    (300, 64, 2, None, 16),
])
def test_plan_raw_ids(device, pattern, policy, T, E, K, cf, pad):
    """Raw random ids: all-to-one expert, empty experts, skew; weights with ties."""
    gen = torch.Generator().manual_seed(T * 1000 + E * 10 + K)
    ids = _ids(pattern, T, E, K, gen).to(device)
    w = _weights(T, K, ties=True, gen=gen).to(device)
    prio = _weights(T, K, ties=True, gen=gen).to(device)  # random keys with ties too
    _check(ids, w, _cfg(E, K, cf, pad, policy), prio)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("T,E,K,cf,pad", [
    (300, 8, 2, 1.25, 1),  # 38 / 10 blocks, capacity
    (300, 13, 2, None, 4),  # ragged with tail rows spread over programs
    (37, 3, 3, 0.5, 1),  # K = E, blocks straddle tokens
    (300, 130, 1, 4.0, 1),  # E_PAD > block
    (300, 64, 2, None, 16),  # padding rows spread over many programs
])
def test_plan_multi_block(device, T, E, K, cf, pad, block, policy):
    """The 2-launch path (partial histograms, then the fused pass), forced by a small block."""
    gen = torch.Generator().manual_seed(7)
    pattern = "skewed" if E > 8 else "uniform"
    ids = _ids(pattern, T, E, K, gen).to(device)
    w = _weights(T, K, ties=True, gen=gen).to(device)
    prio = torch.rand(T, K, generator=gen).to(device)
    cfg = _cfg(E, K, cf, pad, policy)
    assert kplan.num_launches(T * K, cfg, block) == 2 + (policy != "position")
    _check(ids, w, cfg, prio, block=block)


@pytest.mark.parametrize("block", [None, 16])
def test_plan_all_to_one_expert(device, block):
    """Every slot to one expert: one long segment, all others empty; capacity drops most."""
    T, E = 200, 5
    ids = torch.full((T, 1), 3, dtype=torch.int32, device=device)
    w = _weights(T, 1, ties=True, gen=torch.Generator().manual_seed(1)).to(device)
    for cf, pad, policy in [(1.0, 1, "position"), (None, 16, "position"), (1.0, 1, "priority"),
                            (2.0, 1, "random"), (None, 4, "priority")]:
        prio = torch.rand(T, 1, device=device)
        _check(ids, w, _cfg(E, 1, cf, pad, policy), prio, block=block)


def test_plan_special_keys(device):
    """Random keys with NaN, +-inf, -0.0 and +0.0: ordered as torch.sort orders them (NaN first,
    -0.0 == +0.0, stable). The reference runs on the CPU, where that order is the documented one."""
    T, E, K = 40, 4, 2
    gen = torch.Generator().manual_seed(3)
    ids = _ids("uniform", T, E, K, gen)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0, -1.0])
    prio = specials[torch.randint(0, specials.numel(), (T, K), generator=gen)]
    w = torch.rand(T, K, generator=gen)
    cfg = _cfg(E, K, 1.0, 1, "random")
    got = kplan.build_plan(ids.to(device), w.to(device), cfg, prio.to(device))
    want = ref.build_plan(Selection(ids, w), cfg, prio)
    for name in FIELDS:
        assert_equal_int(getattr(got, name), getattr(want, name), name)


def test_plan_launch_count():
    cfg = _cfg(128, 8, None, 1, "position")
    assert kplan.num_launches(kplan.SINGLE_MAX_SLOTS, cfg) == 1  # single program
    assert kplan.num_launches(16384 * 8, cfg) == 2
    assert kplan.num_launches(16384 * 8, _cfg(128, 8, 1.0, 1, "priority")) == 3


@pytest.mark.parametrize("cf", [0.1, 0.3, 0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 0.7])
def test_plan_shapes_match_config(cf):
    """The compile-friendly capacity arithmetic equals RouterConfig.capacity / num_rows."""
    for E, K, min_cap in [(8, 2, 1), (13, 1, 4), (64, 8, 1), (130, 3, 2)]:
        cfg = _cfg(E, K, cf, 4, "position", min_cap)
        for T in [1, 5, 10, 37, 100, 1000, 4096, 65536]:
            assert kplan._shapes(T, cfg) == (cfg.capacity(T), ref.num_rows(T, cfg)), (T, E, K)
    cfg = _cfg(13, 2, None, 16, "position")
    assert kplan._shapes(37, cfg) == (None, ref.num_rows(37, cfg))


def test_plan_errors(device):
    ids = torch.zeros(4, 2, dtype=torch.int32, device=device)
    w = torch.ones(4, 2, device=device)
    with pytest.raises(ValueError, match="priority"):
        kplan.build_plan(ids, w, _cfg(4, 2, 1.0, 1, "random"))
    with pytest.raises(ValueError, match="priority must have shape"):
        kplan.build_plan(ids, w, _cfg(4, 2, 1.0, 1, "random"), torch.rand(4, 3, device=device))
    with pytest.raises(ValueError, match="top_k"):
        kplan.build_plan(ids, w, _cfg(4, 3, 1.0, 1, "position"))
    with pytest.raises(ValueError, match="int32"):
        kplan.build_plan(ids.long(), w, _cfg(4, 2, 1.0, 1, "position"))
    with pytest.raises(ValueError, match="block_slots"):
        kplan.build_plan(ids, w, _cfg(4, 2, 1.0, 1, "position"), block_slots=24)
    ec = RouterConfig(num_experts=4, top_k=2, routing="expert_choice", capacity_factor=1.0)
    with pytest.raises(ValueError, match="token_choice"):
        kplan.build_plan(ids, w, ec)


def test_plan_custom_op_compiles(device):
    """routerlib::routing_plan has a fake (static shapes) and traces without a graph break."""
    T, E, K = 37, 13, 2
    cfg = _cfg(E, K, 1.25, 1, "priority")
    gen = torch.Generator().manual_seed(5)
    ids = _ids("uniform", T, E, K, gen).to(device)
    w = torch.rand(T, K, generator=gen).to(device)
    args = (ids, w, E, cfg.capacity(T), 1, ref.num_rows(T, cfg), "priority", 0)
    torch.library.opcheck(torch.ops.routerlib.routing_plan.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    def f(i, x):
        return kplan.build_plan(i, x, cfg).slot_to_row

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(ids, w)
    assert_equal_int(got, ref.build_plan(Selection(ids, w), cfg).slot_to_row, "slot_to_row")


# ---------------------------------------------------------------- GPU: large shapes, CUDA graphs

@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T,E,K,cf,pad", [
    (65536, 256, 8, None, 128),  # DeepSeek-V3-sized ragged with GEMM padding
    (65536, 512, 8, 1.25, 1),  # capacity, E = 512
    (16384, 128, 8, None, 1),  # Qwen3-30B-sized, the speed target
    (4096, 64, 8, 1.0, 1),  # 32768 slots: 2 launches
    (512, 128, 8, 1.0, 4),  # 4096 slots: the single-program path
    (20000, 130, 3, 0.75, 16),  # odd sizes everywhere
])
def test_plan_large_gpu(T, E, K, cf, pad, policy):
    device = torch.device("cuda")
    cfg = _cfg(E, K, cf, pad, policy)
    logits = torch.randn(T, E, device=device) * 2
    logits[:, 3] += 2.0  # one hot expert: drops, long segment
    sel = ref.select(logits, cfg)
    prio = torch.rand(T, K, device=device)
    _check(sel.topk_ids, sel.topk_weights, cfg, prio)


@pytest.mark.gpu
def test_plan_all_to_one_large_gpu():
    """N = 65536 slots to one expert with priority: the O(count^2) worst case stays correct."""
    device = torch.device("cuda")
    T, E, K = 65536, 64, 1
    ids = torch.full((T, K), 5, dtype=torch.int32, device=device)
    w = torch.rand(T, K, device=device)
    for policy, cf in [("position", 1.0), ("priority", 1.0), ("priority", None)]:
        _check(ids, w, _cfg(E, K, cf, 1, policy), None)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [512, 16384])
def test_plan_cuda_graph(T):
    """Capturable (no host sync): replaying the graph on new ids gives the new plan."""
    device = torch.device("cuda")
    E, K = 128, 8
    cfg = _cfg(E, K, 1.25, 1, "position")
    ids = torch.empty(T, K, dtype=torch.int32, device=device)
    w = torch.rand(T, K, device=device)
    ids.copy_(ref.select(torch.randn(T, E, device=device), cfg).topk_ids)
    kplan.build_plan(ids, w, cfg)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = kplan.build_plan(ids, w, cfg)
    for _ in range(2):
        ids.copy_(ref.select(torch.randn(T, E, device=device), cfg).topk_ids)
        graph.replay()
        want = ref.build_plan(Selection(ids, w), cfg)
        for name in FIELDS:
            assert_equal_int(getattr(plan, name), getattr(want, name), name)
