"""Triton kernels of the fused score + top-K op (private: the launchers live in topk.py).

Forward, one launch: each program walks token tiles of [BLOCK_T, BLOCK_E] (BLOCK_E = next power
of two >= E, padding masked), computes the scores in registers, picks the K best experts with K
max-reductions over a packed int64 key, writes the K ids and weights, and accumulates the loss
statistics of its tokens into one row of a [P, E+1] buffer; a second small kernel sums its columns
in a fixed order (deterministic: no float atomics).
Bytes: reads T*E*s (s = bytes per logit), writes T*K*8 + P*(E+1)*4.

Backward: recomputes the scores from the logits and writes grad_logits [T, E] in the logits dtype.
Reads T*E*s + T*K*8, writes T*E*s.

Packed key: order-preserving int32 of the fp32 key in the high half, (E-1-expert) in the low half,
so one tl.max returns the best key and, among equal keys, the lowest expert index (the reference's
stable sort). -0.0 is folded into +0.0 first because torch.sort ranks them as equal.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from routerlib.kernels.common import div_rn, next_pow2

# Below every packed key of a non-NaN float (the packed -inf is about -2^63 + 2^55): marks padding
# experts and experts already taken.
_TAKEN = tl.constexpr(-(2**63) + 1)


def topk_config(num_experts: int, num_tokens: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_T, num_warps, programs_per_sm) for E experts (and T tokens, when known): about 2048
    tile elements per program,
    so fewer tokens per program when E is large; the persistent grid is capped at programs_per_sm
    programs per SM (fewer programs: a smaller [P, E] partial-sum buffer). The environment
    variable ROUTERLIB_TOPK_CONFIG="BLOCK_T,num_warps[,programs_per_sm]" pins one. No runtime
    autotuning: a first call must not benchmark (CUDA graph capture, torch.compile) and the
    interpreter would gain nothing from it."""
    block_e = max(2, next_pow2(num_experts))
    block_t = max(1, min(128, 2048 // block_e))
    if num_tokens is not None:  # few tokens: smaller tiles, so that more SMs share them
        block_t = min(block_t, max(1, next_pow2(-(-num_tokens // 16))))
    # Measured on an H100 (results/h100/tune.csv, targets*.json): smaller tiles for few tokens
    # win at decode (T=64: 8.8 us with BLOCK_T=4 vs 10.4 with 16; the decode path 26.7 -> 25.2
    # us). 2 warps won the bf16 top-K-alone sweep at T=16384 (26.6 vs 30.8 us) but lost inside
    # the fp32 route of the targets run (58.3 vs 49.4 us), so 4 warps stay; 8 was never faster;
    # programs_per_sm moved the time by < 1 us.
    num_warps = 4
    programs_per_sm = 4
    pinned = os.environ.get("ROUTERLIB_TOPK_CONFIG")
    if pinned:
        try:
            values = [int(v) for v in pinned.split(",")]
            block_t, num_warps = values[:2]
            programs_per_sm = values[2] if len(values) > 2 else programs_per_sm
        except ValueError:
            raise ValueError(f"ROUTERLIB_TOPK_CONFIG={pinned!r}: expected "
                             "'BLOCK_T,num_warps[,programs_per_sm]'") from None
        if (block_t < 1 or block_t & (block_t - 1) or num_warps not in (1, 2, 4, 8, 16)
                or programs_per_sm < 1):
            raise ValueError(f"ROUTERLIB_TOPK_CONFIG={pinned!r}: BLOCK_T must be a power of two, "
                             "num_warps one of 1, 2, 4, 8, 16, programs_per_sm >= 1")
    return block_t, num_warps, programs_per_sm


@triton.jit
def _packed_key(key, rev):
    """int64 key whose max is the largest fp32 `key`, ties to the largest `rev` (= E-1-index)."""
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 -> +0.0: both zeros tie, as in torch.sort
    bits = key.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    return (bits.to(tl.int64) << 32) | rev.to(tl.int64)


@triton.jit
def _group_limit(key, cols, BLOCK_T: tl.constexpr, N_GROUPS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP2_SUM: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """Set to -inf the keys outside the TOPK_GROUPS best of N_GROUPS contiguous expert groups.
    key: [BLOCK_T, BLOCK_E] fp32; a group scores its max, or the sum of its two best keys."""
    grp = cols // GROUP_SIZE  # [BLOCK_E] group of each expert (>= N_GROUPS on padding)
    gcols = tl.arange(0, BLOCK_G)
    gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
    for g in tl.static_range(N_GROUPS):
        kg = tl.where((grp == g)[None, :], key, float("-inf"))
        best = tl.max(kg, axis=1)
        if TOP2_SUM:
            # second best counts a repeated maximum once more, as a sort would
            n_best = tl.sum((kg == best[:, None]).to(tl.int32), axis=1)
            rest = tl.max(tl.where(kg < best[:, None], kg, float("-inf")), axis=1)
            best = best + tl.where(n_best > 1, best, rest)
        gscore = tl.where(gcols[None, :] == g, best[:, None], gscore)
    gpacked = _packed_key(gscore, (N_GROUPS - 1 - gcols)[None, :])
    gpacked = tl.where((gcols < N_GROUPS)[None, :], gpacked, _TAKEN)
    keep = tl.zeros(key.shape, tl.int32)
    for _ in tl.static_range(TOPK_GROUPS):
        gbest = tl.max(gpacked, axis=1)
        gpacked = tl.where(gpacked == gbest[:, None], _TAKEN, gpacked)
        gi = (N_GROUPS - 1) - (gbest & 0x7FFFFFFF).to(tl.int32)
        keep = tl.where(grp[None, :] == gi[:, None], 1, keep)
    return tl.where(keep != 0, key, float("-inf"))


@triton.jit
def _select_tile(x, rmask, cmask, cols, bias, scale,
                 E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                 SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, N_GROUPS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP2_SUM: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """Score and select one [BLOCK_T, BLOCK_E] tile of fp32 logits x (-inf on padding).

    Returns rank (the round k that took expert e, -1 if not selected), w (the combine weight of
    the selected, scaled; 0 elsewhere), q (each token's distribution over experts, 0 on padding:
    the balance loss's P) and lse_sq (logsumexp^2 per token, 0 on padding rows)."""
    mask = rmask[:, None] & cmask[None, :]
    rev = (E - 1 - cols)[None, :]  # the max of packed keys takes the lowest expert on ties
    m = tl.where(rmask, tl.max(x, axis=1), 0.0)
    ex = tl.exp(x - m[:, None])
    s = tl.where(rmask, tl.sum(ex, axis=1), 1.0)
    lse = m + tl.log(s)
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-x))
        q = p / (tl.sum(p, axis=1) + 1e-20)[:, None]  # sigmoid normalised per token
    else:
        p = div_rn(ex, s[:, None])
        q = p

    if KEY_LOGITS:
        key = x
    else:
        key = p
    if HAS_BIAS:
        key = key + bias[None, :]
    if N_GROUPS > 1:
        key = _group_limit(key, cols, BLOCK_T, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, TOP2_SUM,
                           BLOCK_G)
    packed = tl.where(cmask[None, :], _packed_key(key, rev), _TAKEN)

    # K rounds of: best packed key per token, then take it. rank[t, e] = the round that took
    # expert e (-1: not selected). Everything stays in the [BLOCK_T, BLOCK_E] layout.
    rank = tl.full([BLOCK_T, BLOCK_E], -1, tl.int32)
    for k in range(K):
        best = tl.max(packed, axis=1)  # [BLOCK_T]
        hit = packed == best[:, None]  # exactly one expert per token: the index breaks ties
        packed = tl.where(hit, _TAKEN, packed)
        rank = tl.where(hit, k, rank)
    chosen = rank >= 0

    if SOFTMAX_AFTER:
        xm = tl.where(chosen, x, float("-inf"))
        mk = tl.where(rmask, tl.max(xm, axis=1), 0.0)
        ek = tl.exp(xm - mk[:, None])
        w = div_rn(ek, tl.where(rmask, tl.sum(ek, axis=1), 1.0)[:, None])
    else:
        w = tl.where(chosen, p, 0.0)
        if RENORM:
            w = div_rn(w, (tl.sum(w, axis=1) + 1e-20)[:, None])
    w = w * scale
    return rank, w, tl.where(mask, q, 0.0), tl.where(rmask, lse * lse, 0.0)


@triton.jit
def _load_bias(bias_ptr, cols, cmask, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The [BLOCK_E] fp32 selection bias (zeros without one)."""
    bias = tl.zeros([BLOCK_E], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return bias


@triton.jit
def _route_tile(logits_ptr, stride_t, bias, ids_ptr, weights_ptr, rows, rmask, cols, cmask,
                scale, E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr,
                RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr,
                N_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                TOP2_SUM: tl.constexpr, BLOCK_G: tl.constexpr):
    """Load the logits of tokens `rows`, select (`_select_tile`) and store their K ids and
    weights at slots t*K + k. Returns chosen [BLOCK_T, BLOCK_E] (masked to real tokens and
    experts), slot (int64, valid where chosen), q and lse_sq (for the loss sums)."""
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=mask,
                other=float("-inf")).to(tl.float32)  # [BLOCK_T, BLOCK_E]; int64: T*E > 2^31
    rank, w, q, lse_sq = _select_tile(
        x, rmask, cmask, cols, bias, scale, E, K, BLOCK_T, BLOCK_E, SIGMOID, SOFTMAX_AFTER,
        RENORM, HAS_BIAS, KEY_LOGITS, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, TOP2_SUM, BLOCK_G)
    chosen = mask & (rank >= 0)
    slot = rows.to(tl.int64)[:, None] * K + rank
    tl.store(ids_ptr + slot, cols[None, :] + tl.zeros([BLOCK_T, BLOCK_E], tl.int32), mask=chosen)
    tl.store(weights_ptr + slot, w, mask=chosen)
    return chosen, slot, q, lse_sq


@triton.jit
def _topk_fwd_kernel(
    logits_ptr,  # (T, E) fp32/bf16/fp16/fp64, row stride stride_t, unit column stride
    bias_ptr,  # (E,) expert bias for selection only; read only if HAS_BIAS
    ids_ptr,  # (T, K) int32 out
    weights_ptr,  # (T, K) fp32 out
    part_ptr,  # (P, E+1) fp32 out: this program's sums over its tokens of the token
    #            distribution (columns < E) and of logsumexp^2 (column E)
    T,
    stride_t,
    scale,  # routed_scaling_factor
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,  # score_func == "sigmoid"
    SOFTMAX_AFTER: tl.constexpr,  # softmax over the K selected logits
    RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KEY_LOGITS: tl.constexpr,  # rank the logits (+bias) rather than the scores (+bias)
    N_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    TOP2_SUM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    bias = _load_bias(bias_ptr, cols, cmask, BLOCK_E, HAS_BIAS)
    prob_acc = tl.zeros([BLOCK_E], tl.float32)
    zsq_acc = tl.zeros([BLOCK_T], tl.float32)
    num_tiles = tl.cdiv(T, BLOCK_T)
    for tile in range(pid, num_tiles, nprog):  # persistent: fixed order, so sums reproduce
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        _, _, q, lse_sq = _route_tile(
            logits_ptr, stride_t, bias, ids_ptr, weights_ptr, rows, rows < T, cols, cmask,
            scale, E, K, BLOCK_T, BLOCK_E, SIGMOID, SOFTMAX_AFTER, RENORM, HAS_BIAS,
            KEY_LOGITS, N_GROUPS, GROUP_SIZE, TOPK_GROUPS, TOP2_SUM, BLOCK_G)
        prob_acc += tl.sum(q, axis=0)
        zsq_acc += lse_sq
    tl.store(part_ptr + pid * (E + 1) + cols, prob_acc, mask=cmask)
    tl.store(part_ptr + pid * (E + 1) + E, tl.sum(zsq_acc, axis=0))


@triton.jit
def _topk_stats_kernel(
    part_ptr,  # (P, E+1) fp32 per-program partial sums from _topk_fwd_kernel
    prob_sum_ptr,  # (E,) fp32 out
    zsq_sum_ptr,  # () fp32 out
    P,
    E: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Column sums of the partials in a fixed order (deterministic, no atomics). BLOCK_P covers
    P in one step in practice; many narrow column blocks give the parallelism."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < E + 1
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + rows[:, None] * (E + 1) + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(prob_sum_ptr + cols, total, mask=cols < E)
    tl.store(zsq_sum_ptr + cols * 0, total, mask=cols == E)


@triton.jit
def _topk_bwd_kernel(
    logits_ptr,  # (T, E) fp32/bf16/fp16/fp64, row stride stride_t, unit column stride
    ids_ptr,  # (T, K) int32 selected experts
    gw_ptr,  # (T, K) fp32 grad of topk_weights; read only if HAS_GW
    gp_ptr,  # (E,) fp32 grad of prob_sum; read only if HAS_GP
    gz_ptr,  # () fp32 grad of zsq_sum; read only if HAS_GZ
    grad_ptr,  # (T, E) out, logits dtype, contiguous
    T,
    stride_t,
    scale,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
    SOFTMAX_AFTER: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_GW: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_GZ: tl.constexpr,
):
    """grad_logits = d(<gw, weights> + <gp, prob_sum> + gz * zsq_sum) / d logits, per token.

    With p = softmax(x), sg = sigmoid(x), u = the selected scores and h = dL/du:
      z-loss:       2 * gz * lse * p
      prob (soft):  p * (gp - <gp, p>)
      prob (sigm):  sg(1-sg)/S * (gp - <gp, q>),  S = sum(sg) + eps, q = sg / S
      renormalise:  h = (g - <g, u>/U) / U on the selected, U = sum(u) + eps; else h = g
                    (g = scale * gw scattered to the selected experts)
      weights (softmax before top-K): p * (h - <h, p>);  (sigmoid): h * sg(1-sg)
      softmax after top-K: w * (g - <g, w>), w = softmax of the selected logits
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=mask,
                other=float("-inf")).to(tl.float32)  # [BLOCK_T, BLOCK_E]
    m = tl.where(rmask, tl.max(x, axis=1), 0.0)
    ex = tl.exp(x - m[:, None])
    s = tl.where(rmask, tl.sum(ex, axis=1), 1.0)
    p = ex / s[:, None]  # softmax of the logits (0 on padding)
    if SIGMOID:
        sg = 1.0 / (1.0 + tl.exp(-x))
        dsg = sg * (1.0 - sg)
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    if HAS_GZ:
        gz = tl.load(gz_ptr).to(tl.float32)
        lse = m + tl.log(s)
        acc += (2.0 * gz * lse)[:, None] * p
    if HAS_GP:
        gp = tl.load(gp_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SIGMOID:
            denom = tl.sum(sg, axis=1) + 1e-20
            q = sg / denom[:, None]
            acc += dsg / denom[:, None] * (gp - tl.sum(gp * q, axis=1)[:, None])
        else:
            acc += p * (gp - tl.sum(gp * p, axis=1)[:, None])
    if HAS_GW:
        # scatter the K weight grads onto their experts' columns
        g = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        sel = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
        row_k = rows.to(tl.int64) * K
        for k in range(K):
            idk = tl.load(ids_ptr + row_k + k, mask=rmask, other=-1)
            gk = tl.load(gw_ptr + row_k + k, mask=rmask, other=0.0) * scale
            hit = cols[None, :] == idk[:, None]
            g = tl.where(hit, gk[:, None], g)
            sel = tl.where(hit, 1, sel)
        chosen = sel != 0
        if SOFTMAX_AFTER:
            xm = tl.where(chosen, x, float("-inf"))
            mk = tl.where(rmask, tl.max(xm, axis=1), 0.0)
            ek = tl.exp(xm - mk[:, None])
            sk = tl.where(rmask, tl.sum(ek, axis=1), 1.0)
            w = ek / sk[:, None]
            acc += w * (g - tl.sum(g * w, axis=1)[:, None])
        else:
            if SIGMOID:
                u = tl.where(chosen, sg, 0.0)
            else:
                u = tl.where(chosen, p, 0.0)
            if RENORM:
                U = tl.sum(u, axis=1) + 1e-20
                h = (g - (tl.sum(g * u, axis=1) / U)[:, None]) / U[:, None]
                h = tl.where(chosen, h, 0.0)
            else:
                h = g
            if SIGMOID:
                acc += h * dsg
            else:
                acc += p * (h - tl.sum(h * p, axis=1)[:, None])
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], acc, mask=mask)
