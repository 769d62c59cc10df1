"""The fast route (kernels/fast_route/) equals the reference integer for integer: over every
thread split H and tile size (so one expert's slots span many tiles: the tile prefix), the fused
one-launch plan (T <= one tile), ties, low-precision logits, and random configurations. Launch
configurations other than the default are passed explicitly (RouteLaunch). Every output is
poisoned first, so an entry the kernels forget to write fails."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_route_matches_reference, poison_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_triton_backend import router_configs

from routerlib import RouterConfig
from routerlib import reference as ref
from routerlib.kernels import fast_route, route
from routerlib.kernels.fast_route import RouteLaunch, launch_config
from routerlib.kernels.fast_route import launch as route_launch
from routerlib.kernels.fast_route import sync as route_sync
from routerlib.kernels.fast_route.config import use_sync
from routerlib.kernels.fast_route.select_packed import _merge8, _merge_packed, _sort8

CASES = [  # (T, E, K, config) with the edge each covers
    (1, 8, 2, {}),  # one token, one tile (fused plan)
    (37, 13, 3, dict(capacity_factor=1.0)),  # odd sizes, drops decided across tiles
    (300, 8, 2, dict(pad_to_multiple=4)),  # many tiles per expert, padded ragged
    (100, 64, 8, dict(renormalize=True)),  # k = 8, softmax over the selected
    (77, 16, 4, dict(score_func="sigmoid", expert_bias=True, renormalize=True,
                     routed_scaling_factor=2.5)),
    (70, 20, 3, dict(expert_bias=True)),  # softmax scores + bias: the two-pass key
    (129, 7, 7, dict(softmax_after_topk=True, capacity_factor=0.5)),  # k = E, heavy drops
    (50, 130, 1, {}),  # E > 128, not a power of two, k = 1
    (9, 1, 1, {}),  # E = 1
]


def launch(T: int, E: int, K: int, split: tuple[int, int] | None = None, **kw) -> RouteLaunch:
    """The default launch of (T, E, K), or H threads a token and num_warps (split) with the
    selection the default would take for that split, then the fields in kw replaced."""
    lc = launch_config(T, E, K)
    if split is not None:
        h, nw = split
        packed = kw.get("packed", h == 1)
        lc = lc.replace(threads_per_token=h, num_warps=nw, packed=packed,
                        stages=0 if packed and nw >= 4 else 3,
                        lane_ranks=h == 1 and E <= 128 and T > 32 * nw)
    return lc.replace(**kw)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output of the route starts as poison (NaN / -7777)."""
    monkeypatch.setattr(route_launch, "_empty",
                        lambda *a, **k: poison_like(torch.empty(*a, **k)))


def check(T, E, K, kw, device, dtype=torch.float32, seed=0, lc: RouteLaunch | None = None):
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    if T > 3:
        logits[3] = logits[2]  # identical tokens: arrival order decides their ranks
    if T > 5:
        logits[5] = 0.5  # a row of ties: the lowest indices win
    if T > 6 and E > 4:
        logits[6, E // 2:] = logits[6, : E - E // 2].clone()  # repeated values across thread groups
    logits = logits.to(device)
    bias = (torch.randn(E, generator=g) * 0.05).to(device) if cfg.expert_bias else None
    assert fast_route.applies(logits, cfg, need_stats=False)
    sel, plan = fast_route.route_rows(logits, cfg, bias, lc)
    assert sel.prob_sum is None and sel.zsq_sum is None  # inference: no loss sums
    assert_route_matches_reference(sel, plan, logits, cfg, bias)


@pytest.mark.parametrize("T,E,K,kw", CASES)
@pytest.mark.parametrize("split,packed", [
    (None, None),  # the default (4 threads a token, 8-token tiles at these sizes)
    ((1, 1), True),  # one thread a token: packed keys
    ((2, 2), False),  # two threads a token, exact insertion
])
def test_route_rows_equals_reference(T, E, K, kw, split, packed, device, poisoned):
    lc = None if split is None else launch(T, E, K, split, packed=packed)
    check(T, E, K, kw, device, lc=lc)


@pytest.mark.parametrize("T,E,K,kw", [CASES[1], CASES[4], CASES[7]])
def test_route_rows_scan_launch(T, E, K, kw, device, poisoned):
    """At these sizes the place kernel scans the tile counts itself; the scan launch (what
    prefill sizes use) forced on must give the same plan."""
    check(T, E, K, kw, device, lc=launch(T, E, K, (4, 1), sum_tiles=False))  # 8-token tiles


@pytest.mark.parametrize("T,E,K,kw", [
    (100, 128, 8, {}),  # four mask words, a partial last tile
    (96, 96, 5, dict(pad_to_multiple=8)),  # three words; the count row's last word is zeros
    (65, 33, 3, dict(capacity_factor=0.5)),  # two words, drops by position
    (64, 20, 2, {}),  # one word, BLOCK_E < 32
    (40, 7, 7, {}),  # K = E
    (33, 128, 1, dict(renormalize=True)),  # k = 1, one token in the last tile
])
@pytest.mark.parametrize("lane,warps", [
    (False, 1),  # the one-hot table
    (True, 1), (True, 2),  # bit-transposed ranks, tiles of 32 or 64 tokens (rows of 32)
])
def test_bit_transposed_ranks(T, E, K, kw, lane, warps, device, poisoned):
    """One thread a token: the ranks from the transposed membership bits equal the reference's
    (and the one-hot table's), ties and identical tokens included."""
    check(T, E, K, kw, device, lc=launch(T, E, K, (1, warps), lane_ranks=lane))


@pytest.mark.parametrize("split", [(2, 2), (4, 4)])  # rows of 32 tokens across warps
@pytest.mark.parametrize("T,E,K,kw", [(100, 128, 8, dict(capacity_factor=1.0)),
                                      (70, 40, 3, dict(pad_to_multiple=4))])
def test_bit_transposed_ranks_with_threads_per_token(T, E, K, kw, split, device, poisoned):
    check(T, E, K, kw, device, lc=launch(T, E, K, split, lane_ranks=True))


def test_launch_config_rules():
    """The defaults: bit-transposed ranks with one thread a token (E <= 128, several tiles),
    packed keys there too, register prefetch with 4-warp tiles; validation of overrides."""
    lc = launch_config(16384, 128, 8)
    assert (lc.threads_per_token, lc.num_warps, lc.packed, lc.stages, lc.lane_ranks) == (
        1, 1, True, 3, True)
    lc = launch_config(65536, 128, 8)
    assert (lc.num_warps, lc.stages) == (4, 0)
    lc = launch_config(16384, 256, 8)
    assert (lc.threads_per_token, lc.num_warps, lc.packed, lc.lane_ranks) == (2, 4, False, False)
    lc = launch_config(64, 64, 8)
    assert (lc.threads_per_token, lc.num_warps, lc.packed, lc.dispatch_one) == (4, 1, False, False)
    assert launch_config(16, 64, 8).dispatch_one and launch_config(16, 64, 8) is launch_config(
        16, 64, 8)  # cached
    for E, T, K in ((128, 16384, 8), (512, 4096, 8), (64, 1, 1), (13, 64, 3)):
        lc = launch_config(T, E, K)
        assert lc.tokens_per_tile <= 128  # 8-bit counts
        words = triton.next_power_of_2(triton.cdiv(E, 4))
        assert words // lc.threads_per_token <= 32  # rank-table words a thread holds
    for bad in (dict(threads_per_token=3), dict(num_warps=8, threads_per_token=1),
                dict(packed=False, stages=0), dict(threads_per_token=4, lane_ranks=True),
                dict(sync_grid=1)):
        with pytest.raises(ValueError, match="RouteLaunch"):
            launch_config(4096, 64, 8).replace(**bad)


@pytest.mark.parametrize("T,E,K,dtype,kw", [
    (70, 64, 8, torch.float32, {}),  # list of 10: the 16-input bitonic merger
    (45, 33, 7, torch.float32, dict(capacity_factor=1.0)),  # 9 of the 10 used
    (40, 24, 6, torch.float32, dict(pad_to_multiple=4)),  # 8: the 8-input merger, finished
    (33, 20, 5, torch.float32, dict(expert_bias=True)),  # 7; softmax + bias: the second pass
    (50, 40, 8, torch.bfloat16, dict(renormalize=True)),  # exact bf16 keys, 8 entries
    (30, 7, 7, torch.float16, {}),  # E < 8: padding columns in the network
    (20, 130, 8, torch.float32, dict(score_func="sigmoid", expert_bias=True)),
])
@pytest.mark.parametrize("split", [(1, 1), (4, 1)])  # one list, four merged (two, then two)
def test_packed_network_equals_reference(T, E, K, dtype, kw, split, device, poisoned):
    """The packed selection with its keys sorted 8 at a time by a network and merged (every
    list length it takes: 7 to 10) against the reference. No fallback to the exact insertion:
    a key the network lost would show (these logits have exact ties only, which the packed
    order decides by index)."""
    check(T, E, K, kw, device, dtype, lc=launch(T, E, K, split, packed=True, tie_check=False))


@pytest.mark.parametrize("T,E,K,kw", [
    (70, 130, 8, {}),  # 9 steps of 16 columns with one thread a token (ragged: 130 of 144)
    (33, 20, 5, dict(expert_bias=True)),  # softmax + bias: the second pass
    (50, 64, 8, dict(renormalize=True)),  # whole steps (EVEN)
])
@pytest.mark.parametrize("stages", [0, 3])  # registers prefetched / Triton's stages
@pytest.mark.parametrize("split", [(1, 1)])
def test_packed_loop_prefetch(T, E, K, kw, stages, split, device, poisoned):
    """The packed column loop both ways: prefetching the next 16 columns into registers (the
    default with 4-warp tiles) and software-pipelined by Triton."""
    lc = launch(T, E, K, split, packed=True, stages=stages, tie_check=False)
    check(T, E, K, kw, device, seed=T, lc=lc)


@triton.jit
def _network_probe(keys_ptr, list_ptr, out_ptr, M: tl.constexpr):
    """Row r: sort keys[r, :8] with _sort8 and merge them into the descending list[r, :10]."""
    c = tl.arange(0, 2) * 0  # [2] lanes reading the same entry (Triton has no scalars blocks)
    kp = keys_ptr + tl.program_id(0) * 8 + c
    lp = list_ptr + tl.program_id(0) * 10 + c
    op = out_ptr + tl.program_id(0) * 10 + c
    k0, k1, k2, k3, k4, k5, k6, k7 = _sort8(
        tl.load(kp), tl.load(kp + 1), tl.load(kp + 2), tl.load(kp + 3), tl.load(kp + 4),
        tl.load(kp + 5), tl.load(kp + 6), tl.load(kp + 7))
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _merge8(
        k0, k1, k2, k3, k4, k5, k6, k7, tl.load(lp), tl.load(lp + 1), tl.load(lp + 2),
        tl.load(lp + 3), tl.load(lp + 4), tl.load(lp + 5), tl.load(lp + 6), tl.load(lp + 7),
        tl.load(lp + 8), tl.load(lp + 9), M)
    one = tl.arange(0, 2) == 0
    tl.store(op, p0, mask=one)
    tl.store(op + 1, p1, mask=one)
    tl.store(op + 2, p2, mask=one)
    tl.store(op + 3, p3, mask=one)
    tl.store(op + 4, p4, mask=one)
    tl.store(op + 5, p5, mask=one)
    tl.store(op + 6, p6, mask=one)
    tl.store(op + 7, p7, mask=one)
    tl.store(op + 8, p8, mask=one)
    tl.store(op + 9, p9, mask=one)


@pytest.mark.parametrize("M", [8, 10])
def test_sorting_network_and_merge(M, device):
    """_sort8 + _merge8 keep the M largest of a descending list and 8 keys, in order (random
    keys, duplicates included)."""
    g = torch.Generator().manual_seed(M)
    n = 300
    keys = torch.randint(-50, 50, (n, 8), generator=g, dtype=torch.int32)
    keys[: n // 2] = torch.randint(-2**31, 2**31 - 1, (n // 2, 8), generator=g,
                                   dtype=torch.int64).to(torch.int32)
    lst = torch.randint(-50, 50, (n, 10), generator=g, dtype=torch.int32)
    lst[:, M:] = -2**31  # unused entries of the list
    lst = lst.sort(dim=1, descending=True).values
    out = torch.full((n, 10), 12345, dtype=torch.int32)
    keys_d, lst_d, out_d = keys.to(device), lst.to(device), out.to(device)
    _network_probe[(n,)](keys_d, lst_d, out_d, M)
    want = torch.cat([keys, lst[:, :M]], 1).sort(dim=1, descending=True).values[:, :M]
    assert torch.equal(out_d.cpu()[:, :M], want)


@triton.jit
def _merge_probe(lists_ptr, out_ptr, L: tl.constexpr, NET: tl.constexpr):
    """Rows 16r..16r+15: merge lists[row, 0, :10] and lists[row, 1, :10] with _merge_packed
    (the two lists along the last axis, as two thread groups of one token hold them)."""
    rows = tl.program_id(0) * 16 + tl.arange(0, 16)
    at = lists_ptr + rows[:, None] * 20 + tl.arange(0, 2)[None, :] * 10
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _merge_packed(
        tl.load(at), tl.load(at + 1), tl.load(at + 2), tl.load(at + 3), tl.load(at + 4),
        tl.load(at + 5), tl.load(at + 6), tl.load(at + 7), tl.load(at + 8), tl.load(at + 9),
        L, NET)
    op = out_ptr + rows * 10
    tl.store(op, p0)
    tl.store(op + 1, p1)
    tl.store(op + 2, p2)
    tl.store(op + 3, p3)
    tl.store(op + 4, p4)
    tl.store(op + 5, p5)
    tl.store(op + 6, p6)
    tl.store(op + 7, p7)
    tl.store(op + 8, p8)
    tl.store(op + 9, p9)


@pytest.mark.parametrize("L", [1, 4, 7, 8, 9, 10])
@pytest.mark.parametrize("net", [False, True])
def test_merge_of_two_lists(L, net, device):
    """_merge_packed keeps the L largest of two descending lists of L unique keys, in order,
    including lopsided pairs (one list holding all of them) that random logits rarely give."""
    g = torch.Generator().manual_seed(L)
    n = 320
    keys = torch.randperm(2**20, generator=g)[: n * 2 * L].to(torch.int32) - 2**19
    lists = keys.view(n, 2, L).sort(dim=2, descending=True).values
    lists[: n // 4, 1] += 2**21  # the second list above the first ...
    lists[n // 4: n // 2, 0] += 2**21  # ... and the other way round
    full = torch.full((n, 2, 10), -2**31, dtype=torch.int32)
    full[:, :, :L] = lists
    out = torch.full((n, 10), 12345, dtype=torch.int32)
    lists_d, out_d = full.to(device), out.to(device)
    _merge_probe[(n // 16,)](lists_d, out_d, L, net)
    want = full[:, :, :L].reshape(n, 2 * L).sort(dim=1, descending=True).values[:, :L]
    assert torch.equal(out_d.cpu()[:, :L], want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])  # packed: bf16/fp16 keys pack exactly
def test_route_rows_low_precision_logits(dtype, packed, device, poisoned):
    lc = launch(200, 24, 4, (1, 1), packed=packed)
    check(200, 24, 4, dict(capacity_factor=1.25), device, dtype, lc=lc)  # many exact bf16 ties


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # device: a constant
@given(cfg=router_configs(), T=st.integers(1, 120), split=st.sampled_from(
    [(1, 1), (1, 2), (2, 1), (2, 4), (4, 1), (4, 2)]), seed=st.integers(0, 2**16))
def test_route_rows_random_configs(cfg, T, split, seed, device):
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in ("num_experts", "top_k")}
    kw.update(drop_policy="position")  # the drop policies: test_route_rows_drop_policies
    check(T, cfg.num_experts, cfg.top_k, kw, device, seed=seed,
          lc=launch(T, cfg.num_experts, cfg.top_k, split))


@pytest.mark.parametrize("T,E,K,kw", [c for c in CASES if c[1] > 1])
@pytest.mark.parametrize("split", [(1, 1)])
def test_packed_selection_alone(T, E, K, kw, split, device, poisoned):
    """The packed-key selection by itself (no exact fallback) on continuous logits (no near
    ties): the fallback must not be what makes the route correct."""
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    g = torch.Generator().manual_seed(T * E)
    logits = (torch.randn(T, E, generator=g) * 2).to(device)
    bias = (torch.randn(E, generator=g) * 0.05).to(device) if cfg.expert_bias else None
    lc = launch(T, E, K, split, packed=True, tie_check=False)
    sel, plan = fast_route.route_rows(logits, cfg, bias, lc)
    assert_route_matches_reference(sel, plan, logits, cfg, bias)


def near_tie_logits(T: int, E: int, cols: list[int], device) -> torch.Tensor:
    """Odd rows: columns cols hold 1.0, 1.0 + 1 ulp, 1.0 + 2 ulp, ... (rising with the index):
    the packed keys cut their low bits, so they tie there and the index alone would order
    them (wrongly)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=g) * 0.1
    v = torch.tensor(1.0)
    for c in cols:
        logits[1::2, c] = v
        v = torch.nextafter(v, torch.tensor(2.0))
    return logits.to(device)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("split", [(1, 1), (2, 1)])
def test_near_ties_are_finished_exactly(K, split, device, poisoned):
    """A run of r <= 4 merged keys at the top, r <= K + 1 (the run ends inside the K + 2
    packed best): the exact finishing sort orders it, no fallback needed (the check is off)."""
    cfg = RouterConfig(num_experts=24, top_k=K)
    lc = launch(70, 24, K, split, packed=True, tie_check=False)
    for cols in ([3, 22], [3, 10, 22], [2, 9, 15, 21])[:K]:
        logits = near_tie_logits(70, 24, cols, device)
        sel, plan = fast_route.route_rows(logits, cfg, None, lc)
        assert_route_matches_reference(sel, plan, logits, cfg)
        assert (sel.topk_ids[1::2, 0] == cols[-1]).all()


@pytest.mark.parametrize("split", [(1, 1), (4, 1)])
def test_near_ties_past_the_list_take_the_exact_insertion(split, device, poisoned):
    """Five merged keys with K = 2: the K + 2 = 4 packed best are the four lowest columns, the
    best key lies outside the list: only the exact insertion finds it."""
    cfg = RouterConfig(num_experts=24, top_k=2)
    cols = [3, 10, 15, 20, 22]
    logits = near_tie_logits(70, 24, cols, device)
    lc = launch(70, 24, 2, split, packed=True)
    sel, plan = fast_route.route_rows(logits, cfg, None, lc)
    assert_route_matches_reference(sel, plan, logits, cfg)
    assert (sel.topk_ids[1::2] == torch.tensor([22, 20], device=device)).all()
    sel, plan = fast_route.route_rows(logits, cfg, None, lc.replace(tie_check=False))
    assert (sel.topk_ids[1::2] == torch.tensor([20, 15], device=device)).all()  # the list's best
    want = ref.select(logits, cfg).topk_ids
    assert torch.equal(sel.topk_ids[0::2].long(), want[0::2].long())  # the other rows: exact


def test_route_takes_it_for_inference_only(monkeypatch, device):
    cfg = RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    logits = torch.randn(40, 8, device=device)
    calls = []
    real = fast_route.route_rows
    monkeypatch.setattr(fast_route, "route_rows", lambda *a, **k: calls.append(1) or real(*a))
    sel, _ = route(logits, cfg)
    assert calls == [1] and sel.prob_sum is None
    sel, _ = route(logits, cfg, need_stats=True)  # the loss sums: the training path
    assert calls == [1] and sel.prob_sum is not None
    for bad in (RouterConfig(64, 2, n_groups=64, topk_groups=2), RouterConfig(16, 9)):
        assert not fast_route.applies(torch.randn(4, bad.num_experts), bad, need_stats=False)
    assert not fast_route.applies(logits.double(), cfg, need_stats=False)
    assert not fast_route.applies(logits.clone().requires_grad_(), cfg, need_stats=False)


DSV3 = dict(score_func="sigmoid", expert_bias=True, renormalize=True, routed_scaling_factor=2.5,
            n_groups=8, topk_groups=4, group_score="top2_sum")  # DeepSeek-V3 (E=256, K=8)
GROUP_CASES = [  # (T, E, K, config): group-limited selection
    (1, 256, 8, DSV3),
    (37, 256, 8, DSV3),  # 5 tiles of 8 tokens
    (37, 64, 6, dict(n_groups=4, topk_groups=2, group_score="max", capacity_factor=1.0)),
    (37, 64, 4, dict(n_groups=4, topk_groups=3, group_score="top2_sum", expert_bias=True)),
    (37, 60, 5, dict(n_groups=5, topk_groups=2, score_func="sigmoid", renormalize=True)),
    (37, 48, 3, dict(n_groups=6, topk_groups=1, group_score="max", expert_bias=True,
                     score_func="sigmoid", pad_to_multiple=4)),
    (37, 24, 2, dict(n_groups=3, topk_groups=2, softmax_after_topk=True, expert_bias=True)),
    (37, 64, 4, dict(n_groups=32, topk_groups=5, group_score="top2_sum",
                     score_func="sigmoid")),  # MAX_GROUPS groups of two
    (20, 16, 2, dict(n_groups=16, topk_groups=3, group_score="top2_sum", expert_bias=True)),
]


@pytest.mark.parametrize("T,E,K,kw", GROUP_CASES)
def test_route_rows_group_limited(T, E, K, kw, device, poisoned):
    """Rows 5 and 6 of check() tie every group score, or repeat them across groups."""
    check(T, E, K, kw, device, seed=T + E)


@pytest.mark.parametrize("split", [(1, 1), (2, 2), (4, 1)])  # packed asked for: exact insertion
def test_route_rows_group_limited_multi_tile(split, device, poisoned):
    T, E, K, kw = 70, 64, 6, dict(DSV3, n_groups=4, topk_groups=2, capacity_factor=1.0)
    check(T, E, K, kw, device, seed=3, lc=launch(T, E, K, split, packed=split[0] == 1))


def test_group_score_ties_keep_the_lower_group(device, poisoned):
    """Groups with equal scores (max and top2_sum): the lower group is kept, as the reference."""
    E, G = 32, 8
    x = torch.randn(12, E, generator=torch.Generator().manual_seed(1))
    x.view(12, G, E // G)[:, 1::2] = x.view(12, G, E // G)[:, 0::2]  # group 2i+1 = group 2i
    x[4:8] = x[4:8, torch.randperm(E)]  # some rows without exact group ties
    for score in ("max", "top2_sum"):
        cfg = RouterConfig(num_experts=E, top_k=3, n_groups=G, topk_groups=3,
                           group_score=score, score_func="sigmoid")
        sel, plan = fast_route.route_rows(x.to(device), cfg)
        assert_route_matches_reference(sel, plan, x.to(device), cfg)


@pytest.mark.parametrize("policy", ["priority", "random"])
@pytest.mark.parametrize("T,E,K,kw", [
    (300, 16, 1, dict(renormalize=True, capacity_factor=1.0)),  # every weight 1.0: pure ties
    (70, 64, 6, dict(DSV3, n_groups=4, topk_groups=2, capacity_factor=0.5)),
    (37, 13, 3, dict(pad_to_multiple=4)),  # dropless: rows still in key order
])
def test_route_rows_drop_policies(policy, T, E, K, kw, device, poisoned):
    """The priority and random drop policies on the fast route, over several tiles (split
    (2, 1): 16-token tiles), ties to the lower slot."""
    cfg = RouterConfig(num_experts=E, top_k=K, drop_policy=policy, **kw)
    g = torch.Generator().manual_seed(T)
    logits = (torch.randn(T, E, generator=g) * 2).to(device)
    bias = (torch.randn(E, generator=g) * 0.05).to(device) if cfg.expert_bias else None
    pri = None
    if policy == "random":  # keys with ties
        pri = torch.randint(0, 4, (T, K), generator=g).float().to(device)
    assert fast_route.applies(logits, cfg, need_stats=False)
    sel, plan = route(logits, cfg, bias, pri, need_stats=False, launch=launch(T, E, K, (2, 1)))
    if K == 1 and cfg.renormalize:
        assert bool((sel.topk_weights == 1.0).all())
    assert_route_matches_reference(sel, plan, logits, cfg, bias, pri)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,kw,dtype", [
    (16384, 256, 8, DSV3, torch.float32),  # the DeepSeek-V3 routing target
    (16384, 256, 8, DSV3, torch.bfloat16),
    (64, 256, 8, DSV3, torch.float32),
    (12289, 256, 8, dict(DSV3, capacity_factor=1.0, drop_policy="priority"), torch.float32),
    # K=1 renormalised: every weight 1.0, priority ties across many tiles
    (12289, 16, 1, dict(renormalize=True, capacity_factor=1.0, drop_policy="priority"),
     torch.bfloat16),
    (4099, 60, 6, dict(n_groups=5, topk_groups=2, expert_bias=True), torch.float32),
])
def test_route_rows_group_and_policy_full_size(T, E, K, kw, dtype, device, poisoned):
    check(T, E, K, kw, device, dtype, seed=T + E)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,kw", [
    (16384, 128, 8, dict(renormalize=True)),  # the routing target (Qwen3-like)
    (65536, 128, 8, dict(renormalize=True)),  # 512 tiles: the longest tile prefix
    (16384, 256, 8, dict(score_func="sigmoid", expert_bias=True, renormalize=True,
                         routed_scaling_factor=2.5)),  # DeepSeek-like without groups
    (4099, 512, 4, dict(capacity_factor=1.0)),  # E = 512, 4 thread groups, drops
    (3000, 100, 6, dict(capacity_factor=1.25, expert_bias=True)),
    (2048, 64, 8, dict(pad_to_multiple=128)),  # GEMM-block padding
    (64, 64, 8, {}), (256, 128, 8, dict(renormalize=True)),  # decode sizes
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_rows_full_size(T, E, K, kw, dtype, device, poisoned):
    check(T, E, K, kw, device, dtype, seed=T + E)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,kw", [
    (65536, 128, 8, dict(renormalize=True)),
    (4099, 512, 4, dict(capacity_factor=1.0)),
    (3000, 100, 6, dict(capacity_factor=1.25, expert_bias=True)),  # softmax + bias: two passes
    (16384, 256, 8, dict(score_func="sigmoid", expert_bias=True, renormalize=True)),
])
def test_route_rows_full_size_packed(T, E, K, kw, device, poisoned):
    """The packed keys forced on where the default leaves them off."""
    check(T, E, K, kw, device, seed=T + E + 1, lc=launch_config(T, E, K).replace(packed=True))


# The one-launch route (grid barriers, a cooperative launch) runs only on a GPU: on the CPU the
# same kernel bodies run as three launches, which every test above covers. On a GPU every test
# above takes the one launch (several tiles); these pin what is its own.
SYNC_CASES = [
    (37, 13, 3, dict(capacity_factor=1.0)),
    (300, 8, 2, dict(pad_to_multiple=4)),
    (2049, 64, 8, dict(renormalize=True)),  # decode-size tile counts: the in-register sum
    (5000, 100, 6, dict(capacity_factor=1.25, expert_bias=True)),  # the scan phase, drops
    (16384, 128, 8, dict(renormalize=True)),
    (4099, 512, 4, dict(capacity_factor=1.0)),
    (3000, 256, 8, dict(score_func="sigmoid", expert_bias=True, pad_to_multiple=64)),
]


def test_use_sync_rule():
    """Eagerly one launch wherever there are tiles; in a CUDA graph only where it replaces
    three launches over tiny tiles (what measured faster); the launch configuration pins it."""
    lc = launch_config(4096, 128, 8)
    assert use_sync(lc, True, 512, True, False, 16384, 128)
    assert use_sync(lc, True, 8, False, False, 64, 64)
    assert use_sync(lc, True, 128, True, True, 1024, 128)
    assert not use_sync(lc, True, 128, True, True, 4096, 128)  # graph: PDL launches win here
    assert use_sync(lc, True, 64, True, True, 4096, 256)  # ... at E = 256 from T > 4096
    assert not use_sync(lc, True, 256, True, True, 16384, 256)
    assert not use_sync(lc, True, 512, True, True, 16384, 128)
    assert not use_sync(lc, True, 8, False, True, 64, 64)  # graph, two launches anyway
    assert not use_sync(lc, True, 1, False, False, 5, 16)  # one tile: one launch already
    assert not use_sync(lc, False, 512, True, False, 16384, 128)  # CPU or the interpreter
    assert use_sync(lc.replace(sync=True), True, 512, True, True, 16384, 128)
    assert not use_sync(lc.replace(sync=False), True, 128, True, False, 4096, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,kw", SYNC_CASES)
@pytest.mark.parametrize("grid", [None, 2, 7])  # every program one tile, or looping
def test_route_sync_equals_split(T, E, K, kw, grid, device, poisoned):
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    logits = torch.randn(T, E, device=device)
    bias = torch.randn(E, device=device) * 0.05 if cfg.expert_bias else None
    lc = launch_config(T, E, K).replace(sync=True, sync_grid=grid)
    sel, plan = fast_route.route_rows(logits, cfg, bias, lc)
    assert_route_matches_reference(sel, plan, logits, cfg, bias)
    sel2, plan2 = fast_route.route_rows(logits, cfg, bias, lc.replace(sync=False))
    for a, b in ((sel.topk_ids, sel2.topk_ids), (plan.slot_to_row, plan2.slot_to_row),
                 (plan.row_to_slot, plan2.row_to_slot), (plan.expert_offsets,
                                                         plan2.expert_offsets)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_route_sync_counter_stays_clean(device):
    """Launches of different grid sizes on one stream share a counter: after each, its low 31
    bits are zero again (the barrier's arithmetic), and every route is still right."""
    cfg = RouterConfig(num_experts=64, top_k=8)
    for T in (4096, 100, 16384, 33, 2048):
        logits = torch.randn(T, 64, device=device)
        sel, plan = fast_route.route_rows(logits, cfg)
        assert_route_matches_reference(sel, plan, logits, cfg, None)
        counter = route_sync.sync_counter(logits.device, torch.cuda.current_device(),
                                          torch.cuda.current_stream().cuda_stream, False)
        assert int(counter.item()) & 0x7FFFFFFF == 0


@pytest.mark.gpu
def test_route_sync_in_cuda_graph_and_streams(device):
    """Captured in a CUDA graph (its own counter) and replayed on new logits, alongside eager
    routes on a second stream (their own counter)."""
    cfg = RouterConfig(num_experts=128, top_k=8, renormalize=True)
    logits = torch.randn(16384, 128, device=device)
    fast_route.route_rows(logits, cfg)  # compiled, and the counter pool made, outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, plan = fast_route.route_rows(logits, cfg)
    side = torch.cuda.Stream()
    for seed in range(3):
        logits.copy_(torch.randn(16384, 128, device=device, generator=torch.Generator(
            device=device).manual_seed(seed)))
        other = torch.randn(8192, 128, device=device)
        side.wait_stream(torch.cuda.current_stream())
        graph.replay()
        with torch.cuda.stream(side):
            sel2, plan2 = fast_route.route_rows(other, cfg)
        torch.cuda.synchronize()
        assert_route_matches_reference(sel, plan, logits, cfg, None)
        assert_route_matches_reference(sel2, plan2, other, cfg, None)


@pytest.mark.gpu
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("T,E,K,kw", [
    (5, 16, 2, {}),  # one tile: one launch
    (64, 64, 8, dict(capacity_factor=1.0)),  # few tiles: select + place
    (4096, 128, 8, dict(renormalize=True)),  # select + scan + place
    (3000, 100, 6, dict(pad_to_multiple=16, expert_bias=True)),
])
def test_route_rows_direct_launches(T, E, K, kw, sync, device, poisoned):
    """After the first call of a configuration the kernels are launched straight through their
    compiled launchers with raw pointers: repeated calls on new logits stay right."""
    lc = launch_config(T, E, K).replace(sync=sync)
    for seed in range(3):
        check(T, E, K, kw, device, seed=seed, lc=lc)
    statics = [s for key, s in route_launch._statics.items() if lc in key and s.compiled]
    assert statics and all(len(s.compiled) == len(s.launches) for s in statics)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("T,E,K,kw", [(64, 64, 8, {}), (5000, 128, 8, dict(capacity_factor=1.0)),
                                      (16384, 128, 8, dict(renormalize=True))])
def test_route_rows_dependent_launches(T, E, K, kw, pdl, device, poisoned):
    """The three launches with and without programmatic dependent launch, eagerly and in a CUDA
    graph (where the dependents overlap their predecessors' tails)."""
    if pdl and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("dependent launches need sm_90+")
    lc = launch_config(T, E, K).replace(sync=False, pdl=pdl)
    check(T, E, K, kw, device, seed=1, lc=lc)
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    logits = torch.randn(T, E, device=device)
    fast_route.route_rows(logits, cfg, None, lc)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, plan = fast_route.route_rows(logits, cfg, None, lc)
    for seed in range(2):
        logits.copy_(torch.randn(T, E, device=device) * (seed + 1))
        graph.replay()
        torch.cuda.synchronize()
        assert_route_matches_reference(sel, plan, logits, cfg, None)


def test_targets_route_cases_take_the_fast_route():
    """Every routing case of the targets benchmark (DeepSeek-V3 with its groups included) runs
    the fast route at the benchmark's full sizes."""
    from routerlib.bench.targets import make_cases

    for quick in (False, True):
        for c in make_cases(quick).route:
            logits = torch.empty(c.T, c.E)
            with torch.no_grad():
                assert fast_route.applies(logits, c.cfg, need_stats=False), c.key
