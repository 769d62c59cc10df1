"""The one-launch decode route equals the reference (and so the general Triton path), integer
for integer in the plan, on every scoring mode, groups, bias, capacity and padded layouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_equal_int, assert_route_matches_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_triton_backend import router_configs

from routerlib import RouterConfig
from routerlib import reference as ref
from routerlib.kernels import route, route_small

CASES = [  # (T, E, K, config) with the edge each covers
    (1, 8, 2, {}),  # a single token
    (7, 13, 3, dict(capacity_factor=1.0)),  # odd T, E not a power of two, drops
    (64, 64, 8, dict(renormalize=True)),  # the decode target's shape
    (33, 8, 8, dict(softmax_after_topk=True, pad_to_multiple=4)),  # k = E, padded ragged
    (40, 16, 4, dict(score_func="sigmoid", n_groups=4, topk_groups=2, group_score="top2_sum",
                     expert_bias=True, renormalize=True, routed_scaling_factor=2.5)),
    (20, 6, 2, dict(capacity_factor=0.5, min_capacity=2)),  # min_capacity wins
    (50, 128, 8, dict(pad_to_multiple=16)),  # many empty experts, padding rows
    (16, 3, 1, dict(capacity_factor=2.0)),  # k = 1, spare capacity rows
]


@pytest.mark.parametrize("T,E,K,kw", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_small_equals_reference(T, E, K, kw, dtype, device):
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    logits = (torch.randn(T, E) * 2).to(device=device, dtype=dtype)
    logits[0, : min(3, E)] = logits[0, 0]  # ties: the lower expert must win
    if T > 3:
        logits[3] = logits[2]  # two identical tokens: arrival order decides their ranks
    bias = torch.randn(E, device=device) * 0.05 if cfg.expert_bias else None
    assert route_small.applies(logits, cfg)
    sel, plan = route_small.route_small(logits, cfg, bias)
    assert_route_matches_reference(sel, plan, logits, cfg, bias)


def test_route_uses_it_only_when_enabled_and_applicable(monkeypatch, device):
    cfg = RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    logits = torch.randn(12, 8, device=device)
    calls = []
    real = route_small.route_small
    monkeypatch.setattr(route_small, "route_small", lambda *a, **k: calls.append(1) or real(*a))
    route(logits, cfg)
    assert not calls  # off by default until measured on a GPU
    monkeypatch.setenv("ROUTERLIB_SMALL_ROUTE", "1")
    sel, plan = route(logits, cfg)
    assert calls == [1]
    want = ref.build_plan(ref.select(logits, cfg), cfg)
    assert_equal_int(plan.row_to_slot, want.row_to_slot, "row_to_slot")
    # not applicable: another drop policy, a gradient, or a tile too large for one program
    assert not route_small.applies(logits, RouterConfig(8, 2, capacity_factor=1.0,
                                                        drop_policy="priority"))
    assert not route_small.applies(logits.clone().requires_grad_(), cfg)
    assert not route_small.applies(torch.randn(1024, 64, device=device), RouterConfig(64, 8))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # device: a constant
@given(cfg=router_configs(), T=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_route_small_random_configs(cfg, T, seed, device):
    cfg = dataclasses.replace(cfg, drop_policy="position")
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, cfg.num_experts, generator=g) * 2).to(device)
    bias = (torch.randn(cfg.num_experts, generator=g) * 0.05).to(device) if cfg.expert_bias \
        else None
    sel, plan = route_small.route_small(logits, cfg, bias)
    assert_route_matches_reference(sel, plan, logits, cfg, bias)
