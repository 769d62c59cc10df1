"""Load-balancing losses and the aux-loss-free bias update, in readable PyTorch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from routerlib.reference.gating import token_distribution as _probs


def expert_load(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: slots routed to each expert (before capacity)."""
    return torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)


def load_balancing_loss(scores: torch.Tensor, topk_ids: torch.Tensor, score_func: str = "softmax"
                        ) -> torch.Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e; equals 1 when routing is perfectly uniform.

    f_e: fraction of the T*K slots routed to e (no gradient); P_e: mean probability of e.
    scores: [T, E] fp32; topk_ids: [T, K].
    """
    T, E = scores.shape
    K = topk_ids.shape[1]
    f = expert_load(topk_ids, E).float() / max(T * K, 1)
    P = _probs(scores, score_func).sum(dim=0) / max(T, 1)  # T=0: a zero loss, not NaN
    return E * (f * P).sum()


def load_balancing_loss_from_stats(prob_sum: torch.Tensor, load: torch.Tensor, num_tokens: int,
                                   top_k: int) -> torch.Tensor:
    """The same loss from the fused statistics: prob_sum [E] (Selection.prob_sum) and load [E]."""
    E = prob_sum.shape[0]
    denom = max(num_tokens, 1)
    return E * ((load.float() / (denom * top_k)) * (prob_sum / denom)).sum()


def global_load_balancing_loss(prob_sum: torch.Tensor, load: torch.Tensor, num_tokens: int,
                               top_k: int, group: dist.ProcessGroup | None = None
                               ) -> torch.Tensor:
    """The Switch/GShard loss of the global batch: f_e and P_e over every rank's tokens.

    prob_sum [E] (this rank's Selection.prob_sum, differentiable), load [E] (this rank's slots
    per expert), num_tokens: this rank's T (ranks may differ). One all_reduce of [2E+1] fp64
    sums over `group` (default: the world) gives the global counts, prob sums and token count.
    Every rank returns the same value, the loss of the concatenated batch, and its gradient is
    that loss's gradient through this rank's own prob_sum (the other ranks' sums are constants
    here; their gradients arise on their ranks). DDP averages gradients over the R ranks, so a
    DDP step follows 1/R of the global loss's gradient: scale the coefficient by R to keep the
    single-process step. No host sync (the all_reduce is enqueued on the stream).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("global_load_balancing_loss needs torch.distributed initialised "
                           "(dist.init_process_group); use load_balancing_loss_from_stats for "
                           "one process")
    E = prob_sum.shape[0]
    if load.shape != (E,):
        raise ValueError(f"load must have shape ({E},) like prob_sum, got {tuple(load.shape)}")
    local = torch.cat([load.detach().double(), prob_sum.detach().double(),
                       prob_sum.new_full((1,), num_tokens, dtype=torch.float64)])  # [2E+1]
    total = local.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    T = total[2 * E].clamp(min=1.0)  # no tokens anywhere: a zero loss, not NaN
    f = (total[:E] / (T * top_k)).float()  # [E] no gradient
    others = (total[E:2 * E] - local[E:2 * E]).float()  # [E] the other ranks' prob sums
    P = (prob_sum + others) / T.float()  # [E] the gradient flows to this rank's sum only
    return E * (f * P).sum()


def sequence_load_balancing_loss(scores: torch.Tensor, topk_ids: torch.Tensor, seq_len: int,
                                 score_func: str = "softmax") -> torch.Tensor:
    """The loss above computed within each sequence and averaged (DeepSeek-V3's sequence-wise
    balance loss). Tokens are laid out [B, seq_len] flattened: T must be a multiple of seq_len."""
    T, E = scores.shape
    if seq_len < 1 or T % seq_len:
        raise ValueError(f"seq_len={seq_len} must be >= 1 and divide the token count T={T}")
    B, K = T // seq_len, topk_ids.shape[1]
    ids = topk_ids.long().reshape(B, seq_len * K)
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=torch.float32))  # [B, E]
    f = counts / (seq_len * K)
    P = _probs(scores, score_func).reshape(B, seq_len, E).mean(dim=1)  # [B, E]
    return (E * (f * P).sum(dim=1)).sum() / max(B, 1)  # B=0: a zero loss, not NaN


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3 aux-loss-free balancing: b_e += rate * sign(mean_load - load_e).
    Overloaded experts become less attractive, underloaded ones more. Returns the new bias."""
    load = load.float()
    return bias + rate * torch.sign(load.mean() - load).to(bias.dtype)


def update_expert_bias_(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """update_expert_bias in place: device ops only (no .item(), no branch on a value), so it
    runs inside a captured CUDA graph, the load read from the tensor each replay. bias [E] fp32,
    load [E] any dtype (e.g. RoutingPlan.expert_counts). Returns bias."""
    load = load.float()
    return bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=rate)
