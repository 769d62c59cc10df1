"""The whole Triton path behind the backend switch equals the reference: routing on random
configurations (hypothesis), the Router's losses, and the MoE layer forward and backward.

On a CPU the kernels run under TRITON_INTERPRET=1 (set by the test command), so shapes are small.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_equal_int
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerlib import MoEConfig, MoELayer, RouterConfig, ops

PLAN_FIELDS = ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot")


@st.composite
def router_configs(draw) -> RouterConfig:
    n_groups = draw(st.sampled_from([1, 1, 2, 4]))
    per_group = draw(st.integers(1, 6))
    E = n_groups * per_group if n_groups > 1 else draw(st.integers(1, 40))
    topk_groups = draw(st.integers(1, n_groups))
    K = draw(st.integers(1, max(1, min(E, topk_groups * (E // n_groups), 8))))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    after = score == "softmax" and n_groups == 1 and draw(st.booleans())
    cf = draw(st.sampled_from([None, None, 0.5, 1.0, 1.25, 3.0]))
    return RouterConfig(
        num_experts=E, top_k=K, score_func=score, softmax_after_topk=after,
        renormalize=draw(st.booleans()), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        n_groups=n_groups, topk_groups=topk_groups,
        group_score=draw(st.sampled_from(["max", "top2_sum"])), expert_bias=draw(st.booleans()),
        capacity_factor=cf, min_capacity=draw(st.integers(1, 3)),
        drop_policy=draw(st.sampled_from(["position", "priority", "random"])),
        pad_to_multiple=draw(st.sampled_from([1, 4])))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # device: a constant
@given(cfg=router_configs(), T=st.integers(1, 70), dtype=st.sampled_from(
    [torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16),
       need_stats=st.booleans())
def test_route_triton_equals_torch(cfg, T, dtype, seed, need_stats, device):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, cfg.num_experts, generator=g) * 2).to(device=device, dtype=dtype)
    bias = (torch.randn(cfg.num_experts, generator=g) * 0.05).to(device) if cfg.expert_bias \
        else None
    pri = torch.rand(T, cfg.top_k, generator=g).to(device) if cfg.drop_policy == "random" \
        else None
    sel_t, plan_t = ops.route(logits, cfg, bias, pri, backend="triton", need_stats=need_stats)
    sel_r, plan_r = ops.route(logits, cfg, bias, pri, backend="torch")
    assert_equal_int(sel_t.topk_ids, sel_r.topk_ids, "topk_ids")
    assert_close(sel_t.topk_weights, sel_r.topk_weights, tol=1e-5, name="topk_weights")
    if need_stats or sel_t.prob_sum is not None:  # without need_stats the fast route skips them
        assert_close(sel_t.prob_sum, sel_r.prob_sum, tol=1e-4, name="prob_sum")
        assert_close(sel_t.zsq_sum, sel_r.zsq_sum, tol=1e-4, name="zsq_sum")
    assert plan_t.capacity == plan_r.capacity and plan_t.num_rows == plan_r.num_rows
    for f in PLAN_FIELDS:
        assert_equal_int(getattr(plan_t, f), getattr(plan_r, f), f)


@pytest.mark.parametrize("coefs", [dict(aux_loss_coef=0.01), dict(z_loss_coef=1e-3),
                                   dict(aux_loss_coef=0.01, seq_aux_loss_coef=0.1)])
def test_router_losses_match(coefs, device):
    """The Router's losses from the kernels' fused sums equal the reference's, with gradients."""
    from routerlib import Router

    cfg = RouterConfig(num_experts=12, top_k=3, renormalize=True, **coefs)
    outs = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        r = Router(32, cfg, backend=backend, device=device).train()
        x = torch.randn(2 * 20, 32, device=device)
        out = r(x, seq_len=20)
        (out.aux_loss + out.z_loss).backward()
        outs[backend] = (out.aux_loss.detach(), out.z_loss.detach(), r.gate.weight.grad.clone())
    for a, b, name in zip(outs["triton"], outs["torch"], ("aux", "z", "grad_gate")):
        assert_close(a, b, tol=1e-5, name=name)


@pytest.mark.parametrize("router_kw", [
    dict(capacity_factor=1.0, drop_policy="priority"),  # capacity layout with drops
    dict(pad_to_multiple=4, score_func="sigmoid", renormalize=True),  # ragged, padded
    dict(routing="expert_choice", capacity_factor=1.0),  # S = E slots per token
])
def test_moe_layer_triton_equals_torch(router_kw, device):
    """Forward output and every parameter/input gradient of the MoE layer agree across backends."""
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = MoEConfig(hidden_size=24, ffn_size=40,
                        router=RouterConfig(num_experts=6, top_k=2, **router_kw),
                        shared_expert_size=16, backend=backend)
        layer = MoELayer(cfg, device=device)
        x = torch.randn(2, 9, 24, device=device, requires_grad=True)
        y, out = layer(x)
        y.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results[backend] = (y.detach(), x.grad.clone(), grads, out.plan.slot_to_row.clone())
    yt, gxt, gt, st_ = results["triton"]
    yr, gxr, gr, sr = results["torch"]
    assert_equal_int(st_, sr, "slot_to_row")
    assert_close(yt, yr, tol=1e-4, name="y")
    assert_close(gxt, gxr, tol=1e-4, name="grad_x")
    for name in gr:
        assert_close(gt[name], gr[name], tol=1e-4, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Holes a randomized GPU check found: each test reproduces one at the size that shows it
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [
    1100,  # T*K > SINGLE_MAX_SLOTS: the plan's multi-block path (CPU-sized)
    pytest.param(12289, marks=pytest.mark.gpu),  # the size of the held-out check
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_priority_ties_go_to_the_lower_slot(T, dtype, device):
    """K=1 with renormalisation: every weight is exactly 1.0, so priority dropping is a pure tie
    and must keep the lower slots, as the reference does. (An approximate division in the
    kernel made some weights 0.99999994 on the GPU and reordered thousands of slots.)"""
    cfg = RouterConfig(num_experts=16, top_k=1, renormalize=True, capacity_factor=1.0,
                       drop_policy="priority")
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(T, 16, generator=g) * 2).to(device=device, dtype=dtype)
    sel_t, plan_t = ops.route(logits, cfg, backend="triton")
    sel_r, plan_r = ops.route(logits, cfg, backend="torch")
    assert_equal_int(sel_t.topk_ids, sel_r.topk_ids, "topk_ids")
    assert bool((sel_t.topk_weights == 1.0).all()), "K=1 renormalised weights must be exactly 1"
    for f in PLAN_FIELDS:
        assert_equal_int(getattr(plan_t, f), getattr(plan_r, f), f)


@pytest.mark.parametrize("T,E,K,D,cf", [
    (37, 8, 2, 1000, 1.0),  # capacity drops (zero gradient), D not a multiple of a block
    (5, 4, 4, 4096, None),  # K = E, a long dot
])
def test_combine_weight_grad_is_fp32_accurate(T, E, K, D, cf, device):
    """The weights' gradient of combine, <grad_y[t], expert_out[row]>, with fp32 inputs equals
    the exact (fp64) dot rounded to fp32: the dot of D terms cancels, so an fp32 accumulator
    loses digits (1e-3..1e-2 relative on small entries); the kernel accumulates it in fp64."""
    cfg = RouterConfig(num_experts=E, top_k=K, capacity_factor=cf)
    g = torch.Generator().manual_seed(11)
    _, plan = ops.route(torch.randn(T, E, generator=g).to(device), cfg)
    out = torch.randn(plan.num_rows, D, generator=g, dtype=torch.float64).to(device)
    grad_y = torch.randn(T, D, generator=g, dtype=torch.float64).to(device)
    w = torch.rand(T, K, generator=g).to(device)
    exact = torch.zeros(T, K, dtype=torch.float64, device=device)
    rows = plan.slot_to_row.long()
    for j in range(K):
        kept = rows[:, j] >= 0
        exact[kept, j] = (grad_y.float().double()[kept]
                          * out.float().double()[rows[kept, j]]).sum(1)
    wt = w.clone().requires_grad_()
    y = ops.combine(out.float(), plan, wt, backend="triton")
    y.backward(grad_y.float())
    err = (wt.grad.double() - exact).abs()
    assert bool((err <= 1e-6 * exact.abs() + 1e-30).all()), (
        f"grad_weights off by up to {float((err / exact.abs().clamp_min(1e-30)).max()):.2e} "
        "relative")


def test_clear_errors(monkeypatch):
    """Inputs the kernels cannot take get a routerlib error that says what to do."""
    cfg = RouterConfig(num_experts=8, top_k=2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a machine without a GPU, unset
    with pytest.raises(RuntimeError, match=r"backend='triton' runs Triton kernels on a CUDA GPU"
                                           r".*TRITON_INTERPRET=1"):
        ops.route(torch.randn(4, 8), cfg, backend="triton")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"logits are on the meta device"):
            ops.route(torch.randn(4, 8, device="meta"), cfg, backend=backend)
        with pytest.raises(TypeError, match=r"cfg must be a routerlib.RouterConfig, got dict "
                                            r"\(build one with RouterConfig\(\*\*d\)\)"):
            ops.route(torch.randn(4, 8), {"num_experts": 8, "top_k": 2}, backend=backend)


def test_check_finite_flag_reports_later_without_waiting():
    """The GPU rule of check_finite, driven on a CPU tensor: a call with NaN logits returns, the
    next call (or raise_if_nonfinite) raises, and the flag is clean again afterwards."""
    from routerlib.reference import gating

    flag = gating._FiniteFlag(torch.device("cpu"))
    good, bad = torch.randn(3, 4), torch.randn(3, 4)
    bad[1, 2] = float("nan")
    flag.note(good)
    flag.note(bad)  # no error yet: nothing is read back at the call itself
    with pytest.raises(ValueError, match=r"logits contain NaN or inf: an earlier route call"):
        flag.note(good)
    flag.raise_if_seen(wait=True)  # the bad call was reported once; the good ones pass
    flag.note(good)
    flag.raise_if_seen(wait=True)


@pytest.mark.gpu
def test_check_finite_on_gpu_needs_no_sync(device):
    """On the GPU a route with check_finite=True never waits for the device (CUDA's sync debug
    mode 'error' would raise on any read-back), and the bad logits are raised later."""
    from routerlib.reference import raise_if_nonfinite

    cfg = RouterConfig(num_experts=16, top_k=2)
    logits = torch.randn(64, 16, device=device)
    ops.route(logits, cfg, backend="triton")  # compile outside the sync check
    torch.cuda.synchronize()
    bad = logits.clone()
    bad[3, 4] = float("inf")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.route(bad, cfg, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match=r"NaN or inf"):
        raise_if_nonfinite(device)
