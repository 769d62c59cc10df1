"""The route with the dispatch in one launch (fast_route.route_dispatch_rows,
kernels.route_dispatch) equals the reference route and the reference dispatch: ids, plan and
rows exactly (the rows are copies), weights to fp32 rounding. Every output starts poisoned, so an
element no program writes fails: the copied rows, the empty rows (capacity and padded layouts)
and the plan."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_route_matches_reference, poison_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_triton_backend import router_configs

from routerlib import RouterConfig, ops
from routerlib import reference as ref
from routerlib.kernels import _rowmap, fast_route, route_dispatch
from routerlib.kernels.fast_route import launch as route_launch
from routerlib.kernels.fast_route import launch_config

CASES = [  # (T, E, K, D, config, in one launch) with the edge each covers
    (1, 8, 2, 40, {}, True),  # one token; D not a multiple of the block
    (16, 20, 3, 16, dict(pad_to_multiple=4, expert_bias=True), True),  # padded, bias
    (9, 1, 1, 8, {}, True),  # E = 1
    (12, 7, 7, 32, dict(softmax_after_topk=True, capacity_factor=0.5), True),  # k = E, drops
    (11, 130, 1, 24, {}, True),  # E > 128, not a power of two
    (37, 13, 3, 33, dict(capacity_factor=1.0), False),  # past 16 tokens: route, then dispatch
]


@pytest.fixture
def poisoned(monkeypatch):
    """Every output starts as poison (NaN / -7777); few programs under the interpreter (each
    one selects every token again)."""
    monkeypatch.setattr(route_launch, "_empty",
                        lambda *a, **k: poison_like(torch.empty(*a, **k)))
    if _rowmap.interpreting():
        monkeypatch.setattr(route_launch, "_DISPATCH_SLOT_PROGRAMS", 6)
    monkeypatch.setattr(route_launch, "_statics", {})


def make(T, E, K, D, kw, device, dtype=torch.bfloat16, seed=0):
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    if T > 3:
        logits[3] = logits[2]  # identical tokens: arrival order decides their ranks
    if T > 5:
        logits[5] = 0.5  # a row of ties: the lowest indices win
    bias = (torch.randn(E, generator=g) * 0.05).to(device) if cfg.expert_bias else None
    x = torch.randn(T, D, generator=g).to(dtype)
    return cfg, logits.to(device), bias, x.to(device)


def check(cfg, logits, bias, x, one):
    """one: whether the call takes the one launch (by default T <= 16)."""
    assert fast_route.dispatch_in_one(logits.shape[0], x.shape[1]) == one
    sel, plan, rows = route_dispatch(logits, x, cfg, bias)
    assert_route_matches_reference(sel, plan, logits, cfg, bias)
    expected = ref.dispatch(x, plan)
    assert rows.dtype == x.dtype and rows.shape == expected.shape
    assert torch.equal(rows, expected), f"{(rows != expected).sum().item()} elements differ"
    return sel, plan, rows


@pytest.mark.parametrize("T,E,K,D,kw,one", CASES)
def test_route_dispatch_equals_reference(T, E, K, D, kw, one, device, poisoned):
    check(*make(T, E, K, D, kw, device), one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_route_dispatch_token_dtypes(dtype, device, poisoned):
    check(*make(13, 16, 4, 20, dict(capacity_factor=1.25), device, dtype=dtype), True)


@pytest.mark.parametrize("T,one", [(15, True)])
def test_route_dispatch_strided_inputs(T, one, device, poisoned):
    """Rows of x and of the logits with a stride past their width (views of wider tensors)."""
    cfg, logits, bias, x = make(T, 12, 3, 40, {}, device)
    wide_x = torch.zeros(T, 56, dtype=x.dtype, device=device)
    wide_x[:, 8:48] = x
    wide_logits = torch.zeros(T, 20, device=device)
    wide_logits[:, 4:16] = logits
    check(cfg, wide_logits[:, 4:16], bias, wide_x[:, 8:48], one)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fixtures: constants
@given(cfg=router_configs(), T=st.integers(1, 24), D=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       one=st.booleans(), seed=st.integers(0, 2**16))
def test_route_dispatch_random_configs(cfg, T, D, dtype, one, seed, device, poisoned):
    """Any configuration (where the row-wise route does not apply: the general route, then the
    dispatch) equals the reference route + dispatch: ids, plan and rows exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, cfg.num_experts, generator=g) * 2).to(device)
    bias = (torch.randn(cfg.num_experts, generator=g) * 0.05).to(device) if cfg.expert_bias \
        else None
    pri = torch.rand(T, cfg.top_k, generator=g).to(device) if cfg.drop_policy == "random" \
        else None
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    lc = launch_config(T, cfg.num_experts, cfg.top_k).replace(dispatch_one=one)
    sel, plan, rows = route_dispatch(logits, x, cfg, bias, pri, launch=lc)
    sel_r, plan_r, rows_r = ops.route_dispatch(logits, x, cfg, bias, pri, backend="torch")
    assert torch.equal(sel.topk_ids, sel_r.topk_ids)
    torch.testing.assert_close(sel.topk_weights, sel_r.topk_weights, rtol=1e-5, atol=1e-6)
    for f in ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot"):
        assert torch.equal(getattr(plan, f), getattr(plan_r, f)), f
    assert torch.equal(rows, rows_r)


def test_ops_route_dispatch_backends_agree(device, poisoned):
    cfg, logits, bias, x = make(17, 10, 2, 24, dict(capacity_factor=1.0), device)
    sel_t, plan_t, rows_t = ops.route_dispatch(logits, x, cfg, backend="torch")
    sel, plan, rows = ops.route_dispatch(logits, x, cfg, backend="triton")
    assert torch.equal(sel.topk_ids, sel_t.topk_ids)
    assert torch.equal(plan.slot_to_row, plan_t.slot_to_row)
    assert torch.equal(rows, rows_t)


def test_falls_back_past_decode_sizes(device, poisoned, monkeypatch):
    """Past 16 tokens: the route, then the dispatch (two ops)."""
    cfg, logits, bias, x = make(40, 16, 2, 8, {}, device)
    called = []
    monkeypatch.setattr(fast_route, "route_dispatch_rows", lambda *a: called.append(a))
    sel, plan, rows = route_dispatch(logits, x, cfg, bias)
    assert not called
    assert_route_matches_reference(sel, plan, logits, cfg, bias)
    assert torch.equal(rows, ref.dispatch(x, plan))


def test_falls_back_for_gradients(device):
    """x that needs a gradient takes the differentiable dispatch."""
    cfg, logits, bias, x = make(12, 8, 2, 16, {}, device, dtype=torch.float32)
    x.requires_grad_(True)
    sel, plan, rows = route_dispatch(logits, x, cfg, bias)
    assert rows.requires_grad
    (rows.float() * 2).sum().backward()
    kept = (plan.slot_to_row >= 0).sum(dim=1).float()  # each token's kept copies
    torch.testing.assert_close(x.grad, 2 * kept[:, None].expand_as(x))


def test_one_launch_rule():
    """One launch up to 16 tokens (a tile of 32, 4 threads a token: <= 32 words of the rank
    table a thread at E <= 512), else the two ops; the launch configuration can turn it off."""
    assert fast_route.dispatch_in_one(1, 16) and fast_route.dispatch_in_one(16, 4096)
    assert not fast_route.dispatch_in_one(17, 4096) and not fast_route.dispatch_in_one(8, 0)
    assert not fast_route.dispatch_in_one(8, 16, launch_config(8, 64, 8).replace(
        dispatch_one=False))
    assert _rowmap.next_pow2(512 // 4) // 4 <= 32


def test_bad_inputs(device):
    cfg, logits, bias, x = make(8, 8, 2, 8, {}, device)
    with pytest.raises(ValueError, match="x must be"):
        route_dispatch(logits, x[:5], cfg)
    with pytest.raises(ValueError, match="x must be"):
        route_dispatch(logits, x[:, :, None], cfg)
    with pytest.raises(TypeError, match="dtype"):
        route_dispatch(logits, x.to(torch.int32), cfg)
    with pytest.raises(ValueError, match="top_k"):
        route_dispatch(logits, x, RouterConfig(num_experts=8, top_k=9))


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,D,kw,one", [
    (16, 64, 8, 4096, {}, True),
    (64, 64, 8, 4096, dict(renormalize=True), False),  # the decode target: the two ops
    (1, 128, 8, 4096, dict(renormalize=True), True),
    (7, 256, 8, 7168, dict(score_func="sigmoid", expert_bias=True, renormalize=True,
                           routed_scaling_factor=2.5), True),
    (13, 256, 4, 1000, dict(pad_to_multiple=128), True),  # many empty rows to zero
    (16, 512, 8, 2048, dict(capacity_factor=0.5, pad_to_multiple=1), True),
    (100, 128, 8, 2048, dict(capacity_factor=1.0), False),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_dispatch_full_size(T, E, K, D, kw, one, dtype, device, poisoned):
    for seed in range(2):
        check(*make(T, E, K, D, kw, device, dtype=dtype, seed=seed), one)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [16, 64])  # one launch; the route then the dispatch
def test_route_dispatch_in_cuda_graph(T, device):
    """Captured once, replayed on new logits and tokens; the direct launch after the first call."""
    cfg, logits, bias, x = make(T, 64, 8, 4096, {}, device)
    route_dispatch(logits, x, cfg)  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, plan, rows = route_dispatch(logits, x, cfg)
    for seed in range(3):
        g = torch.Generator(device=device).manual_seed(seed)
        logits.copy_(torch.randn(T, 64, device=device, generator=g))
        x.copy_(torch.randn(T, 4096, device=device, generator=g))
        rows.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_route_matches_reference(sel, plan, logits, cfg, None)
        assert torch.equal(rows, ref.dispatch(x, plan))


@pytest.mark.gpu
def test_rowmap_dependent_launches(device):
    """dispatch and combine (programmatic dependent launches on Hopper), in a CUDA graph behind
    the route's kernels."""
    cfg, logits, bias, x = make(64, 64, 8, 4096, {}, device)

    def path():
        sel, plan, rows = ops.route_dispatch(logits, x, cfg, backend="triton")
        return sel, plan, rows, ops.combine(rows * 0.5, plan, sel.topk_weights, "triton")

    path()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, plan, rows, y = path()
    for seed in range(2):
        logits.copy_(torch.randn(64, 64, device=device) * (seed + 1))
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.combine(ref.dispatch(x, plan) * 0.5, plan, sel.topk_weights)
        assert torch.equal(rows, ref.dispatch(x, plan))
        torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)
