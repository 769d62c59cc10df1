"""Scores and selection in readable PyTorch: the contract every kernel is tested against.

Token choice: scores -> (optional) group limit -> top-K per token -> weights.
Expert choice: softmax scores -> each expert picks its top-C tokens.
Ties: the lower expert index (token choice) or the lower token index (expert choice) wins, always:
a stable descending sort keeps equal keys in index order.
"""

from __future__ import annotations

import torch

from routerlib.config import RouterConfig
from routerlib.types import Selection

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Keeps renormalisation finite when every selected sigmoid score underflows to 0.
RENORM_EPS = 1e-20


def _capturing(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_logits(logits: torch.Tensor, cfg: RouterConfig) -> None:
    """Raise a ValueError/TypeError naming the problem unless logits are [T, E] finite floats."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    if logits.shape[1] != cfg.num_experts:
        raise ValueError(f"logits has {logits.shape[1]} experts (shape {tuple(logits.shape)}) but "
                         f"num_experts={cfg.num_experts}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits dtype must be one of fp16/bf16/fp32/fp64, got {logits.dtype}")
    if logits.device.type == "meta":
        raise ValueError("logits are on the meta device (shapes only, no values): routing needs "
                         "real values; move them to 'cpu' or 'cuda' (e.g. module.to_empty)")
    if cfg.check_finite and logits.numel() and not _capturing(logits):
        if logits.device.type == "cpu":  # no device to wait for: check now, name the entry
            if not bool(torch.isfinite(logits).all()):
                bad = (~torch.isfinite(logits)).nonzero()[0].tolist()
                raise ValueError(f"logits contain NaN or inf (first at [token, expert]={bad})")
        else:
            _finite_flag(logits.device).note(logits)


class _FiniteFlag:
    """The check_finite rule on a GPU, without a host sync: each call ANDs `isfinite(logits).all()`
    into a sticky device flag and copies it to pinned host memory behind an event. A later call
    on the device (or raise_if_nonfinite) reads the host copy once the event has passed, and raises
    there: bad logits are reported one or more calls late, never missed, and never waited for."""

    def __init__(self, device: torch.device) -> None:
        self.ok = torch.ones((), dtype=torch.bool, device=device)  # sticky: false once bad
        self.host = torch.ones((), dtype=torch.bool, pin_memory=device.type == "cuda")
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self.pending = False

    def raise_if_seen(self, wait: bool) -> None:
        if not self.pending:
            return
        if self.event is not None:
            if wait:
                self.event.synchronize()
            elif not self.event.query():
                return  # not reached yet: a later call reads it
        self.pending = False
        if not bool(self.host):
            self.ok.fill_(True)
            self.host.fill_(True)
            raise ValueError("logits contain NaN or inf: an earlier route call on "
                             f"{self.ok.device} received them (check_finite reports them "
                             "without a host sync, at a later call; set check_finite=False to "
                             "route them anyway)")

    def note(self, logits: torch.Tensor) -> None:
        self.raise_if_seen(wait=False)
        self.ok.logical_and_(torch.isfinite(logits).all())
        self.host.copy_(self.ok, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = True


_finite_flags: dict[torch.device, _FiniteFlag] = {}


def _finite_flag(device: torch.device) -> _FiniteFlag:
    flag = _finite_flags.get(device)
    if flag is None:
        flag = _finite_flags[device] = _FiniteFlag(device)
    return flag


def raise_if_nonfinite(device: torch.device | str | None = None) -> None:
    """Wait for the check_finite flags of the GPU route calls made so far (every device, or
    one) and raise a ValueError if any of them received NaN or inf logits."""
    dev = None if device is None else torch.device(device)
    for d, flag in list(_finite_flags.items()):
        if dev is None or (d.type == dev.type and dev.index in (None, d.index)):
            flag.raise_if_seen(wait=True)


def check_bias(bias: torch.Tensor | None, logits: torch.Tensor, cfg: RouterConfig) -> None:
    if bias is None:
        if cfg.expert_bias:
            raise ValueError("RouterConfig.expert_bias=True but no bias tensor was given")
        return
    if bias.shape != (cfg.num_experts,):
        raise ValueError(f"expert bias must have shape ({cfg.num_experts},), got "
                         f"{tuple(bias.shape)}")
    if bias.device != logits.device:
        raise ValueError(f"expert bias is on {bias.device} but logits are on {logits.device}")


def stable_topk(x: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along dim with ties broken towards the lower index (torch.topk promises no order)."""
    values, indices = torch.sort(x, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def group_limit(sel: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Mask (to -inf) the experts outside the best topk_groups of n_groups contiguous groups.

    sel: [T, E] selection scores. A group's score is its max ("max") or the sum of its two best
    ("top2_sum", one if the group has a single expert).
    """
    if cfg.n_groups == 1:
        return sel
    T, E = sel.shape
    grouped = sel.view(T, cfg.n_groups, E // cfg.n_groups)  # [T, G, E/G]
    if cfg.group_score == "max":
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = stable_topk(grouped, min(2, E // cfg.n_groups))[0].sum(dim=-1)  # [T, G]
    _, keep = stable_topk(group_scores, cfg.topk_groups)  # [T, topk_groups]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    expert_mask = group_mask.repeat_interleave(E // cfg.n_groups, dim=1)  # [T, E]
    return sel.masked_fill(~expert_mask, float("-inf"))


def score(logits: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """[T, E] fp32 scores (softmax or sigmoid of the logits): what the weights and losses use."""
    logits = logits.float()
    return logits.softmax(dim=-1) if cfg.score_func == "softmax" else logits.sigmoid()


def token_distribution(scores: torch.Tensor, score_func: str) -> torch.Tensor:
    """Each token's distribution over experts: softmax scores as they are, sigmoid scores
    normalised to sum to one (DeepSeek-V3's balance loss)."""
    if score_func == "softmax":
        return scores
    return scores / (scores.sum(dim=-1, keepdim=True) + RENORM_EPS)


def loss_stats(logits: torch.Tensor, scores: torch.Tensor, cfg: RouterConfig
               ) -> dict[str, torch.Tensor]:
    """The two sums the losses need, over tokens: prob_sum [E] and zsq_sum []."""
    return {
        "prob_sum": token_distribution(scores, cfg.score_func).sum(dim=0),
        "zsq_sum": torch.logsumexp(logits.float(), dim=-1).square().sum(),
    }


def selection_key(logits: torch.Tensor, scores: torch.Tensor, cfg: RouterConfig,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """[T, E] fp32 key that top-K ranks. Softmax and sigmoid are monotone, so without a bias or
    groups the raw logits give the same order with no rounding (two logits whose scores round to
    the same float stay ordered). With a bias or groups the key is scores (+ bias), as in
    DeepSeek-V3; softmax_after_topk always ranks logits (+ bias)."""
    if cfg.softmax_after_topk or (bias is None and cfg.n_groups == 1):
        key = logits.float()
    else:
        key = scores
    return key if bias is None else key + bias.float()


def select_token_choice(logits: torch.Tensor, cfg: RouterConfig,
                        bias: torch.Tensor | None = None) -> Selection:
    """Each token picks its K experts. logits: [T, E]; bias: [E] or None (selection only)."""
    scores = score(logits, cfg)  # [T, E] fp32
    sel = selection_key(logits, scores, cfg, bias)
    sel = group_limit(sel, cfg)
    _, ids = stable_topk(sel, cfg.top_k)  # [T, K]
    if cfg.softmax_after_topk:
        weights = logits.float().gather(1, ids).softmax(dim=-1)
    else:
        weights = scores.gather(1, ids)
        if cfg.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    weights = weights * cfg.routed_scaling_factor
    return Selection(topk_ids=ids.to(torch.int32), topk_weights=weights, scores=scores,
                     **loss_stats(logits, scores, cfg))


def select_expert_choice(logits: torch.Tensor, cfg: RouterConfig,
                         bias: torch.Tensor | None = None) -> Selection:
    """Each expert picks its C best tokens (Zhou et al. 2022). Slots are all (token, expert) pairs:
    topk_ids[t, e] = e, and expert_rank[t, e] is t's place in e's pick list or -1."""
    T, E = logits.shape
    C = cfg.capacity(T)
    scores = score(logits, cfg)  # [T, E]
    sel = scores if bias is None else scores + bias.float()
    _, picked = stable_topk(sel.t(), C)  # [E, C] token indices, best first, ties to lower token
    rank = torch.full((T, E), -1, dtype=torch.int32, device=logits.device)
    experts = torch.arange(E, device=logits.device).unsqueeze(1).expand(E, C)
    ranks = torch.arange(C, dtype=torch.int32, device=logits.device).expand(E, C)
    rank[picked, experts] = ranks
    ids = torch.arange(E, dtype=torch.int32, device=logits.device).expand(T, E).contiguous()
    weights = scores * cfg.routed_scaling_factor
    return Selection(topk_ids=ids, topk_weights=weights, scores=scores, expert_rank=rank,
                     **loss_stats(logits, scores, cfg))


def select(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None) -> Selection:
    check_logits(logits, cfg)
    check_bias(bias, logits, cfg)
    if cfg.routing == "expert_choice":
        return select_expert_choice(logits, cfg, bias)
    return select_token_choice(logits, cfg, bias)


def input_jitter(x: torch.Tensor, eps: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Multiply the router input by U(1-eps, 1+eps) elementwise (Switch Transformer)."""
    if eps == 0.0:
        return x
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return x * (1.0 - eps + 2.0 * eps * u).to(x.dtype)


def logit_noise(logits: torch.Tensor, std: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Add N(0, std^2) to the logits (noisy gating, training only)."""
    if std == 0.0:
        return logits
    n = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    return logits + (std * n).to(logits.dtype)
