"""RouterConfig / MoEConfig: every validation error names the parameter and the value; the
capacity formula C = max(min_capacity, ceil(capacity_factor * T * K / E)), at most T for expert
choice."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from routerlib.config import MoEConfig, RouterConfig


def _rc(**kw) -> RouterConfig:
    base = dict(num_experts=8, top_k=2)
    base.update(kw)
    return RouterConfig(**base)


# (overrides, parameter named in the message, value shown in the message)
BAD_ROUTER = [
    (dict(num_experts=0), "num_experts", 0),
    (dict(num_experts=-3), "num_experts", -3),
    (dict(num_experts=8.0), "num_experts", 8.0),  # a float is not an int
    (dict(top_k=0), "top_k", 0),  # k < 1
    (dict(top_k=1.0), "top_k", 1.0),
    (dict(top_k=9), "top_k", 9),  # k > E
    (dict(score_func="relu"), "score_func", "relu"),
    (dict(score_func="sigmoid", softmax_after_topk=True), "softmax_after_topk", True),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor", 0.0),
    (dict(routed_scaling_factor=-2.5), "routed_scaling_factor", -2.5),
    (dict(routed_scaling_factor=math.inf), "routed_scaling_factor", math.inf),
    (dict(routed_scaling_factor=math.nan), "routed_scaling_factor", math.nan),
    (dict(n_groups=0), "n_groups", 0),
    (dict(n_groups=3), "n_groups", 3),  # does not divide E=8
    (dict(n_groups=2.0), "n_groups", 2.0),
    (dict(n_groups=4, topk_groups=0), "topk_groups", 0),
    (dict(n_groups=4, topk_groups=5), "topk_groups", 5),  # more groups kept than exist
    (dict(topk_groups=2), "topk_groups", 2),  # n_groups=1 by default
    (dict(n_groups=4, topk_groups=1, top_k=3), "top_k", 3),  # 1 group of 2 experts left for K=3
    (dict(group_score="mean"), "group_score", "mean"),
    (dict(routing="hash"), "routing", "hash"),
    (dict(routing="expert_choice"), "capacity_factor", None),  # expert choice needs C
    (dict(routing="expert_choice", capacity_factor=1.0, n_groups=2), "routing", "expert_choice"),
    (dict(routing="expert_choice", capacity_factor=1.0, softmax_after_topk=True), "routing",
     "expert_choice"),
    (dict(capacity_factor=0.0), "capacity_factor", 0.0),  # capacity_factor <= 0
    (dict(capacity_factor=-1.0), "capacity_factor", -1.0),
    (dict(capacity_factor=math.inf), "capacity_factor", math.inf),
    (dict(capacity_factor=math.nan), "capacity_factor", math.nan),
    (dict(min_capacity=0), "min_capacity", 0),
    (dict(min_capacity=2.0), "min_capacity", 2.0),
    (dict(drop_policy="lifo"), "drop_policy", "lifo"),
    (dict(pad_to_multiple=0), "pad_to_multiple", 0),
    (dict(pad_to_multiple=16.0), "pad_to_multiple", 16.0),
    (dict(jitter_eps=-0.1), "jitter_eps", -0.1),
    (dict(jitter_eps=1.0), "jitter_eps", 1.0),
    (dict(jitter_eps=math.nan), "jitter_eps", math.nan),
    (dict(noise_std=-1.0), "noise_std", -1.0),
    (dict(noise_std=math.inf), "noise_std", math.inf),
    (dict(aux_loss_coef=-0.01), "aux_loss_coef", -0.01),
    (dict(aux_loss_coef=math.nan), "aux_loss_coef", math.nan),
    (dict(seq_aux_loss_coef=-1e-4), "seq_aux_loss_coef", -1e-4),
    (dict(z_loss_coef=-1e-3), "z_loss_coef", -1e-3),
    (dict(z_loss_coef=math.inf), "z_loss_coef", math.inf),
    (dict(bias_update_rate=-1e-3), "bias_update_rate", -1e-3),
]


@pytest.mark.parametrize("overrides, name, value", BAD_ROUTER,
                         ids=[f"{n}={v!r}" for _, n, v in BAD_ROUTER])
def test_router_config_rejects(overrides, name, value):
    with pytest.raises(ValueError, match=re.escape(f"RouterConfig.{name}={value!r}")):
        _rc(**overrides)


def test_router_config_messages_say_why():
    with pytest.raises(ValueError, match=r"top_k=9: must be <= num_experts=8"):
        _rc(top_k=9)
    with pytest.raises(ValueError, match=r"n_groups=3: .*dividing num_experts=8"):
        _rc(n_groups=3)
    with pytest.raises(ValueError, match=r"exceeds the 2 experts left by topk_groups=1"):
        _rc(n_groups=4, topk_groups=1, top_k=3)
    with pytest.raises(ValueError, match=r"expert_choice routing needs a capacity_factor"):
        _rc(routing="expert_choice")


def test_router_config_accepts_edges():
    # the boundaries that are legal: K = E, one expert, K filling exactly the kept groups
    assert _rc(num_experts=1, top_k=1).slots_per_token == 1
    assert _rc(top_k=8).top_k == 8
    assert _rc(n_groups=4, topk_groups=2, top_k=4).topk_groups == 2
    assert _rc(n_groups=8, topk_groups=8, group_score="top2_sum").n_groups == 8
    assert _rc(jitter_eps=0.0, noise_std=0.0, capacity_factor=1e-6).capacity_factor == 1e-6
    cfg = _rc(routing="expert_choice", capacity_factor=2.0)
    assert cfg.slots_per_token == 8 and not cfg.dropless
    assert _rc().dropless and _rc().slots_per_token == 2


def test_router_config_is_frozen():
    cfg = _rc()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]


BAD_MOE = [
    (dict(hidden_size=0), ValueError, "MoEConfig.hidden_size=0"),
    (dict(hidden_size=8.0), ValueError, "MoEConfig.hidden_size=8.0"),
    (dict(ffn_size=-1), ValueError, "MoEConfig.ffn_size=-1"),
    (dict(shared_expert_size=-4), ValueError, "MoEConfig.shared_expert_size=-4"),
    (dict(expert_path="grouped"), ValueError, "MoEConfig.expert_path='grouped'"),
    (dict(backend="cuda"), ValueError, "MoEConfig.backend='cuda'"),
    (dict(router={"num_experts": 8}), TypeError, "MoEConfig.router must be a RouterConfig"),
]


@pytest.mark.parametrize("overrides, exc, msg", BAD_MOE, ids=[m for _, _, m in BAD_MOE])
def test_moe_config_rejects(overrides, exc, msg):
    base = dict(hidden_size=16, ffn_size=32, router=_rc())
    base.update(overrides)
    with pytest.raises(exc, match=re.escape(msg)):
        MoEConfig(**base)


def test_moe_config_defaults():
    cfg = MoEConfig(hidden_size=16, ffn_size=32, router=_rc())
    assert (cfg.shared_expert_size, cfg.expert_path, cfg.backend) == (0, "auto", "torch")


# (config overrides, T, expected C, why)
CAPACITY = [
    (dict(), 10, None, "dropless"),
    (dict(capacity_factor=1.0), 16, 4, "1.0*16*2/8 = 4 exactly"),
    (dict(capacity_factor=1.25), 10, 4, "1.25*10*2/8 = 3.125 -> ceil 4"),
    (dict(capacity_factor=2.0, top_k=1), 3, 1, "2*3*1/8 = 0.75 -> 1"),
    (dict(capacity_factor=0.5), 1, 1, "0.125 -> ceil 1"),
    (dict(capacity_factor=0.5, min_capacity=3), 8, 3, "ceil(1.0)=1 < min_capacity 3"),
    (dict(capacity_factor=4.0, min_capacity=3), 8, 8, "4*8*2/8 = 8 > min_capacity"),
    (dict(capacity_factor=1.0), 0, 1, "T=0: ceil(0)=0, min_capacity 1"),
    (dict(capacity_factor=4.0, top_k=8), 5, 20, "token choice is not capped at T"),
    (dict(capacity_factor=4.0, routing="expert_choice"), 5, 5, "ceil(4*5*2/8)=5 = T"),
    (dict(capacity_factor=8.0, routing="expert_choice"), 5, 5, "ceil(10) capped at T=5"),
    (dict(capacity_factor=1.0, routing="expert_choice"), 12, 3, "1*12*2/8 = 3 <= T"),
    (dict(capacity_factor=1.0, routing="expert_choice", min_capacity=9), 4, 4,
     "min_capacity 9, then the cap at T=4"),
]


@pytest.mark.parametrize("overrides, T, expected, why", CAPACITY, ids=[c[3] for c in CAPACITY])
def test_capacity(overrides, T, expected, why):
    assert _rc(**overrides).capacity(T) == expected, why


@pytest.mark.parametrize("cf", [0.3, 0.75, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("E, K", [(1, 1), (6, 2), (8, 8), (7, 3)])
def test_capacity_formula(cf, E, K):
    # C is the smallest integer >= cf*T*K/E (exact arithmetic on these dyadic/decimal factors is
    # checked through multiplication, so no float ceil is repeated here), never below min_capacity
    cfg = RouterConfig(num_experts=E, top_k=K, capacity_factor=cf, min_capacity=2)
    for T in (1, 2, 7, 33):
        C = cfg.capacity(T)
        assert isinstance(C, int)
        assert C >= 2
        assert C * E >= cf * T * K - 1e-9  # enough rows for cf * T*K slots
        if C > 2:
            assert (C - 1) * E < cf * T * K + 1e-9  # and not one more than needed
