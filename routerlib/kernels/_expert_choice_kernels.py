"""Triton kernels of expert-choice routing (private: the launchers live in expert_choice.py).

Each expert e takes the C tokens with the largest key (softmax/sigmoid score + bias), ties to the
lower token index. No sort over T: a radix select finds each expert's C-th largest key, a stable
compaction gathers the tokens above it (and the first ties, in token order), and only those C
keys per expert are sorted to give their rank.

  _ec_score_kernel    [T, E] tiles: scores, the loss partial sums, the keys transposed to [E, T]
                      as order-preserving uint32 (stored in int32), rank/slot_to_row set to -1
  _ec_hist_kernel     one launch per 8-bit digit (4 in all), grid (E, NSPLIT): each program
                      reads the previous digit's histograms to know the prefix of the C-th key,
                      then histograms the next digit of its token chunk among the keys with that
                      prefix. Per-split histograms [4, E, NSPLIT, 256] (no atomics, no zeroing)
  _ec_compact_kernel  grid (E, NSPLIT): the C-th key tau and how many ties to take follow from the
                      histograms, and so does where each chunk starts writing (the counts of the
                      earlier chunks): every key > tau, then ties in token order, are written as
                      packed int64 (key << 32 | T-1-token) to [E, C], in token order
  (torch.sort of the [E, C] packed keys, descending: key desc, token asc)
  _ec_place_kernel    rank, slot_to_row and row_to_slot of the C sorted picks of each expert
  _ec_bwd_kernel      grad_logits of the scores, prob_sum and zsq_sum

Bytes at T tokens, E experts: the score kernel reads T*E*s and writes 4*T*E*4 (scores, keys,
rank, slot_to_row); each digit pass reads the T*E*4 keys (from L2 when they fit), the compaction
reads them once more; the sort and place touch E*C*8.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels._topk_kernels import _load_bias

RADIX_BITS = 8
NUM_BINS = 256  # 2**RADIX_BITS
LEVELS = 4  # 32-bit keys


@triton.jit
def _sortable_u32(key):
    """uint32 whose unsigned order is the fp32 order of `key` (-0.0 and +0.0 equal)."""
    key = tl.where(key == 0.0, 0.0, key)
    bits = key.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the floats
    return bits.to(tl.uint32, bitcast=True) ^ 0x80000000  # unsigned order


@triton.jit
def _ec_score_kernel(
    logits_ptr,  # (T, E) fp32/bf16/fp16/fp64, row stride stride_t, unit column stride
    bias_ptr,  # (E,) selection bias; read only if HAS_BIAS
    scores_ptr,  # (T, E) fp32 out
    keys_ptr,  # (E, T) int32 out: uint32 sortable bits of score + bias
    rank_ptr,  # (T, E) int32 out: -1 (the place kernel writes the picks)
    slot_row_ptr,  # (T, E) int32 out: -1 (likewise)
    part_ptr,  # (P, E+1) fp32 out: this program's sums of the token distribution, lse^2
    T,
    stride_t,
    E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    bias = _load_bias(bias_ptr, cols, cmask, BLOCK_E, HAS_BIAS)
    prob_acc = tl.zeros([BLOCK_E], tl.float32)
    zsq_acc = tl.zeros([BLOCK_T], tl.float32)
    for tile in range(pid, tl.cdiv(T, BLOCK_T), nprog):  # persistent: sums in a fixed order
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)  # [BLOCK_T, BLOCK_E]
        m = tl.where(rmask, tl.max(x, axis=1), 0.0)
        ex = tl.exp(x - m[:, None])
        s = tl.where(rmask, tl.sum(ex, axis=1), 1.0)
        lse = m + tl.log(s)
        if SIGMOID:
            p = 1.0 / (1.0 + tl.exp(-x))
            q = p / (tl.sum(tl.where(mask, p, 0.0), axis=1) + 1e-20)[:, None]
        else:
            p = ex / s[:, None]
            q = p
        prob_acc += tl.sum(tl.where(mask, q, 0.0), axis=0)
        zsq_acc += tl.where(rmask, lse * lse, 0.0)
        out = rows64[:, None] * E + cols[None, :]
        tl.store(scores_ptr + out, p, mask=mask)
        minus1 = tl.full([BLOCK_T, BLOCK_E], -1, tl.int32)
        tl.store(rank_ptr + out, minus1, mask=mask)
        tl.store(slot_row_ptr + out, minus1, mask=mask)
        key = _sortable_u32(p + bias[None, :]).to(tl.int32, bitcast=True)
        tl.store(keys_ptr + cols.to(tl.int64)[None, :] * T + rows64[:, None], key, mask=mask)
    tl.store(part_ptr + pid * (E + 1) + cols, prob_acc, mask=cmask)
    tl.store(part_ptr + pid * (E + 1) + E, tl.sum(zsq_acc, axis=0))


@triton.jit
def _ec_hist_kernel(
    keys_ptr,  # (E, T) int32: uint32 sortable keys
    hist_ptr,  # (LEVELS, E, NSPLIT, NUM_BINS) int32: level LEVEL-1 read, LEVEL written
    state_ptr,  # (LEVELS, E, 2) int32: (prefix, k) of each level; LEVEL-1 read, LEVEL written
    T,
    C,
    chunk,  # tokens per split, a multiple of BLOCK
    NSPLIT,
    E: tl.constexpr,
    LEVEL: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Histogram of digit LEVEL of this chunk's keys that share the C-th key's higher digits.
    (prefix, k) of a level: the C-th key's digits above it, and its place among the keys with
    that prefix (k-th largest). Every program derives them from the previous level's histogram
    (the same numbers in all splits); split 0 stores them for the next launch."""
    e = tl.program_id(0)
    split = tl.program_id(1)
    shift: tl.constexpr = 24 - 8 * LEVEL
    prefix = 0
    k = C
    if LEVEL > 0:
        if LEVEL > 1:
            prefix = tl.load(state_ptr + ((LEVEL - 1) * E + e) * 2)
            k = tl.load(state_ptr + ((LEVEL - 1) * E + e) * 2 + 1)
        splits = tl.arange(0, BLOCK_S)
        bins = tl.arange(0, NUM_BINS)
        base = hist_ptr + (((LEVEL - 1) * E + e) * NSPLIT).to(tl.int64) * NUM_BINS
        h = tl.sum(tl.load(base + splits[:, None] * NUM_BINS + bins[None, :],
                           mask=(splits < NSPLIT)[:, None], other=0), axis=0)  # [NUM_BINS]
        ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # keys on this digit or above
        digit = tl.max(tl.where(ge >= k, bins, -1), axis=0)
        k = k - tl.sum(tl.where(bins > digit, h, 0), axis=0)
        prefix = prefix * NUM_BINS + digit
        first = split == 0
        tl.store(state_ptr + (LEVEL * E + e) * 2, prefix, mask=first)
        tl.store(state_ptr + (LEVEL * E + e) * 2 + 1, k, mask=first)
    acc = tl.zeros([2 * NUM_BINS], tl.int32)
    start = split * chunk
    for off in range(0, chunk, BLOCK):
        t = start + off + tl.arange(0, BLOCK)
        valid = t < T
        u = tl.load(keys_ptr + e.to(tl.int64) * T + t, mask=valid, other=0).to(
            tl.uint32, bitcast=True)
        if LEVEL > 0:
            valid = valid & ((u >> (shift + 8)).to(tl.int32) == prefix)
        d = ((u >> shift) & 0xFF).to(tl.int32)
        # keys outside the prefix (or past T) land in the upper half, which is not stored
        acc += tl.histogram(tl.where(valid, d, d + NUM_BINS), 2 * NUM_BINS)
    bins2 = tl.arange(0, 2 * NUM_BINS)
    out = hist_ptr + ((LEVEL * E + e) * NSPLIT + split).to(tl.int64) * NUM_BINS
    tl.store(out + bins2, acc, mask=bins2 < NUM_BINS)


@triton.jit
def _ec_compact_kernel(
    keys_ptr,  # (E, T) int32: uint32 sortable keys
    hist_ptr,  # (LEVELS, E, NSPLIT, NUM_BINS) int32
    state_ptr,  # (LEVELS, E, 2) int32: (prefix, k) of each level
    picks_ptr,  # (E, C) int64 out: (signed key << 32) | (T-1-token) of each pick, token order
    T,
    C,
    chunk,
    NSPLIT,
    E: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Write this chunk's picks: keys above the C-th key tau, and the first k ties (== tau) in
    token order. It starts after the earlier chunks' picks: their keys above tau (at each level,
    those on the prefix with a larger digit) and their ties, at most k."""
    e = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    bins = tl.arange(0, NUM_BINS)
    prefix = tl.load(state_ptr + (3 * E + e) * 2)  # the C-th key's top 24 bits
    k = tl.load(state_ptr + (3 * E + e) * 2 + 1)
    written = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    before = (splits < split)[:, None]
    for level in tl.static_range(4):
        base = hist_ptr + ((level * E + e) * NSPLIT).to(tl.int64) * NUM_BINS
        h2 = tl.load(base + splits[:, None] * NUM_BINS + bins[None, :],
                     mask=(splits < NSPLIT)[:, None], other=0)  # [BLOCK_S, NUM_BINS]
        if level == 3:  # the last digit of tau, and the ties to take
            h = tl.sum(h2, axis=0)
            ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
            digit = tl.max(tl.where(ge >= k, bins, -1), axis=0)
            k = k - tl.sum(tl.where(bins > digit, h, 0), axis=0)
            ties = tl.sum(tl.sum(tl.where(before & (bins == digit)[None, :], h2, 0), axis=1))
        else:
            digit = (prefix >> (16 - 8 * level)) & 0xFF
        written += tl.sum(tl.sum(tl.where(before & (bins > digit)[None, :], h2, 0), axis=1))
    tau = (prefix.to(tl.uint32) << 8) | digit.to(tl.uint32)  # digit: the last level's
    written += tl.minimum(ties, k)
    start = split * chunk
    for off in range(0, chunk, BLOCK):
        t = start + off + tl.arange(0, BLOCK)
        valid = t < T
        u = tl.load(keys_ptr + e.to(tl.int64) * T + t, mask=valid, other=0).to(
            tl.uint32, bitcast=True)
        eq = valid & (u == tau)
        eq_i = eq.to(tl.int32)
        tie_rank = ties + tl.cumsum(eq_i, axis=0) - eq_i
        take = (valid & (u > tau)) | (eq & (tie_rank < k))
        take_i = take.to(tl.int32)
        pos = written + tl.cumsum(take_i, axis=0) - take_i
        signed = (u ^ 0x80000000).to(tl.int32, bitcast=True)
        packed = (signed.to(tl.int64) << 32) | (T - 1 - t).to(tl.int64)
        tl.store(picks_ptr + e.to(tl.int64) * C + pos, packed, mask=take)
        ties += tl.sum(eq_i, axis=0)
        written += tl.sum(take_i, axis=0)


@triton.jit
def _ec_place_kernel(
    picks_ptr,  # (E, C) int64: each expert's picks sorted best first
    rank_ptr,  # (T, E) int32 out at the picks: place in the expert's list
    slot_row_ptr,  # (T, E) int32 out at the picks: e*C + rank
    row_slot_ptr,  # (E*C,) int32 out: t*E + e
    T,
    C,
    E: tl.constexpr,
    BLOCK: tl.constexpr,
):
    e = tl.program_id(0)
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = r < C
    row = e.to(tl.int64) * C + r
    packed = tl.load(picks_ptr + row, mask=mask, other=0)
    t = T - 1 - packed.to(tl.int32)  # the low half: T-1-token
    slot = t.to(tl.int64) * E + e
    tl.store(rank_ptr + slot, r, mask=mask)
    tl.store(slot_row_ptr + slot, row.to(tl.int32), mask=mask)
    tl.store(row_slot_ptr + row, slot.to(tl.int32), mask=mask)


@triton.jit
def _ec_bwd_kernel(
    logits_ptr,  # (T, E), row stride stride_t, unit column stride
    gs_ptr,  # (T, E) fp32 grad of scores; read only if HAS_GS
    gp_ptr,  # (E,) fp32 grad of prob_sum; read only if HAS_GP
    gz_ptr,  # () fp32 grad of zsq_sum; read only if HAS_GZ
    grad_ptr,  # (T, E) out, logits dtype, contiguous
    T,
    stride_t,
    E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_GS: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_GZ: tl.constexpr,
):
    """grad_logits = d(<gs, scores> + <gp, prob_sum> + gz * zsq_sum) / d logits, per token.

    softmax p: h = gs + gp, grad = p * (h - <h, p>)
    sigmoid s: h = gs + (gp - <gp, q>) / S with S = sum(s) + eps, q = s / S; grad = h * s(1-s)
    z-loss:    + 2 * gz * lse * softmax
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + rows64[:, None] * stride_t + cols[None, :], mask=mask,
                other=float("-inf")).to(tl.float32)
    m = tl.where(rmask, tl.max(x, axis=1), 0.0)
    ex = tl.exp(x - m[:, None])
    s = tl.where(rmask, tl.sum(ex, axis=1), 1.0)
    p = ex / s[:, None]  # softmax, 0 on padding
    h = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    if HAS_GS:
        h += tl.load(gs_ptr + rows64[:, None] * E + cols[None, :], mask=mask, other=0.0)
    if SIGMOID:
        sg = tl.where(mask, 1.0 / (1.0 + tl.exp(-x)), 0.0)
        if HAS_GP:
            gp = tl.load(gp_ptr + cols, mask=cmask, other=0.0)[None, :]
            denom = tl.sum(sg, axis=1) + 1e-20
            h += (gp - tl.sum(gp * sg, axis=1)[:, None] / denom[:, None]) / denom[:, None]
        acc = h * sg * (1.0 - sg)
    else:
        if HAS_GP:
            h += tl.load(gp_ptr + cols, mask=cmask, other=0.0)[None, :]
        acc = p * (h - tl.sum(h * p, axis=1)[:, None])
    if HAS_GZ:
        gz = tl.load(gz_ptr)
        acc += (2.0 * gz * (m + tl.log(s)))[:, None] * p
    tl.store(grad_ptr + rows64[:, None] * E + cols[None, :], acc, mask=mask)


def split_config(num_tokens: int, num_experts: int, programs: int, block: int) -> tuple[int, int]:
    """(NSPLIT, chunk): token chunks per expert so that about `programs` programs share a digit
    pass; chunk is a multiple of `block`."""
    nsplit = max(1, min(-(-programs // num_experts), triton.cdiv(num_tokens, block)))
    chunk = triton.cdiv(triton.cdiv(num_tokens, nsplit), block) * block
    return triton.cdiv(num_tokens, chunk), chunk
