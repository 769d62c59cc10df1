"""The three-launch, sort-free route equals the reference integer for integer, over tile sizes
that put the slots of one expert in many tiles (the tile-prefix scan) and over random configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_route_matches_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_triton_backend import router_configs

from routerlib import RouterConfig
from routerlib.kernels import route, route_fused

CASES = [  # (T, E, K, config) with the edge each covers
    (1, 8, 2, {}),  # one token, one tile
    (37, 13, 3, dict(capacity_factor=1.0)),  # odd sizes, drops decided across tiles
    (300, 8, 2, dict(pad_to_multiple=4)),  # many tiles per expert, padded ragged
    (100, 64, 8, dict(renormalize=True)),
    (77, 16, 4, dict(score_func="sigmoid", n_groups=4, topk_groups=2, group_score="top2_sum",
                     expert_bias=True, renormalize=True, routed_scaling_factor=2.5)),
    (129, 7, 7, dict(softmax_after_topk=True, capacity_factor=0.5)),  # k = E, heavy drops
    (50, 130, 1, {}),  # E > 128, not a power of two, k = 1
]


def check(T, E, K, kw, block_t, device, dtype=torch.float32, seed=0):
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 2).to(device=device, dtype=dtype)
    if T > 3:
        logits[3] = logits[2]  # identical tokens: arrival order decides their ranks
    bias = (torch.randn(E, generator=g) * 0.05).to(device) if cfg.expert_bias else None
    sel, plan = route_fused.route_fused(logits, cfg, bias, block_t=block_t)
    assert_route_matches_reference(sel, plan, logits, cfg, bias)


@pytest.mark.parametrize("T,E,K,kw", CASES)
@pytest.mark.parametrize("block_t", [None, 2, 8])
def test_route_fused_equals_reference(T, E, K, kw, block_t, device):
    check(T, E, K, kw, block_t, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_fused_low_precision_logits(dtype, device):
    check(200, 24, 4, dict(capacity_factor=1.25), 4, device, dtype)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # device: a constant
@given(cfg=router_configs(), T=st.integers(1, 200), block_t=st.sampled_from([1, 2, 4, 16]),
       seed=st.integers(0, 2**16))
def test_route_fused_random_configs(cfg, T, block_t, seed, device):
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in ("num_experts", "top_k")}
    kw["drop_policy"] = "position"
    check(T, cfg.num_experts, cfg.top_k, kw, block_t, device, seed=seed)


def test_route_uses_it_only_when_enabled(monkeypatch, device):
    cfg = RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    logits = torch.randn(40, 8, device=device)
    calls = []
    real = route_fused.route_fused
    monkeypatch.setattr(route_fused, "route_fused", lambda *a, **k: calls.append(1) or real(*a))
    route(logits, cfg)
    assert not calls  # off by default until measured on a GPU
    monkeypatch.setenv("ROUTERLIB_FUSED_ROUTE", "1")
    route(logits, cfg)
    assert calls == [1]
    assert not route_fused.applies(logits, RouterConfig(8, 2, capacity_factor=1.0,
                                                        drop_policy="random"))
