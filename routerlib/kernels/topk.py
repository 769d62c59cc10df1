"""Fused score + top-K for token-choice routing: one Triton pass over the logits (plus a tiny
fixed-order reduction of the loss sums), its backward, and a torch.library custom op
("routerlib::fused_topk") that torch.compile and CUDA graphs take whole.

    fused_topk(logits [T, E], cfg, bias [E] | None) -> Selection
        topk_ids [T, K] int32, topk_weights [T, K] fp32, prob_sum [E] fp32, zsq_sum [] fp32,
        scores=None (not materialised: saves T*E*4 bytes written).

It computes routerlib.reference.gating.select_token_choice: the same ids (same selection key,
ties to the lower expert index) and the same weights and loss sums up to fp32 rounding. Where the
key is the scores (a bias or groups), two experts whose scores differ by an ulp may rank differently
from torch, as the exp differs by an ulp; exact ties (equal logits) always match.

Memory traffic per call: reads T*E*s (s = bytes per logit), writes T*K*8 + P*(E+1)*4 with P at
most 4 programs per SM (a persistent grid); a second small kernel sums the [P, E+1] partials in a
fixed order, so the loss sums are deterministic (no float atomics). Two launches in all.
Backward: reads T*E*s + T*K*8, writes T*E*s.
"""

from __future__ import annotations

import functools

import torch
import triton

from routerlib.config import RouterConfig
from routerlib.kernels._topk_kernels import (
    _topk_bwd_kernel,
    _topk_fwd_kernel,
    _topk_stats_kernel,
    next_pow2,
    topk_config,
)
from routerlib.types import Selection

__all__ = ["fused_topk", "fused_topk_forward", "fused_topk_backward"]

Tensor = torch.Tensor


@functools.cache
def _num_sms(device: torch.device) -> int:
    """SMs of a CUDA device (a host query, no sync). On the interpreter: no cap on programs."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else
                         torch.cuda.current_device())
    return 1 << 30


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def fused_topk_forward(
    logits: Tensor,  # [T, E]
    bias: Tensor | None,  # [E] or None
    top_k: int,
    score_func: str = "softmax",
    softmax_after_topk: bool = False,
    renormalize: bool = False,
    routed_scaling_factor: float = 1.0,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    out: tuple[Tensor, Tensor] | None = None,
    max_programs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel: (topk_ids [T, K] int32, topk_weights [T, K] fp32,
    prob_sum [E] fp32, zsq_sum [] fp32). No autograd (see fused_topk).

    out: optional preallocated (topk_ids, topk_weights) to write into (tests poison them).
    max_programs: bound on the persistent grid (tests use it to give a program several tiles).
    """
    assert logits.dim() == 2 and logits.stride(1) == 1, (tuple(logits.shape), logits.stride())
    T, E = logits.shape
    K = top_k
    assert 1 <= K <= E, f"top_k={K} must be in [1, E={E}]"
    assert n_groups >= 1 and E % n_groups == 0, f"n_groups={n_groups} must divide E={E}"
    dev = logits.device
    if out is None:
        ids = torch.empty((T, K), dtype=torch.int32, device=dev)
        weights = torch.empty((T, K), dtype=torch.float32, device=dev)
    else:
        ids, weights = out
        assert ids.shape == (T, K) and ids.dtype == torch.int32 and ids.is_contiguous()
        assert weights.shape == (T, K) and weights.dtype == torch.float32
        assert weights.is_contiguous()
    if bias is not None:
        assert bias.shape == (E,) and bias.is_contiguous(), tuple(bias.shape)
    if T == 0:
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        return ids, weights, torch.zeros(E, dtype=torch.float32, device=dev), zero

    block_t, num_warps, programs_per_sm = topk_config(E, T)
    num_tiles = triton.cdiv(T, block_t)
    P = min(num_tiles, max_programs or programs_per_sm * _num_sms(dev))
    part = torch.empty((P, E + 1), dtype=torch.float32, device=dev)
    key_logits = softmax_after_topk or (bias is None and n_groups == 1)
    _topk_fwd_kernel[(P,)](
        logits, bias if bias is not None else logits, ids, weights, part,
        T, logits.stride(0), float(routed_scaling_factor),
        E=E, K=K, BLOCK_T=block_t, BLOCK_E=max(2, next_pow2(E)),
        SIGMOID=score_func == "sigmoid", SOFTMAX_AFTER=softmax_after_topk,
        RENORM=renormalize, HAS_BIAS=bias is not None, KEY_LOGITS=key_logits,
        N_GROUPS=n_groups, GROUP_SIZE=E // n_groups, TOPK_GROUPS=topk_groups,
        TOP2_SUM=group_score == "top2_sum" and E // n_groups > 1,
        BLOCK_G=max(2, next_pow2(n_groups)),
        num_warps=num_warps,
    )
    prob_sum = torch.empty((E,), dtype=torch.float32, device=dev)
    zsq_sum = torch.empty((), dtype=torch.float32, device=dev)
    block_p = min(1024, max(2, next_pow2(P)))
    block_c = max(2, min(next_pow2(E + 1), 8192 // block_p))
    _topk_stats_kernel[(triton.cdiv(E + 1, block_c),)](
        part, prob_sum, zsq_sum, P, E=E, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return ids, weights, prob_sum, zsq_sum


def fused_topk_backward(
    logits: Tensor,  # [T, E]
    topk_ids: Tensor,  # [T, K] int32
    grad_weights: Tensor | None,  # [T, K]
    grad_prob_sum: Tensor | None,  # [E]
    grad_zsq_sum: Tensor | None,  # []
    score_func: str = "softmax",
    softmax_after_topk: bool = False,
    renormalize: bool = False,
    routed_scaling_factor: float = 1.0,
) -> Tensor:
    """grad_logits [T, E] in the logits dtype (accumulated in fp32); None grads count as zero."""
    assert logits.dim() == 2 and logits.stride(1) == 1, (tuple(logits.shape), logits.stride())
    T, E = logits.shape
    K = topk_ids.shape[1]
    assert topk_ids.shape == (T, K) and topk_ids.dtype == torch.int32
    grad = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad
    topk_ids = topk_ids.contiguous()
    # upstream grads may be expanded (stride 0) or in another dtype: make them plain fp32
    gw = None if grad_weights is None else grad_weights.float().contiguous()
    gp = None if grad_prob_sum is None else grad_prob_sum.float().contiguous()
    gz = None if grad_zsq_sum is None else grad_zsq_sum.float().reshape(())
    block_t, num_warps, _ = topk_config(E)
    _topk_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits, topk_ids, gw if gw is not None else logits, gp if gp is not None else logits,
        gz if gz is not None else logits, grad, T, logits.stride(0), float(routed_scaling_factor),
        E=E, K=K, BLOCK_T=block_t, BLOCK_E=max(2, next_pow2(E)),
        SIGMOID=score_func == "sigmoid", SOFTMAX_AFTER=softmax_after_topk, RENORM=renormalize,
        HAS_GW=gw is not None, HAS_GP=gp is not None, HAS_GZ=gz is not None,
        num_warps=num_warps,
    )
    return grad


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: config travels as plain ints/floats/bools/strings. No host sync and
# no data-dependent shape, so torch.compile keeps them in one graph and CUDA graphs capture them.

@torch.library.custom_op("routerlib::fused_topk", mutates_args=())
def _fused_topk_op(
    logits: Tensor, bias: Tensor | None, top_k: int, score_func: str,
    softmax_after_topk: bool, renormalize: bool, routed_scaling_factor: float, n_groups: int,
    topk_groups: int, group_score: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return fused_topk_forward(logits, bias, top_k, score_func, softmax_after_topk, renormalize,
                              routed_scaling_factor, n_groups, topk_groups, group_score)


@_fused_topk_op.register_fake
def _fused_topk_fake(logits, bias, top_k, score_func, softmax_after_topk, renormalize,
                     routed_scaling_factor, n_groups, topk_groups, group_score):
    T, E = logits.shape
    return (logits.new_empty((T, top_k), dtype=torch.int32),
            logits.new_empty((T, top_k), dtype=torch.float32),
            logits.new_empty((E,), dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("routerlib::fused_topk_backward", mutates_args=())
def _fused_topk_backward_op(
    logits: Tensor, topk_ids: Tensor, grad_weights: Tensor | None,
    grad_prob_sum: Tensor | None, grad_zsq_sum: Tensor | None, score_func: str,
    softmax_after_topk: bool, renormalize: bool, routed_scaling_factor: float,
) -> Tensor:
    return fused_topk_backward(logits, topk_ids, grad_weights, grad_prob_sum, grad_zsq_sum,
                               score_func, softmax_after_topk, renormalize,
                               routed_scaling_factor)


@_fused_topk_backward_op.register_fake
def _fused_topk_backward_fake(logits, topk_ids, grad_weights, grad_prob_sum, grad_zsq_sum,
                              score_func, softmax_after_topk, renormalize, routed_scaling_factor):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, _bias, _k, score_func, softmax_after, renorm, scale, *_ = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.cfg = (score_func, softmax_after, renorm, scale)


def _backward(ctx, _grad_ids, grad_weights, grad_prob_sum, grad_zsq_sum):
    logits, topk_ids = ctx.saved_tensors
    grad = torch.ops.routerlib.fused_topk_backward(logits, topk_ids, grad_weights, grad_prob_sum,
                                                   grad_zsq_sum, *ctx.cfg)
    return (grad,) + (None,) * 9  # the bias and the config get no gradient


_fused_topk_op.register_autograd(_backward, setup_context=_setup_context)


def fused_topk(logits: Tensor, cfg: RouterConfig, bias: Tensor | None = None) -> Selection:
    """Token-choice scores + top-K + weights + loss sums in one launch (differentiable in logits).

    logits: [T, E] fp32/bf16/fp16 (validated by the caller, routerlib.kernels.route);
    bias: [E] expert bias, for selection only. Returns a Selection with scores=None.
    """
    if cfg.routing != "token_choice":
        raise ValueError(f"fused_topk handles routing='token_choice' only, got {cfg.routing!r}")
    if logits.dim() != 2 or logits.shape[1] != cfg.num_experts:
        raise ValueError(f"logits must be [T, {cfg.num_experts}], got {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    args = (logits, bias, cfg.top_k, cfg.score_func, cfg.softmax_after_topk, cfg.renormalize,
            float(cfg.routed_scaling_factor), cfg.n_groups, cfg.topk_groups, cfg.group_score)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled()
                                                  and logits.requires_grad):
        # inference from Python: launch directly, skipping the custom-op dispatcher (tens of us
        # of host time at decode sizes); compile and autograd go through the op below
        ids, weights, prob_sum, zsq_sum = fused_topk_forward(*args)
        return Selection(topk_ids=ids, topk_weights=weights, scores=None, prob_sum=prob_sum,
                         zsq_sum=zsq_sum)
    ids, weights, prob_sum, zsq_sum = torch.ops.routerlib.fused_topk(
        logits, bias, cfg.top_k, cfg.score_func, cfg.softmax_after_topk, cfg.renormalize,
        float(cfg.routed_scaling_factor), cfg.n_groups, cfg.topk_groups, cfg.group_score)
    return Selection(topk_ids=ids, topk_weights=weights, scores=None, prob_sum=prob_sum,
                     zsq_sum=zsq_sum)
