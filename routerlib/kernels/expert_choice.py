"""Expert-choice routing in Triton (Zhou et al. 2022): each expert takes its C best tokens.

    expert_choice(logits [T, E], cfg, bias [E] | None) -> (Selection, RoutingPlan)

It computes routerlib.reference.gating.select_expert_choice and the capacity plan that
reference.build_plan makes of it: slots are all (token, expert) pairs (S = E), topk_ids[t, e] = e,
topk_weights = scores * routed_scaling_factor, expert_rank[t, e] = t's place in e's pick list
(best key first, ties to the lower token) or -1, and the E x C capacity layout. The picks are the
stable top-C of the kernel's own fp32 scores (+ bias): exact ties (equal logits rows, equal keys)
break as the reference does; two keys that the reference and the kernel round an ulp apart may
order differently, as with any two softmax implementations. topk_ids is a broadcast view of
arange(E) (stride 0 over tokens: no T*E*4 bytes written); Selection.scores is returned too.

No sort over the T tokens: a radix select per expert (4 digit passes over uint32 keys, split over
token chunks), a stable compaction of the C picks, and a sort of those E*C picks only (torch.sort
of [E, C] int64). Launches: scores (+ loss partials), their sum, 4 digit passes, the compaction,
the sort, the place. No host sync and no data-dependent shape: CUDA graphs capture it and
torch.compile takes the custom op whole. Backward: one pass, reads T*E*s + T*E*4, writes T*E*s.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import torch
import triton

from routerlib.config import RouterConfig
from routerlib.kernels._expert_choice_kernels import (
    LEVELS,
    NUM_BINS,
    _ec_bwd_kernel,
    _ec_compact_kernel,
    _ec_hist_kernel,
    _ec_place_kernel,
    _ec_score_kernel,
    split_config,
)
from routerlib.kernels._topk_kernels import _topk_stats_kernel, next_pow2, topk_config
from routerlib.types import RoutingPlan, Selection

__all__ = ["expert_choice", "expert_choice_forward", "expert_choice_backward"]

Tensor = torch.Tensor

_BLOCK = 1024  # tokens a step of a digit pass / the compaction
_PLACE_BLOCK = 256


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs a digit pass aims for: 4 per SM on a GPU; on the interpreter one per expert."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * torch.cuda.get_device_properties(index).multi_processor_count
    return 1


def expert_choice_forward(
    logits: Tensor,  # [T, E]
    bias: Tensor | None,  # [E] or None
    capacity: int,
    score_func: str = "softmax",
    num_splits: int | None = None,
    block: int = _BLOCK,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernels: (scores [T, E] fp32, expert_rank [T, E] int32,
    slot_to_row [T, E] int32, row_to_slot [E*C] int32, prob_sum [E] fp32, zsq_sum [] fp32).
    No autograd (see expert_choice). num_splits / block: token chunks per expert and tokens per
    step of the select (tests use them to cross chunk and step borders at small T)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, (tuple(logits.shape), logits.stride())
    T, E = logits.shape
    C = capacity
    assert 0 <= C <= T and (C >= 1 or T == 0), f"capacity={C} must be in [1, T={T}]"
    dev = logits.device
    scores = torch.empty((T, E), dtype=torch.float32, device=dev)
    rank = torch.empty((T, E), dtype=torch.int32, device=dev)
    slot_to_row = torch.empty((T, E), dtype=torch.int32, device=dev)
    row_to_slot = torch.empty((E * C,), dtype=torch.int32, device=dev)
    prob_sum = torch.zeros((E,), dtype=torch.float32, device=dev)
    zsq_sum = torch.zeros((), dtype=torch.float32, device=dev)
    if T == 0:
        return scores, rank, slot_to_row, row_to_slot, prob_sum, zsq_sum
    if bias is not None:
        assert bias.shape == (E,) and bias.is_contiguous(), tuple(bias.shape)

    block_t, num_warps, programs_per_sm = topk_config(E, T)
    block_e = max(2, next_pow2(E))
    P = min(triton.cdiv(T, block_t), max(1, _programs(dev) * programs_per_sm // 4))
    keys = torch.empty((E, T), dtype=torch.int32, device=dev)
    part = torch.empty((P, E + 1), dtype=torch.float32, device=dev)
    _ec_score_kernel[(P,)](
        logits, bias if bias is not None else logits, scores, keys, rank, slot_to_row, part,
        T, logits.stride(0), E=E, BLOCK_T=block_t, BLOCK_E=block_e,
        SIGMOID=score_func == "sigmoid", HAS_BIAS=bias is not None, num_warps=num_warps)
    block_p = min(1024, max(2, next_pow2(P)))
    block_c = max(2, min(next_pow2(E + 1), 8192 // block_p))
    _topk_stats_kernel[(triton.cdiv(E + 1, block_c),)](
        part, prob_sum, zsq_sum, P, E=E, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)

    if num_splits is None:
        nsplit, chunk = split_config(T, E, _programs(dev), block)
    else:
        chunk = triton.cdiv(triton.cdiv(T, num_splits), block) * block
        nsplit = triton.cdiv(T, chunk)
    block_s = max(2, next_pow2(nsplit))
    hist = torch.empty((LEVELS, E, nsplit, NUM_BINS), dtype=torch.int32, device=dev)
    state = torch.empty((LEVELS, E, 2), dtype=torch.int32, device=dev)
    for level in range(LEVELS):
        _ec_hist_kernel[(E, nsplit)](keys, hist, state, T, C, chunk, nsplit, E=E, LEVEL=level,
                                     BLOCK=block, BLOCK_S=block_s, NUM_BINS=NUM_BINS,
                                     num_warps=4)
    picks = torch.empty((E, C), dtype=torch.int64, device=dev)
    _ec_compact_kernel[(E, nsplit)](keys, hist, state, picks, T, C, chunk, nsplit, E=E,
                                    BLOCK=block, BLOCK_S=block_s, NUM_BINS=NUM_BINS,
                                    num_warps=4)
    # (key desc, token asc): the packed keys are unique, so any sort order is the stable one
    picks = torch.sort(picks, dim=1, descending=True).values
    _ec_place_kernel[(E, triton.cdiv(C, _PLACE_BLOCK))](
        picks, rank, slot_to_row, row_to_slot, T, C, E=E, BLOCK=_PLACE_BLOCK, num_warps=4)
    return scores, rank, slot_to_row, row_to_slot, prob_sum, zsq_sum


def expert_choice_backward(
    logits: Tensor,  # [T, E]
    grad_scores: Tensor | None,  # [T, E]
    grad_prob_sum: Tensor | None,  # [E]
    grad_zsq_sum: Tensor | None,  # []
    score_func: str = "softmax",
) -> Tensor:
    """grad_logits [T, E] in the logits dtype (accumulated in fp32); None grads count as zero."""
    assert logits.dim() == 2 and logits.stride(1) == 1, (tuple(logits.shape), logits.stride())
    T, E = logits.shape
    grad = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad
    gs = None if grad_scores is None else grad_scores.float().contiguous()
    gp = None if grad_prob_sum is None else grad_prob_sum.float().contiguous()
    gz = None if grad_zsq_sum is None else grad_zsq_sum.float().reshape(())
    block_t, num_warps, _ = topk_config(E)
    _ec_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits, gs if gs is not None else logits, gp if gp is not None else logits,
        gz if gz is not None else logits, grad, T, logits.stride(0), E=E, BLOCK_T=block_t,
        BLOCK_E=max(2, next_pow2(E)), SIGMOID=score_func == "sigmoid", HAS_GS=gs is not None,
        HAS_GP=gp is not None, HAS_GZ=gz is not None, num_warps=num_warps)
    return grad


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (no host sync, shapes from T, E, C only)

@torch.library.custom_op("routerlib::expert_choice", mutates_args=())
def _expert_choice_op(logits: Tensor, bias: Tensor | None, capacity: int, score_func: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return expert_choice_forward(logits, bias, capacity, score_func)


@_expert_choice_op.register_fake
def _expert_choice_fake(logits, bias, capacity, score_func):
    T, E = logits.shape
    return (logits.new_empty((T, E), dtype=torch.float32),
            logits.new_empty((T, E), dtype=torch.int32),
            logits.new_empty((T, E), dtype=torch.int32),
            logits.new_empty((E * capacity,), dtype=torch.int32),
            logits.new_empty((E,), dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("routerlib::expert_choice_backward", mutates_args=())
def _expert_choice_backward_op(logits: Tensor, grad_scores: Tensor | None,
                               grad_prob_sum: Tensor | None, grad_zsq_sum: Tensor | None,
                               score_func: str) -> Tensor:
    return expert_choice_backward(logits, grad_scores, grad_prob_sum, grad_zsq_sum, score_func)


@_expert_choice_backward_op.register_fake
def _expert_choice_backward_fake(logits, grad_scores, grad_prob_sum, grad_zsq_sum, score_func):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, _bias, _capacity, score_func = inputs
    ctx.save_for_backward(logits)
    ctx.score_func = score_func


def _backward(ctx, grad_scores, _g_rank, _g_slot, _g_row, grad_prob_sum, grad_zsq_sum):
    (logits,) = ctx.saved_tensors
    grad = torch.ops.routerlib.expert_choice_backward(logits, grad_scores, grad_prob_sum,
                                                      grad_zsq_sum, ctx.score_func)
    return grad, None, None, None


_expert_choice_op.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _capacity_ratio(cfg: RouterConfig) -> tuple[int, int]:
    """capacity_factor * top_k / num_experts as an exact fraction (num, den): a constant to
    torch.compile, which cannot trace Fraction."""
    r = Fraction(str(cfg.capacity_factor)) * cfg.top_k / cfg.num_experts
    return r.numerator, r.denominator


def capacity(cfg: RouterConfig, num_tokens: int | torch.SymInt) -> int | torch.SymInt:
    """cfg.capacity(T) in integer arithmetic, so that T may be symbolic (torch.compile with
    dynamic shapes): min(T, max(min_capacity, ceil(T * num / den)))."""
    num, den = _capacity_ratio(cfg)
    c = (num_tokens * num + den - 1) // den
    return torch.sym_min(torch.sym_max(c, cfg.min_capacity), num_tokens)


def expert_choice(logits: Tensor, cfg: RouterConfig, bias: Tensor | None = None
                  ) -> tuple[Selection, RoutingPlan]:
    """Expert-choice selection and its E x C capacity plan (differentiable in logits through
    topk_weights, scores, prob_sum and zsq_sum).

    logits: [T, E] fp32/bf16/fp16 (validated by the caller, routerlib.kernels.route);
    bias: [E] selection bias (scores + bias rank the tokens; the weights stay unbiased)."""
    if cfg.routing != "expert_choice":
        raise ValueError(f"expert_choice handles routing='expert_choice' only, got "
                         f"{cfg.routing!r}")
    if logits.dim() != 2 or logits.shape[1] != cfg.num_experts:
        raise ValueError(f"logits must be [T, {cfg.num_experts}], got {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    T, E = logits.shape
    C = capacity(cfg, T)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled()
                                                  and logits.requires_grad):
        out = expert_choice_forward(logits, bias, C, cfg.score_func)
    else:
        out = torch.ops.routerlib.expert_choice(logits, bias, C, cfg.score_func)
    scores, rank, slot_to_row, row_to_slot, prob_sum, zsq_sum = out
    scale = float(cfg.routed_scaling_factor)
    weights = scores if scale == 1.0 else scores * scale
    dev = logits.device
    ids = torch.arange(E, dtype=torch.int32, device=dev).expand(T, E)  # [T, E] a view: no bytes
    sel = Selection(topk_ids=ids, topk_weights=weights, scores=scores, prob_sum=prob_sum,
                    zsq_sum=zsq_sum, expert_rank=rank)
    counts = torch.full((E,), C, dtype=torch.int32, device=dev)  # every expert fills its C rows
    offsets = torch.arange(E + 1, dtype=torch.int32, device=dev) * C  # [E+1]
    plan = RoutingPlan(expert_counts=counts, kept_counts=counts, expert_offsets=offsets,
                       slot_to_row=slot_to_row, row_to_slot=row_to_slot, capacity=C,
                       num_rows=E * C)
    return sel, plan
