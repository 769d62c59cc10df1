"""Router and MoE layer configuration: one frozen dataclass each, validated once at construction.

Shape vocabulary used across routerlib:
    T tokens, D hidden, E experts, K top-k, F expert FFN width, C capacity (rows per expert),
    S slots per token (S = K for token choice, S = E for expert choice), R rows of the expert
    buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

ScoreFunc = Literal["softmax", "sigmoid"]
Routing = Literal["token_choice", "expert_choice"]
DropPolicy = Literal["position", "priority", "random"]
GroupScore = Literal["max", "top2_sum"]
Backend = Literal["torch", "triton"]

_SCORE_FUNCS = ("softmax", "sigmoid")
_ROUTINGS = ("token_choice", "expert_choice")
_DROP_POLICIES = ("position", "priority", "random")
_GROUP_SCORES = ("max", "top2_sum")
_BACKENDS = ("torch", "triton")


def _fail(name: str, value: object, why: str) -> None:
    raise ValueError(f"RouterConfig.{name}={value!r}: {why}")


@dataclass(frozen=True)
class RouterConfig:
    """Everything that decides where a token goes.

    Scores
        score_func: "softmax" (Switch, Mixtral, Qwen) or "sigmoid" (DeepSeek-V3).
        softmax_after_topk: softmax over the K selected logits only (Mixtral's form); implies the K
            weights sum to one. Only with score_func="softmax".
        renormalize: divide the K selected weights by their sum.
        routed_scaling_factor: multiplies the final K weights (DeepSeek-V3 uses 2.5).
        n_groups, topk_groups: group-limited top-k: experts are split into n_groups contiguous
            groups, the best topk_groups groups (by group_score) are kept, the rest masked.
        group_score: "max" (DeepSeek-V2) or "top2_sum" (DeepSeek-V3) of a group's selection scores.
        expert_bias: a per-expert bias added to the scores for *selection only* (aux-loss-free
            balancing); the weights come from the unbiased scores.

    Selection
        routing: "token_choice" (each token picks K experts) or "expert_choice" (each expert picks
            its C best tokens, C from capacity_factor).
        Ties always go to the lower expert index (token choice) or the lower token index (expert
        choice).

    Capacity
        capacity_factor: None = dropless; else C = max(min_capacity, ceil(capacity_factor*T*K/E)).
        drop_policy: which slots an over-full expert keeps: "position" (arrival order, slot t*K+k),
            "priority" (highest weight first: Batch Prioritized Routing), "random".
            Rows inside an expert follow the same order.
        pad_to_multiple: pad each expert's segment of the ragged (dropless) buffer to this block
            size
            so a grouped GEMM can tile it; 1 = no padding.

    Training-time noise (applied only when the router is in training mode)
        jitter_eps: multiply the router input by U(1-eps, 1+eps) (Switch Transformer).
        noise_std: add N(0, noise_std^2) to the logits.

    Losses
        aux_loss_coef: Switch/GShard load-balancing loss E*sum_e f_e*P_e.
        seq_aux_loss_coef: its per-sequence variant (DeepSeek-V3), needs the sequence length.
        z_loss_coef: mean(logsumexp(logits)^2) (ST-MoE).
        bias_update_rate: step of the aux-loss-free bias update
            b_e += rate * sign(mean_load - load_e).

    Checks
        check_finite: reject NaN/inf logits (a host sync; switched off automatically while a CUDA
            graph is being captured).
    """

    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    softmax_after_topk: bool = False
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = "max"
    expert_bias: bool = False
    routing: Routing = "token_choice"
    capacity_factor: float | None = None
    min_capacity: int = 1
    drop_policy: DropPolicy = "position"
    pad_to_multiple: int = 1
    jitter_eps: float = 0.0
    noise_std: float = 0.0
    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 1e-3
    check_finite: bool = True

    def __post_init__(self) -> None:
        E, K = self.num_experts, self.top_k
        if not isinstance(E, int) or isinstance(E, bool) or E < 1:
            _fail("num_experts", E, "must be an int >= 1")
        if not isinstance(K, int) or isinstance(K, bool) or K < 1:
            _fail("top_k", K, "must be an int >= 1")
        if K > E:
            _fail("top_k", K, f"must be <= num_experts={E}")
        if self.score_func not in _SCORE_FUNCS:
            _fail("score_func", self.score_func, f"must be one of {_SCORE_FUNCS}")
        if self.softmax_after_topk and self.score_func != "softmax":
            _fail("softmax_after_topk", True, "needs score_func='softmax'")
        if not math.isfinite(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be finite and > 0")
        if not isinstance(self.n_groups, int) or self.n_groups < 1 or E % self.n_groups:
            _fail("n_groups", self.n_groups, f"must be an int >= 1 dividing num_experts={E}")
        if not isinstance(self.topk_groups, int) or not 1 <= self.topk_groups <= self.n_groups:
            _fail("topk_groups", self.topk_groups, f"must be in [1, n_groups={self.n_groups}]")
        if self.n_groups > 1 and K > self.topk_groups * (E // self.n_groups):
            _fail("top_k", K, f"exceeds the {self.topk_groups * (E // self.n_groups)} experts "
                  f"left by topk_groups={self.topk_groups} of n_groups={self.n_groups}")
        if self.group_score not in _GROUP_SCORES:
            _fail("group_score", self.group_score, f"must be one of {_GROUP_SCORES}")
        if self.routing not in _ROUTINGS:
            _fail("routing", self.routing, f"must be one of {_ROUTINGS}")
        if self.routing == "expert_choice":
            if self.capacity_factor is None:
                _fail("capacity_factor", None, "expert_choice routing needs a capacity_factor")
            if self.n_groups > 1 or self.softmax_after_topk:
                _fail("routing", self.routing, "expert_choice supports neither groups nor "
                      "softmax_after_topk")
        cf = self.capacity_factor
        if cf is not None and (not math.isfinite(cf) or cf <= 0):
            _fail("capacity_factor", cf, "must be > 0 and finite (None for dropless)")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 1:
            _fail("min_capacity", self.min_capacity, "must be an int >= 1")
        if self.drop_policy not in _DROP_POLICIES:
            _fail("drop_policy", self.drop_policy, f"must be one of {_DROP_POLICIES}")
        if not isinstance(self.pad_to_multiple, int) or self.pad_to_multiple < 1:
            _fail("pad_to_multiple", self.pad_to_multiple, "must be an int >= 1")
        if not 0.0 <= self.jitter_eps < 1.0:
            _fail("jitter_eps", self.jitter_eps, "must be in [0, 1)")
        for name in ("noise_std", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
                     "bias_update_rate"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                _fail(name, v, "must be finite and >= 0")

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    @property
    def slots_per_token(self) -> int:
        """S: K slots per token for token choice; E candidate slots per token for expert choice."""
        return self.num_experts if self.routing == "expert_choice" else self.top_k

    def capacity(self, num_tokens: int) -> int | None:
        """C = max(min_capacity, ceil(capacity_factor * T * K / E)); at most T for expert choice;
        None if dropless."""
        if self.capacity_factor is None:
            return None
        # exact decimal arithmetic: 1.1 * 100 / 10 must give 11, not ceil(11.000000000000002)
        c = math.ceil(Fraction(str(self.capacity_factor)) * num_tokens * self.top_k
                      / self.num_experts)
        c = max(self.min_capacity, c)
        return min(c, num_tokens) if self.routing == "expert_choice" else c


@dataclass(frozen=True)
class MoEConfig:
    """An MoE layer: a router plus E SwiGLU experts of width F, optionally a shared expert.

    expert_path: "fused" (Triton grouped GEMMs reading tokens through the plan, combine weights in
    the epilogue: routerlib.kernels.experts), "batched" (dispatch, grouped GEMM over the
    expert-major buffer, combine), "loop" (one matmul per expert, readable) or "auto" (fused with
    backend="triton", batched with "torch"). backend: "torch" (the reference) or "triton" (the
    kernels).
    """

    hidden_size: int
    ffn_size: int
    router: RouterConfig
    shared_expert_size: int = 0
    expert_path: Literal["auto", "fused", "batched", "loop"] = "auto"
    backend: Backend = "torch"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEConfig.{name}={v!r}: must be an int >= 1")
        if not isinstance(self.shared_expert_size, int) or self.shared_expert_size < 0:
            raise ValueError(f"MoEConfig.shared_expert_size={self.shared_expert_size!r}: "
                             "must be an int >= 0")
        if self.expert_path not in ("auto", "fused", "batched", "loop"):
            raise ValueError(f"MoEConfig.expert_path={self.expert_path!r}: must be 'auto', "
                             "'fused', 'batched' or 'loop'")
        if self.backend not in _BACKENDS:
            raise ValueError(f"MoEConfig.backend={self.backend!r}: must be one of {_BACKENDS}")
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"MoEConfig.router must be a RouterConfig, got {type(self.router)}")
