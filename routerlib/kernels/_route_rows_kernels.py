"""Triton kernels of the row-wise route (private: the launcher is route_rows.py).

Selection with few threads per token. The general top-K kernel (_topk_kernels.py) spreads a
token's E experts over a warp and runs K max-reductions across it: K * log2(32) dependent
shuffles per token. Here a token's experts are split among H (1, 2 or 4) threads; each thread
streams its columns 4 at a time (one 16-byte load for fp32) and inserts every key into a sorted
list of the K best it has seen, held in registers (per list entry one compare and four selects,
all entries in parallel, no shuffles). The H lists are merged at the end (the same insertion).
Columns arrive in increasing index order and a new key lands below the equal keys already in
the list, so among equal keys the lower expert index wins, as in the reference's stable sort.
Keys are fp32 turned into order-preserving int32 (_plan_kernels._sortable: -0.0 == +0.0,
NaN above +inf as in torch.sort). With PACKED (the launcher's choice) the lists hold one int32
per key with the column in its low bits instead, and the result is finished exactly (see the
"packed selection" section below).

The select kernel also ranks each chosen slot inside its tile by counting. With one thread a
token and E <= 128 (the prefill default) by bit-transposed membership masks (_lane_ranks, see
its section): a ballot-like transpose of each warp's 128-bit masks and popcounts. Otherwise
(_token_ranks) per token a column of E/4 int32 words holding 8-bit fields (field e%4 of word
e//4); an exclusive cumsum of the columns along the tile's tokens gives, in field e, how many
earlier tokens of the tile went to e. Fields cannot overflow: a tile has at most 128 tokens and
a token takes an expert once. The place kernel is then elementwise: it adds the earlier tiles'
counts (from the scan, or, with few tiles, from its own scan of the tile counts held in
registers).

Bytes: select reads T*E*s (+ T*K*s, the K selected logits again, from L1/L2) and writes T*K*12
(ids, weights, in-tile ranks) + NT*E*4 (tile counts); the scan reads and writes NT*E*4; place
reads T*K*8 + NT*E*4 and writes T*K*4 + R*4.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels._plan_kernels import _div, _sortable
from routerlib.kernels._rowmap import _pdl_start

_INT32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _shift(c_prev, c, key, idx, k_prev, i_prev, k, i):
    """Entry j after an insertion: itself if the new key does not beat it (c false), else the
    new pair (it lands here) or the old entry j-1 (it landed above: the rest shift down)."""
    return (tl.where(c, tl.where(c_prev, k_prev, key), k),
            tl.where(c, tl.where(c_prev, i_prev, idx), i))


@triton.jit
def _insert(key, idx, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7,
            K: tl.constexpr):
    """Insert (key, idx) into the sorted list k0 >= k1 >= ... (length K <= 8) whose entries all
    have lower expert indices than idx: it lands above the first entry it strictly beats, so
    below equal keys (lower index first), and the entries under it shift down. c_j = key > k_j
    is monotone in j; entries are rewritten bottom-up so each reads its old upper neighbour."""
    c0 = key > k0
    c1 = key > k1
    c2 = key > k2
    c3 = key > k3
    c4 = key > k4
    c5 = key > k5
    c6 = key > k6
    c7 = key > k7
    if K > 7:
        k7, i7 = _shift(c6, c7, key, idx, k6, i6, k7, i7)
    if K > 6:
        k6, i6 = _shift(c5, c6, key, idx, k5, i5, k6, i6)
    if K > 5:
        k5, i5 = _shift(c4, c5, key, idx, k4, i4, k5, i5)
    if K > 4:
        k4, i4 = _shift(c3, c4, key, idx, k3, i3, k4, i4)
    if K > 3:
        k3, i3 = _shift(c2, c3, key, idx, k2, i2, k3, i3)
    if K > 2:
        k2, i2 = _shift(c1, c2, key, idx, k1, i1, k2, i2)
    if K > 1:
        k1, i1 = _shift(c0, c1, key, idx, k0, i0, k1, i1)
    k0, i0 = tl.where(c0, key, k0), tl.where(c0, idx, i0)
    return k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7


@triton.jit
def _insert4(keys, col, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7,
             K: tl.constexpr):
    """Insert the 4 columns of keys [BT, H, 4] (column col + j, col: [1, H]) in order."""
    BT: tl.constexpr = keys.shape[0]
    H: tl.constexpr = keys.shape[1]
    a, b = tl.split(tl.reshape(keys, [BT, H, 2, 2]))  # a: columns 0, 2; b: columns 1, 3
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _insert(
        c0, col, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K)
    k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _insert(
        c1, col + 1, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K)
    k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _insert(
        c2, col + 2, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K)
    return _insert(c3, col + 3, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7,
                   K)


@triton.jit
def _merge(k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K: tl.constexpr):
    """Merge the two lists held along the last axis (size 2) of every entry: entry [..., 1]
    holds the later (higher-index) columns, so inserting its list, best first, into list
    [..., 0] keeps the lower index on ties."""
    a0, b0 = tl.split(k0)
    j0, l0 = tl.split(i0)
    a1, b1 = tl.split(k1)
    j1, l1 = tl.split(i1)
    a2, b2 = tl.split(k2)
    j2, l2 = tl.split(i2)
    a3, b3 = tl.split(k3)
    j3, l3 = tl.split(i3)
    a4, b4 = tl.split(k4)
    j4, l4 = tl.split(i4)
    a5, b5 = tl.split(k5)
    j5, l5 = tl.split(i5)
    a6, b6 = tl.split(k6)
    j6, l6 = tl.split(i6)
    a7, b7 = tl.split(k7)
    j7, l7 = tl.split(i7)
    a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
        b0, l0, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    if K > 1:
        a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
            b1, l1, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    if K > 2:
        a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
            b2, l2, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    if K > 3:
        a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
            b3, l3, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    if K > 4:
        a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
            b4, l4, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    if K > 5:
        a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
            b5, l5, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    if K > 6:
        a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
            b6, l6, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    if K > 7:
        a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7 = _insert(
            b7, l7, a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7, K)
    return a0, j0, a1, j1, a2, j2, a3, j3, a4, j4, a5, j5, a6, j6, a7, j7


@triton.jit
def _stack(i0, i1, i2, i3, i4, i5, i6, i7, KP: tl.constexpr):
    """[BT] x 8 -> [BT, KP]: column j holds i_j."""
    kc = tl.arange(0, KP)[None, :]
    out = tl.where(kc == 0, i0[:, None], 0)
    if KP > 1:
        out = tl.where(kc == 1, i1[:, None], out)
    if KP > 2:
        out = tl.where(kc == 2, i2[:, None], out)
        out = tl.where(kc == 3, i3[:, None], out)
    if KP > 4:
        out = tl.where(kc == 4, i4[:, None], out)
        out = tl.where(kc == 5, i5[:, None], out)
        out = tl.where(kc == 6, i6[:, None], out)
        out = tl.where(kc == 7, i7[:, None], out)
    return out


@triton.jit
def _load4(base, rmask, col, E: tl.constexpr, EVEN: tl.constexpr = False):
    """logits [BT, H, 4] of columns col + (0..3) (col: [1, H, 1] int32), -inf past E, fp32.
    EVEN: the thread groups cover exactly E columns (no column mask)."""
    cols = col + tl.arange(0, 4)[None, None, :]
    if EVEN:
        mask = rmask[:, None, None]
    else:
        mask = rmask[:, None, None] & (cols < E)
    return tl.load(base[:, None, None] + cols, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _key_of(x, cols, bias_ptr, m, s, E: tl.constexpr, SIGMOID: tl.constexpr,
            HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, SOFTMAX_KEYS: tl.constexpr,
            EVEN: tl.constexpr):
    """The fp32 selection key of logits x at columns cols: the exact insertion, the packed pass
    and its finishing all compute it here (the last two must agree bit for bit)."""
    key = x
    if SOFTMAX_KEYS:
        key = tl.exp(x - m) / s
    elif SIGMOID and not KEY_LOGITS:
        key = 1.0 / (1.0 + tl.exp(-x))
    if HAS_BIAS:
        if EVEN:
            key = key + tl.load(bias_ptr + cols).to(tl.float32)
        else:
            key = key + tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)
    return key


@triton.jit
def _group_stats(m, s, NEED_MS: tl.constexpr):
    """The softmax max and sum of exps [BT] of each row from its H thread groups' [BT, H]."""
    if NEED_MS:
        mt = tl.max(m, axis=1)
        return mt, tl.sum(s * tl.exp(m - mt[:, None]), axis=1)
    return tl.max(m, axis=1), tl.sum(s, axis=1)


@triton.jit
def _chunk(x, col, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7,
           i7, E: tl.constexpr, K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
           KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """One [BT, H, 4] chunk of logits x (columns col + 0..3, col: [1, H]): the online softmax
    statistics (NEED_MS) and, when the keys need no normaliser, their insertion."""
    if NEED_MS:
        m_new = tl.maximum(m, tl.max(x, axis=2))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, :, None]), axis=2)
        m = m_new
    if KEYS_FIRST:
        cols = col[:, :, None] + tl.arange(0, 4)[None, None, :]
        key = _key_of(x, cols, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS, False, False)
        key = tl.where(cols < E, _sortable(key), _INT32_MIN)
        k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _insert4(
            key, col, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K)
    return m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7


@triton.jit
def _select_rows(
    base, rmask, bias_ptr, BT: tl.constexpr,
    E: tl.constexpr, K: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr,
    STAGES: tl.constexpr, UNROLL: tl.constexpr = 4,
):
    """Top-K of the tokens whose logits rows start at `base` [BT] (row pointers). Thread group
    h of a token scans columns [h*EH, (h+1)*EH) (EH a multiple of 16). Returns (ids [BT] x 8, m
    [BT], s [BT]): the selected experts best first (entries past K unused), and the softmax max
    and sum of exps of each row (only if NEED_MS)."""
    hcol = (tl.arange(0, H) * EH)[None, :]  # [1, H] first column of each thread group
    neg = tl.full([BT, H], _INT32_MIN, tl.int32)
    zero = tl.zeros([BT, H], tl.int32)
    k0, k1, k2, k3, k4, k5, k6, k7 = neg, neg, neg, neg, neg, neg, neg, neg
    i0, i1, i2, i3, i4, i5, i6, i7 = zero, zero, zero, zero, zero, zero, zero, zero
    m = tl.full([BT, H], -3.0e38, tl.float32)  # finite: exp(m - m_new) stays a number
    s = tl.zeros([BT, H], tl.float32)
    KEYS_FIRST: tl.constexpr = KEY_LOGITS or SIGMOID  # keys need no softmax normaliser
    if UNROLL == 1:  # the packed path's rare fallback: small code, 4 columns a step
        for c in range(0, EH, 4):
            col = hcol + c
            x = _load4(base, rmask, col[:, :, None], E)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x, col, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6,
                i6, k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, NEED_MS, KEYS_FIRST)
    else:
        # 16 columns per step (four 16-byte loads in flight) and the next step's loads issued while
        # this one computes (tl.range stages): the loop is bound by load latency otherwise.
        # (STAGES = 0 is the packed loop's register prefetch; here it means 1 stage)
        NS: tl.constexpr = 1 if STAGES == 0 else STAGES
        for c in tl.range(0, EH, 16, num_stages=NS):
            col = hcol + c
            x0 = _load4(base, rmask, col[:, :, None], E)
            x1 = _load4(base, rmask, col[:, :, None] + 4, E)
            x2 = _load4(base, rmask, col[:, :, None] + 8, E)
            x3 = _load4(base, rmask, col[:, :, None] + 12, E)
            if NEED_MS:  # the online softmax statistics once a step: one rescale, not four
                m_new = tl.maximum(tl.maximum(m, tl.max(tl.maximum(x0, x1), axis=2)),
                                   tl.max(tl.maximum(x2, x3), axis=2))
                e = tl.exp(x0 - m_new[:, :, None]) + tl.exp(x1 - m_new[:, :, None])
                e += tl.exp(x2 - m_new[:, :, None]) + tl.exp(x3 - m_new[:, :, None])
                s = s * tl.exp(m - m_new) + tl.sum(e, axis=2)
                m = m_new
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x0, col, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7,
                i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x1, col + 4, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6,
                k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x2, col + 8, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6,
                k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x3, col + 12, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6,
                i6, k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST)
    m, s = _group_stats(m, s, NEED_MS)
    if not KEYS_FIRST:  # softmax scores + bias: a second pass once the normaliser is known
        for c in range(0, EH, 4):  # a loop, not unrolled: small code, fast compile
            col = hcol + c
            x = _load4(base, rmask, col[:, :, None], E)
            cols = col[:, :, None] + tl.arange(0, 4)[None, None, :]
            key = _key_of(x, cols, bias_ptr, m[:, None, None], s[:, None, None], E, SIGMOID,
                          HAS_BIAS, KEY_LOGITS, True, False)
            key = tl.where(cols < E, _sortable(key), _INT32_MIN)
            k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _insert4(
                key, col, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K)
    if H == 4:  # [BT, 4] -> [BT, 2, 2]: merge groups (0, 1) and (2, 3)
        k0, i0 = tl.reshape(k0, [BT, 2, 2]), tl.reshape(i0, [BT, 2, 2])
        k1, i1 = tl.reshape(k1, [BT, 2, 2]), tl.reshape(i1, [BT, 2, 2])
        k2, i2 = tl.reshape(k2, [BT, 2, 2]), tl.reshape(i2, [BT, 2, 2])
        k3, i3 = tl.reshape(k3, [BT, 2, 2]), tl.reshape(i3, [BT, 2, 2])
        k4, i4 = tl.reshape(k4, [BT, 2, 2]), tl.reshape(i4, [BT, 2, 2])
        k5, i5 = tl.reshape(k5, [BT, 2, 2]), tl.reshape(i5, [BT, 2, 2])
        k6, i6 = tl.reshape(k6, [BT, 2, 2]), tl.reshape(i6, [BT, 2, 2])
        k7, i7 = tl.reshape(k7, [BT, 2, 2]), tl.reshape(i7, [BT, 2, 2])
        k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _merge(
            k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K)
    if H >= 2:
        k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _merge(
            k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7, K)
    else:
        i0, i1, i2, i3 = (tl.reshape(i0, [BT]), tl.reshape(i1, [BT]), tl.reshape(i2, [BT]),
                          tl.reshape(i3, [BT]))
        i4, i5, i6, i7 = (tl.reshape(i4, [BT]), tl.reshape(i5, [BT]), tl.reshape(i6, [BT]),
                          tl.reshape(i7, [BT]))
    return i0, i1, i2, i3, i4, i5, i6, i7, m, s


# ---- packed selection: one int32 per key, index included ----------------------------------
# The sortable key's low SHIFT bits give way to the column's complement (SHIFT = bits of the
# largest column index): one int32 then orders by key and, among equal keys, by lower index,
# and is unique per column, so the sorted list needs no index registers and an insertion is a
# max/min pair per entry (new p_j = max(p_j, min(x, p_{j-1}))) against a compare and four
# selects. Cutting the low bits can only merge keys closer than ~2^(SHIFT-23) relative into a
# tie that the index then decides, so the list keeps L = K + 2 entries and is finished exactly:
# the L keys are recomputed in full (L gathers from L1/L2), four odd-even transposition passes
# sort them by (key, lower index) (a run of up to 4 merged keys anywhere), and a token is sure
# when the result is sorted and the K-th packed entry's high bits beat the L-th's (then the
# first K beat every key outside the list). A tile holding an unsure token (a run of >= 3
# merged keys at the cut, >= 5 anywhere: ~never on continuous logits; rows of equal fp32 values
# do) is selected again by the exact insertion (_select_rows). Keys whose low SHIFT bits are
# always zero (bf16/fp16 logits as keys) lose nothing: EXACT_PACK skips the finishing.


@triton.jit
def _pack(key, cols, SHIFT: tl.constexpr):
    """Sortable int32 keys with their low SHIFT bits replaced by (2^SHIFT - 1 - column)."""
    LOW: tl.constexpr = (1 << SHIFT) - 1
    HIGH: tl.constexpr = -(1 << SHIFT)
    return (key & HIGH) | (LOW - cols)


@triton.jit
def _push(x, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L: tl.constexpr):
    """Insert the packed key x into the descending list p0 > p1 > ... (L <= 10 entries used):
    entry j becomes max(p_j, min(x, p_{j-1})); rewritten bottom-up so each reads its old upper
    neighbour. Keys are unique, so the order of insertions does not matter."""
    if L > 9:
        p9 = tl.maximum(p9, tl.minimum(x, p8))
    if L > 8:
        p8 = tl.maximum(p8, tl.minimum(x, p7))
    if L > 7:
        p7 = tl.maximum(p7, tl.minimum(x, p6))
    if L > 6:
        p6 = tl.maximum(p6, tl.minimum(x, p5))
    if L > 5:
        p5 = tl.maximum(p5, tl.minimum(x, p4))
    if L > 4:
        p4 = tl.maximum(p4, tl.minimum(x, p3))
    if L > 3:
        p3 = tl.maximum(p3, tl.minimum(x, p2))
    if L > 2:
        p2 = tl.maximum(p2, tl.minimum(x, p1))
    if L > 1:
        p1 = tl.maximum(p1, tl.minimum(x, p0))
    p0 = tl.maximum(p0, x)
    return p0, p1, p2, p3, p4, p5, p6, p7, p8, p9


@triton.jit
def _push4(keys, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L: tl.constexpr):
    """Insert the 4 packed columns of keys [BT, H, 4]."""
    BT: tl.constexpr = keys.shape[0]
    H: tl.constexpr = keys.shape[1]
    a, b = tl.split(tl.reshape(keys, [BT, H, 2, 2]))
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _push(c0, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L)
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _push(c1, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L)
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _push(c2, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L)
    return _push(c3, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L)


# Sorting networks (NET): 8 keys at a time are sorted (Knuth's 19 comparators) and merged into
# the list: C_j = max(p_j, b_(M-1-j)) keeps the M best of both as a bitonic sequence (the list
# descending, the sorted 8 reversed), which a bitonic merger sorts (M = 8: 12 comparators; M =
# 10: the 16-input merger with 6 +inf entries in front, 15 comparators left). 38 + 8 + 30 = 76
# min/max for 8 keys against 8 * 19 = 152 inserting them one by one (L = 10); the list then
# holds the M best, of which the first L are used.


@triton.jit
def _cx(a, b):
    """Compare-exchange: (larger, smaller)."""
    return tl.maximum(a, b), tl.minimum(a, b)


@triton.jit
def _sort8(k0, k1, k2, k3, k4, k5, k6, k7):
    """The 8 keys in descending order (19 comparators, depth 6)."""
    k0, k2 = _cx(k0, k2)
    k1, k3 = _cx(k1, k3)
    k4, k6 = _cx(k4, k6)
    k5, k7 = _cx(k5, k7)
    k0, k4 = _cx(k0, k4)
    k1, k5 = _cx(k1, k5)
    k2, k6 = _cx(k2, k6)
    k3, k7 = _cx(k3, k7)
    k0, k1 = _cx(k0, k1)
    k2, k3 = _cx(k2, k3)
    k4, k5 = _cx(k4, k5)
    k6, k7 = _cx(k6, k7)
    k2, k4 = _cx(k2, k4)
    k3, k5 = _cx(k3, k5)
    k1, k4 = _cx(k1, k4)
    k3, k6 = _cx(k3, k6)
    k1, k2 = _cx(k1, k2)
    k3, k4 = _cx(k3, k4)
    k5, k6 = _cx(k5, k6)
    return k0, k1, k2, k3, k4, k5, k6, k7


@triton.jit
def _bitonic8(q0, q1, q2, q3, q4, q5, q6, q7):
    """A bitonic sequence of 8 in descending order (three stages of 4 comparators)."""
    q0, q4 = _cx(q0, q4)
    q1, q5 = _cx(q1, q5)
    q2, q6 = _cx(q2, q6)
    q3, q7 = _cx(q3, q7)
    q0, q2 = _cx(q0, q2)
    q1, q3 = _cx(q1, q3)
    q4, q6 = _cx(q4, q6)
    q5, q7 = _cx(q5, q7)
    q0, q1 = _cx(q0, q1)
    q2, q3 = _cx(q2, q3)
    q4, q5 = _cx(q4, q5)
    q6, q7 = _cx(q6, q7)
    return q0, q1, q2, q3, q4, q5, q6, q7


@triton.jit
def _bitonic10(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9):
    """A bitonic sequence of 10 in descending order: the 16-input merger with six +inf entries
    in front keeps two comparators of its first stage, (c0, c8) and (c1, c9); then c2..c9 is a
    bitonic 8 and (c0, c1) the last pair (15 comparators)."""
    c0, c8 = _cx(c0, c8)
    c1, c9 = _cx(c1, c9)
    c2, c3, c4, c5, c6, c7, c8, c9 = _bitonic8(c2, c3, c4, c5, c6, c7, c8, c9)
    c0, c1 = _cx(c0, c1)
    return c0, c1, c2, c3, c4, c5, c6, c7, c8, c9


@triton.jit
def _merge8(b0, b1, b2, b3, b4, b5, b6, b7, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9,
            M: tl.constexpr):
    """The M (8 or 10) best of the descending list p0.. and the descending b0..b7, descending.
    The last 8 of the M entries meet the sorted 8 reversed (C_j = max(p_j, b_(M-1-j))): the M
    best as a bitonic sequence."""
    if M == 8:
        p0, p1, p2, p3, p4, p5, p6, p7 = _bitonic8(
            tl.maximum(p0, b7), tl.maximum(p1, b6), tl.maximum(p2, b5), tl.maximum(p3, b4),
            tl.maximum(p4, b3), tl.maximum(p5, b2), tl.maximum(p6, b1), tl.maximum(p7, b0))
    else:
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _bitonic10(
            p0, p1, tl.maximum(p2, b7), tl.maximum(p3, b6), tl.maximum(p4, b5),
            tl.maximum(p5, b4), tl.maximum(p6, b3), tl.maximum(p7, b2), tl.maximum(p8, b1),
            tl.maximum(p9, b0))
    return p0, p1, p2, p3, p4, p5, p6, p7, p8, p9


@triton.jit
def _split4(keys):
    """keys [BT, H, 4] -> its 4 columns [BT, H] (in the order 0, 2, 1, 3)."""
    BT: tl.constexpr = keys.shape[0]
    H: tl.constexpr = keys.shape[1]
    a, b = tl.split(tl.reshape(keys, [BT, H, 2, 2]))
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    return c0, c2, c1, c3


@triton.jit
def _push8(ka, kb, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L: tl.constexpr,
           NET: tl.constexpr):
    """Insert the 8 packed columns of ka, kb [BT, H, 4]: one by one, or with NET (L >= 7) sorted
    by a network and merged (the list then holds M >= L entries, see above)."""
    if NET and L >= 7:
        a0, a1, a2, a3 = _split4(ka)
        a4, a5, a6, a7 = _split4(kb)
        a0, a1, a2, a3, a4, a5, a6, a7 = _sort8(a0, a1, a2, a3, a4, a5, a6, a7)
        return _merge8(a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9,
                       8 if L == 8 else 10)
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _push4(ka, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L)
    return _push4(kb, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L)


@triton.jit
def _cut(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L: tl.constexpr):
    """Entries past L back to INT32_MIN (a network's merge fills M >= L of them)."""
    if L < 10:
        p9 = tl.full(p9.shape, _INT32_MIN, tl.int32)
    if L < 9:
        p8 = tl.full(p8.shape, _INT32_MIN, tl.int32)
    if L < 8:
        p7 = tl.full(p7.shape, _INT32_MIN, tl.int32)
    return p0, p1, p2, p3, p4, p5, p6, p7, p8, p9


@triton.jit
def _merge_packed(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L: tl.constexpr,
                  NET: tl.constexpr):
    """Merge the two lists held along the last axis (size 2) of every entry (entries past L
    INT32_MIN). NET (L >= 7, as the column loop's network): both are descending, so
    C_j = max(a_j, b_(M-1-j)) is the M best as a bitonic sequence, sorted by a merger (M = 8
    or 10: 8 + 12 or 10 + 15 min/max); else b is inserted entry by entry (L pushes of 2L)."""
    a0, b0 = tl.split(p0)
    a1, b1 = tl.split(p1)
    a2, b2 = tl.split(p2)
    a3, b3 = tl.split(p3)
    a4, b4 = tl.split(p4)
    a5, b5 = tl.split(p5)
    a6, b6 = tl.split(p6)
    a7, b7 = tl.split(p7)
    a8, b8 = tl.split(p8)
    a9, b9 = tl.split(p9)
    if NET and L > 8:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _bitonic10(
            tl.maximum(a0, b9), tl.maximum(a1, b8), tl.maximum(a2, b7), tl.maximum(a3, b6),
            tl.maximum(a4, b5), tl.maximum(a5, b4), tl.maximum(a6, b3), tl.maximum(a7, b2),
            tl.maximum(a8, b1), tl.maximum(a9, b0))
        return _cut(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if NET and L >= 7:  # L <= 8: entries 8 and 9 of both lists are INT32_MIN
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _merge8(
            b0, b1, b2, b3, b4, b5, b6, b7, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, 8)
        return _cut(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(b0, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 1:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b1, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 2:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b2, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 3:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b3, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 4:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b4, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 5:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b5, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 6:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b6, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 7:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b7, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 8:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b8, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    if L > 9:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _push(
            b9, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, L)
    return a0, a1, a2, a3, a4, a5, a6, a7, a8, a9


@triton.jit
def _packed_keys(x, col, bias_ptr, m, s, E: tl.constexpr, SIGMOID: tl.constexpr,
                 HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, SOFTMAX_KEYS: tl.constexpr,
                 EVEN: tl.constexpr, SHIFT: tl.constexpr):
    """Packed keys [BT, H, 4] of the logits chunk x (columns col + 0..3, col: [1, H]; m, s:
    [BT, H]); padding columns get INT32_MIN (below every real key: sortable(-inf) is far
    above)."""
    cols = col[:, :, None] + tl.arange(0, 4)[None, None, :]
    key = _key_of(x, cols, bias_ptr, m[:, :, None], s[:, :, None], E, SIGMOID, HAS_BIAS,
                  KEY_LOGITS, SOFTMAX_KEYS, EVEN)
    key = _pack(_sortable(key), cols, SHIFT)
    if not EVEN:
        key = tl.where(cols < E, key, _INT32_MIN)
    return key


@triton.jit
def _exact(p, base, rmask, bias_ptr, m, s, E: tl.constexpr, SIGMOID: tl.constexpr,
           HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, SOFTMAX_KEYS: tl.constexpr,
           SHIFT: tl.constexpr):
    """(exact sortable key, column, logit) of the packed entries p [BT]: the logit gathered
    again and its key recomputed. Empty entries (INT32_MIN) get (INT32_MIN, 2^30, 0): last in
    any order."""
    LOW: tl.constexpr = (1 << SHIFT) - 1
    real = p != _INT32_MIN
    col = tl.where(real, LOW - (p & LOW), 0)
    x = tl.load(base + col, mask=rmask & real, other=0.0).to(tl.float32)
    key = _sortable(_key_of(x, col, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                            SOFTMAX_KEYS, True))
    return tl.where(real, key, _INT32_MIN), tl.where(real, col, 1 << 30), x


@triton.jit
def _before(ea, ia, eb, ib):
    """Entry a ranks before entry b: a higher key, or an equal key and a lower column."""
    return (ea > eb) | ((ea == eb) & (ia < ib))


@triton.jit
def _ce(ea, ia, xa, eb, ib, xb):
    """Compare-exchange of two (key, column, logit) entries: the better (higher key, then lower
    column) first."""
    a_first = _before(ea, ia, eb, ib)
    return (tl.where(a_first, ea, eb), tl.where(a_first, ia, ib), tl.where(a_first, xa, xb),
            tl.where(a_first, eb, ea), tl.where(a_first, ib, ia), tl.where(a_first, xb, xa))




@triton.jit
def _nth(j: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9):
    """Entry j (a constant) of the list: Triton has no register arrays."""
    if j == 0:
        return p0
    elif j == 1:
        return p1
    elif j == 2:
        return p2
    elif j == 3:
        return p3
    elif j == 4:
        return p4
    elif j == 5:
        return p5
    elif j == 6:
        return p6
    elif j == 7:
        return p7
    elif j == 8:
        return p8
    else:
        return p9


@triton.jit
def _finish(base, rmask, bias_ptr, m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9,
            K: tl.constexpr, E: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
            KEY_LOGITS: tl.constexpr, SOFTMAX_KEYS: tl.constexpr, SHIFT: tl.constexpr):
    """The exact top-K columns of the packed top-(K + 2) p0.. [BT] (see the section comment).
    Returns (columns [BT] x 8, best first; their logits [BT] x 8; sure [BT])."""
    L: tl.constexpr = K + 2
    e0, c0, x0 = _exact(p0, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                    SOFTMAX_KEYS, SHIFT)
    e1, c1, x1 = _exact(p1, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                    SOFTMAX_KEYS, SHIFT)
    e2, c2, x2, e3, c3, x3, e4, c4, x4 = e1, c1, x1, e1, c1, x1, e1, c1, x1
    e5, c5, x5, e6, c6, x6, e7, c7, x7 = e1, c1, x1, e1, c1, x1, e1, c1, x1
    e8, c8, x8, e9, c9, x9 = e1, c1, x1, e1, c1, x1
    if L > 2:
        e2, c2, x2 = _exact(p2, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    if L > 3:
        e3, c3, x3 = _exact(p3, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    if L > 4:
        e4, c4, x4 = _exact(p4, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    if L > 5:
        e5, c5, x5 = _exact(p5, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    if L > 6:
        e6, c6, x6 = _exact(p6, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    if L > 7:
        e7, c7, x7 = _exact(p7, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    if L > 8:
        e8, c8, x8 = _exact(p8, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    if L > 9:
        e9, c9, x9 = _exact(p9, base, rmask, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                        SOFTMAX_KEYS, SHIFT)
    # sure of the set: the first K packed entries beat every key outside the list
    pk = _nth(K - 1, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9)
    pl = _nth(L - 1, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9)
    sure = (pl >> SHIFT) < (pk >> SHIFT)
    for _ in tl.static_range(2):  # 4 passes (even, odd, even, odd): any run of <= 4 sorts
        e0, c0, x0, e1, c1, x1 = _ce(e0, c0, x0, e1, c1, x1)
        if L > 3:
            e2, c2, x2, e3, c3, x3 = _ce(e2, c2, x2, e3, c3, x3)
        if L > 5:
            e4, c4, x4, e5, c5, x5 = _ce(e4, c4, x4, e5, c5, x5)
        if L > 7:
            e6, c6, x6, e7, c7, x7 = _ce(e6, c6, x6, e7, c7, x7)
        if L > 9:
            e8, c8, x8, e9, c9, x9 = _ce(e8, c8, x8, e9, c9, x9)
        e1, c1, x1, e2, c2, x2 = _ce(e1, c1, x1, e2, c2, x2)
        if L > 4:
            e3, c3, x3, e4, c4, x4 = _ce(e3, c3, x3, e4, c4, x4)
        if L > 6:
            e5, c5, x5, e6, c6, x6 = _ce(e5, c5, x5, e6, c6, x6)
        if L > 8:
            e7, c7, x7, e8, c8, x8 = _ce(e7, c7, x7, e8, c8, x8)
    # sure of the order: the list came out sorted
    sure = sure & _before(e0, c0, e1, c1) & _before(e1, c1, e2, c2)
    if L > 3:
        sure = sure & _before(e2, c2, e3, c3)
    if L > 4:
        sure = sure & _before(e3, c3, e4, c4)
    if L > 5:
        sure = sure & _before(e4, c4, e5, c5)
    if L > 6:
        sure = sure & _before(e5, c5, e6, c6)
    if L > 7:
        sure = sure & _before(e6, c6, e7, c7)
    if L > 8:
        sure = sure & _before(e7, c7, e8, c8)
    if L > 9:
        sure = sure & _before(e8, c8, e9, c9)
    return c0, c1, c2, c3, c4, c5, c6, c7, x0, x1, x2, x3, x4, x5, x6, x7, sure


@triton.jit
def _step8(xa, xb, col, bias_ptr, m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9,
           E: tl.constexpr, L: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
           KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr, KEYS_FIRST: tl.constexpr,
           EVEN: tl.constexpr, SHIFT: tl.constexpr, NET: tl.constexpr):
    """8 columns (xa, xb: [BT, H, 4] each, from col) of the packed pass: the softmax
    statistics (NEED_MS) and the keys into the list (KEYS_FIRST). Returns (m, s, p0..p9)."""
    if NEED_MS:
        m_new = tl.maximum(m, tl.max(xa, axis=2))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xa - m_new[:, :, None]), axis=2)
        m = m_new
        m_new = tl.maximum(m, tl.max(xb, axis=2))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xb - m_new[:, :, None]), axis=2)
        m = m_new
    if KEYS_FIRST:
        ka = _packed_keys(xa, col, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS, False,
                          EVEN, SHIFT)
        kb = _packed_keys(xb, col + 4, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS, False,
                          EVEN, SHIFT)
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _push8(
            ka, kb, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L, NET)
    return m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9


@triton.jit
def _select_packed(
    base, rmask, bias_ptr, BT: tl.constexpr,
    E: tl.constexpr, K: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr,
    NEED_MS: tl.constexpr, STAGES: tl.constexpr, SHIFT: tl.constexpr,
    EXACT_PACK: tl.constexpr, NET: tl.constexpr,
):
    """_select_rows with packed keys (see above). Returns (ids [BT] x 8, their logits [BT] x 8
    (gathered by the finishing; zeros with EXACT_PACK), m [BT], s [BT], unsure [BT]: the real
    tokens the exact insertion must decide)."""
    L: tl.constexpr = K if EXACT_PACK else K + 2
    EVEN: tl.constexpr = E == H * EH
    hcol = (tl.arange(0, H) * EH)[None, :]  # [1, H] first column of each thread group
    neg = tl.full([BT, H], _INT32_MIN, tl.int32)
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = neg, neg, neg, neg, neg, neg, neg, neg, neg, neg
    m = tl.full([BT, H], -3.0e38, tl.float32)
    s = tl.zeros([BT, H], tl.float32)
    KEYS_FIRST: tl.constexpr = KEY_LOGITS or SIGMOID
    # padding rows point at a real row (the callers clamp base): no row mask, no select
    every = tl.full([BT], 1, tl.int1)
    if STAGES == 0:  # the next 16 columns load into registers while these are sorted
        ya = _load4(base, every, hcol[:, :, None], E, EVEN)
        yb = _load4(base, every, hcol[:, :, None] + 4, E, EVEN)
        yc = _load4(base, every, hcol[:, :, None] + 8, E, EVEN)
        yd = _load4(base, every, hcol[:, :, None] + 12, E, EVEN)
        for c in tl.range(0, EH, 16, num_stages=1):
            xa, xb, xc, xd = ya, yb, yc, yd
            nxt = (hcol + tl.minimum(c + 16, EH - 16))[:, :, None]  # the last step: itself
            ya = _load4(base, every, nxt, E, EVEN)
            yb = _load4(base, every, nxt + 4, E, EVEN)
            yc = _load4(base, every, nxt + 8, E, EVEN)
            yd = _load4(base, every, nxt + 12, E, EVEN)
            m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _step8(
                xa, xb, hcol + c, bias_ptr, m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, E, L,
                SIGMOID, HAS_BIAS, KEY_LOGITS, NEED_MS, KEYS_FIRST, EVEN, SHIFT, NET)
            m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _step8(
                xc, xd, hcol + c + 8, bias_ptr, m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, E,
                L, SIGMOID, HAS_BIAS, KEY_LOGITS, NEED_MS, KEYS_FIRST, EVEN, SHIFT, NET)
    else:  # software-pipelined by Triton (cp.async through shared memory)
        for c in tl.range(0, EH, 16, num_stages=STAGES):
            for h in tl.static_range(2):  # 8 columns at a time: two loads of 4
                col = hcol + c + 8 * h
                xa = _load4(base, every, col[:, :, None], E, EVEN)
                xb = _load4(base, every, col[:, :, None] + 4, E, EVEN)
                m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _step8(
                    xa, xb, col, bias_ptr, m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, E, L,
                    SIGMOID, HAS_BIAS, KEY_LOGITS, NEED_MS, KEYS_FIRST, EVEN, SHIFT, NET)
    m, s = _group_stats(m, s, NEED_MS)
    if not KEYS_FIRST:  # softmax scores + bias: a second pass once the normaliser is known
        mh = tl.broadcast_to(m[:, None], [BT, H])
        sh = tl.broadcast_to(s[:, None], [BT, H])
        for c in range(0, EH, 8):
            col = hcol + c
            xa = _load4(base, every, col[:, :, None], E, EVEN)
            xb = _load4(base, every, col[:, :, None] + 4, E, EVEN)
            ka = _packed_keys(xa, col, bias_ptr, mh, sh, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                              True, EVEN, SHIFT)
            kb = _packed_keys(xb, col + 4, bias_ptr, mh, sh, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                              True, EVEN, SHIFT)
            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _push8(
                ka, kb, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L, NET)
    if NET:
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _cut(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L)
    if H == 4:  # [BT, 4] -> [BT, 2, 2]: merge groups (0, 1) and (2, 3)
        p0, p1, p2 = (tl.reshape(p0, [BT, 2, 2]), tl.reshape(p1, [BT, 2, 2]),
                      tl.reshape(p2, [BT, 2, 2]))
        p3, p4, p5 = (tl.reshape(p3, [BT, 2, 2]), tl.reshape(p4, [BT, 2, 2]),
                      tl.reshape(p5, [BT, 2, 2]))
        p6, p7, p8 = (tl.reshape(p6, [BT, 2, 2]), tl.reshape(p7, [BT, 2, 2]),
                      tl.reshape(p8, [BT, 2, 2]))
        p9 = tl.reshape(p9, [BT, 2, 2])
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _merge_packed(
            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L, NET)
    if H >= 2:
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 = _merge_packed(
            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, L, NET)
    else:
        p0, p1, p2 = tl.reshape(p0, [BT]), tl.reshape(p1, [BT]), tl.reshape(p2, [BT])
        p3, p4, p5 = tl.reshape(p3, [BT]), tl.reshape(p4, [BT]), tl.reshape(p5, [BT])
        p6, p7, p8 = tl.reshape(p6, [BT]), tl.reshape(p7, [BT]), tl.reshape(p8, [BT])
        p9 = tl.reshape(p9, [BT])
    if EXACT_PACK:  # nothing was cut: the packed order is the exact one
        LOW: tl.constexpr = (1 << SHIFT) - 1
        nil = tl.zeros([BT], tl.float32)  # the logits: gathered by the caller
        return (LOW - (p0 & LOW), LOW - (p1 & LOW), LOW - (p2 & LOW), LOW - (p3 & LOW),
                LOW - (p4 & LOW), LOW - (p5 & LOW), LOW - (p6 & LOW), LOW - (p7 & LOW),
                nil, nil, nil, nil, nil, nil, nil, nil, m, s, rmask != rmask)
    i0, i1, i2, i3, i4, i5, i6, i7, x0, x1, x2, x3, x4, x5, x6, x7, sure = _finish(
        base, rmask, bias_ptr, m, s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, K, E, SIGMOID,
        HAS_BIAS, KEY_LOGITS,
        not KEYS_FIRST, SHIFT)
    return (i0, i1, i2, i3, i4, i5, i6, i7, x0, x1, x2, x3, x4, x5, x6, x7, m, s,
            rmask & (sure == 0))


@triton.jit
def _weights(xs, valid, m, s, scale, SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr,
             RENORM: tl.constexpr, NEED_MS: tl.constexpr):
    """Combine weights [BT, KP] from the selected logits xs (valid: real slots), as the
    reference computes them (gating.select_token_choice)."""
    if SOFTMAX_AFTER or (not SIGMOID and not NEED_MS):
        # softmax over the selected logits; with renormalisation this equals the renormalised
        # full-softmax scores (the full normaliser cancels)
        xm = tl.where(valid, xs, float("-inf"))
        mk = tl.max(xm, axis=1)
        ek = tl.where(valid, tl.exp(xm - mk[:, None]), 0.0)
        w = _div(ek, tl.sum(ek, axis=1)[:, None])
    else:
        if SIGMOID:
            p = 1.0 / (1.0 + tl.exp(-xs))
        else:
            p = _div(tl.exp(xs - m[:, None]), s[:, None])
        w = tl.where(valid, p, 0.0)
        if RENORM:
            w = _div(w, (tl.sum(w, axis=1) + 1e-20)[:, None])
    return w * scale


@triton.jit
def _onehot_word(i, rmask, wc):
    """[W, BT]: token t's expert i[t] as a one in field i%4 of word i//4 (0 for masked tokens)."""
    hit = (wc == (i >> 2)[None, :]) & rmask[None, :]
    return tl.where(hit, (1 << ((i & 3) * 8))[None, :], 0)


@triton.jit
def _field(excl, i, wc):
    """[BT]: field i%4 of word i//4 of each token's column of excl [W, BT] (a masked sum down
    the column, in registers)."""
    word = tl.sum(tl.where(wc == (i >> 2)[None, :], excl, 0), axis=0)
    return (word >> ((i & 3) * 8)) & 255


@triton.jit
def _token_ranks(rmask, i0, i1, i2, i3, i4, i5, i6, i7, K: tl.constexpr, KP: tl.constexpr,
                 W: tl.constexpr):
    """Rank of each selected slot among the tile's earlier tokens, and the tile's counts.

    i0..i7 [BT]: the experts of each choice (a token's are distinct), rmask [BT] the real
    tokens. Each token becomes a column of W int32 words of four 8-bit fields (field e%4 of word
    e//4 holds 1 if the token chose expert e); an exclusive cumsum of the columns along the tile
    gives, in field e of column t, how many earlier tokens chose e. A token takes an expert once
    and a tile holds at most 128 tokens, so no field carries. The table is [W, BT], not [BT, W]:
    Triton then lays the tokens along the lanes and a token's words in its thread's registers
    (the other way round each thread holds every token's ids: ptxas spilled). Returns (rank
    [BT, KP], words [W]: the tile's counts, packed the same way)."""
    wc = tl.arange(0, W)[:, None]
    row = _onehot_word(i0, rmask, wc)
    if K > 1:
        row += _onehot_word(i1, rmask, wc)
    if K > 2:
        row += _onehot_word(i2, rmask, wc)
    if K > 3:
        row += _onehot_word(i3, rmask, wc)
    if K > 4:
        row += _onehot_word(i4, rmask, wc)
    if K > 5:
        row += _onehot_word(i5, rmask, wc)
    if K > 6:
        row += _onehot_word(i6, rmask, wc)
    if K > 7:
        row += _onehot_word(i7, rmask, wc)
    excl = tl.cumsum(row, axis=1) - row
    r0 = _field(excl, i0, wc)
    r1, r2, r3, r4, r5, r6, r7 = r0, r0, r0, r0, r0, r0, r0
    if K > 1:
        r1 = _field(excl, i1, wc)
    if K > 2:
        r2 = _field(excl, i2, wc)
    if K > 3:
        r3 = _field(excl, i3, wc)
    if K > 4:
        r4 = _field(excl, i4, wc)
    if K > 5:
        r5 = _field(excl, i5, wc)
    if K > 6:
        r6 = _field(excl, i6, wc)
    if K > 7:
        r7 = _field(excl, i7, wc)
    return _stack(r0, r1, r2, r3, r4, r5, r6, r7, KP), tl.sum(row, axis=1)


# ----------------------------------------------------------------------------------------------
# bit-transposed ranks (one thread a token, E <= 128)
# ----------------------------------------------------------------------------------------------
# With one thread a token (the prefill default at E <= 128) a token's choices fit a 128-bit
# membership mask: word w (w < 4) holds bit b for expert 32w + b. The tile is seen as R rows of
# 32 tokens (a row is a warp). Each row's 32 x 32 bit blocks are transposed across its lanes in
# five butterfly stages (tl.gather of a lane's partner: one SHFL each on sm_90), after which lane
# b of word w holds L = the row's tokens that chose expert 32w + b, one bit a token. A slot's rank
# in the tile is then popc(L & (bits below its token)) with L fetched from lane e % 32 (one more
# shuffle per word), plus the counts of e in the earlier rows (a cumsum over the R rows of
# popc(L)); the tile's count of e is the sum of popc(L) over the rows. About 300 instructions a
# token at K=8 against ~3,000 for the one-hot table of packed 8-bit counts (_token_ranks).


@triton.jit
def _popc(x):
    """Set bits of each int32 (SWAR; LLVM turns the pattern into one POPC)."""
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _butterfly(x, lane, S: tl.constexpr, M: tl.constexpr):
    """One stage of the 32 x 32 bit transpose along axis 1 of x [R, 32]: lanes t and t ^ S swap
    the S-bit blocks in which their bit and lane indices disagree (M: the blocks whose bit
    index has bit S clear; its complement is M << S)."""
    o = tl.gather(x, tl.broadcast_to(lane ^ S, x.shape), axis=1)
    xu = x.to(tl.uint32, bitcast=True)
    ou = o.to(tl.uint32, bitcast=True)
    low = (xu & M) | ((ou & M) << S)
    high = (((xu >> S) & M) << S) | ((ou >> S) & M)
    return tl.where((lane & S) != 0, high, low).to(tl.int32, bitcast=True)


@triton.jit
def _transpose32(x, lane):
    """[R, 32] int32 -> [R, 32]: bit t of element (r, b) = bit b of element (r, t)."""
    x = _butterfly(x, lane, 16, 0x0000FFFF)
    x = _butterfly(x, lane, 8, 0x00FF00FF)
    x = _butterfly(x, lane, 4, 0x0F0F0F0F)
    x = _butterfly(x, lane, 2, 0x33333333)
    return _butterfly(x, lane, 1, 0x55555555)


@triton.jit
def _member_word(i, rmask, w: tl.constexpr):
    """Bit i % 32 if choice i falls in word w (and the token is real), else 0."""
    return tl.where(((i >> 5) == w) & rmask, 1 << (i & 31), 0)


@triton.jit
def _chosen_by(rmask, i0, i1, i2, i3, i4, i5, i6, i7, K: tl.constexpr, w: tl.constexpr, lane):
    """Word w of each row's transposed membership [R, 32]: element (r, b) = the tokens of row r
    that chose expert 32w + b, and their popcount (the row's count of that expert)."""
    m = _member_word(i0, rmask, w)
    if K > 1:
        m |= _member_word(i1, rmask, w)
    if K > 2:
        m |= _member_word(i2, rmask, w)
    if K > 3:
        m |= _member_word(i3, rmask, w)
    if K > 4:
        m |= _member_word(i4, rmask, w)
    if K > 5:
        m |= _member_word(i5, rmask, w)
    if K > 6:
        m |= _member_word(i6, rmask, w)
    if K > 7:
        m |= _member_word(i7, rmask, w)
    bits = _transpose32(m, lane)
    return bits, _popc(bits)


@triton.jit
def _earlier_rows(c, R: tl.constexpr):
    """Counts in the earlier rows (exclusive cumsum down axis 0 of [R, 32])."""
    if R > 1:
        return tl.cumsum(c, axis=0) - c
    return tl.zeros_like(c)


@triton.jit
def _word_rank(i, w: tl.constexpr, bits, before, below, rank, R: tl.constexpr):
    """The rank of choice i [R, 32] where its expert falls in word w."""
    src = i & 31
    r = _popc(tl.gather(bits, src, axis=1) & below)
    if R > 1:
        r += tl.gather(before, src, axis=1)
    return tl.where((i >> 5) == w, r, rank)


@triton.jit
def _lane_rank(i, below, b0, b1, b2, b3, p0, p1, p2, p3, NW: tl.constexpr, R: tl.constexpr):
    """Rank of choice i [R, 32] of each token among the tile's earlier tokens."""
    rank = _word_rank(i, 0, b0, p0, below, i, R)
    if NW > 1:
        rank = _word_rank(i, 1, b1, p1, below, rank, R)
    if NW > 2:
        rank = _word_rank(i, 2, b2, p2, below, rank, R)
    if NW > 3:
        rank = _word_rank(i, 3, b3, p3, below, rank, R)
    return rank


@triton.jit
def _lane_ranks(rmask, i0, i1, i2, i3, i4, i5, i6, i7, hist_ptr, K: tl.constexpr,
                KP: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr, BT: tl.constexpr):
    """Bit-transposed ranks of a tile of BT = 32 R tokens (E <= 128): returns rank [BT, KP] and
    stores the tile's expert counts to hist_ptr[0:BLOCK_E] (zeros past E)."""
    R: tl.constexpr = BT // 32
    NW: tl.constexpr = (E + 31) // 32
    lane = tl.arange(0, 32)[None, :]
    rm = tl.reshape(rmask, [R, 32])
    i0 = tl.reshape(i0, [R, 32])
    i1 = tl.reshape(i1, [R, 32])
    i2 = tl.reshape(i2, [R, 32])
    i3 = tl.reshape(i3, [R, 32])
    i4 = tl.reshape(i4, [R, 32])
    i5 = tl.reshape(i5, [R, 32])
    i6 = tl.reshape(i6, [R, 32])
    i7 = tl.reshape(i7, [R, 32])
    b0, c0 = _chosen_by(rm, i0, i1, i2, i3, i4, i5, i6, i7, K, 0, lane)
    b1, c1, b2, c2, b3, c3 = b0, c0, b0, c0, b0, c0
    if NW > 1:
        b1, c1 = _chosen_by(rm, i0, i1, i2, i3, i4, i5, i6, i7, K, 1, lane)
    if NW > 2:
        b2, c2 = _chosen_by(rm, i0, i1, i2, i3, i4, i5, i6, i7, K, 2, lane)
    if NW > 3:
        b3, c3 = _chosen_by(rm, i0, i1, i2, i3, i4, i5, i6, i7, K, 3, lane)
    # every column of the tile's count row, zeros past E (the scan sums whole rows)
    col = tl.arange(0, 32)
    zero = tl.zeros([32], tl.int32)
    tl.store(hist_ptr + col, tl.sum(c0, axis=0), mask=col < BLOCK_E)
    if BLOCK_E > 32:
        tl.store(hist_ptr + 32 + col, tl.sum(c1, axis=0) if NW > 1 else zero)
    if BLOCK_E > 64:
        tl.store(hist_ptr + 64 + col, tl.sum(c2, axis=0) if NW > 2 else zero)
        tl.store(hist_ptr + 96 + col, tl.sum(c3, axis=0) if NW > 3 else zero)
    p0, p1 = _earlier_rows(c0, R), _earlier_rows(c1, R)
    p2, p3 = _earlier_rows(c2, R), _earlier_rows(c3, R)
    below = ((1 << lane) - 1).to(tl.int32)
    r0 = _lane_rank(i0, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    r1, r2, r3, r4, r5, r6, r7 = r0, r0, r0, r0, r0, r0, r0
    if K > 1:
        r1 = _lane_rank(i1, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    if K > 2:
        r2 = _lane_rank(i2, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    if K > 3:
        r3 = _lane_rank(i3, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    if K > 4:
        r4 = _lane_rank(i4, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    if K > 5:
        r5 = _lane_rank(i5, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    if K > 6:
        r6 = _lane_rank(i6, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    if K > 7:
        r7 = _lane_rank(i7, below, b0, b1, b2, b3, p0, p1, p2, p3, NW, R)
    return _stack(tl.reshape(r0, [BT]), tl.reshape(r1, [BT]), tl.reshape(r2, [BT]),
                  tl.reshape(r3, [BT]), tl.reshape(r4, [BT]), tl.reshape(r5, [BT]),
                  tl.reshape(r6, [BT]), tl.reshape(r7, [BT]), KP)


@triton.jit
def _layout(counts, cols, C, E: tl.constexpr, CAPACITY: tl.constexpr, PAD: tl.constexpr):
    """(kept [BLOCK_E], starts [BLOCK_E], rows in use) from the routed counts: capacity layout
    e*C with kept = min(count, C), or ragged segments padded to PAD. Padding columns hold 0."""
    if CAPACITY:
        kept = tl.minimum(counts, C)
        starts = cols * C
        total = E * C
    else:
        kept = counts
        padded = (kept + PAD - 1) // PAD * PAD
        starts = tl.cumsum(padded, axis=0) - padded
        total = tl.sum(padded, axis=0)
    return kept, starts, total


@triton.jit
def _empty_rows(r, starts, kept, cols, cmask, R):
    """Which rows r (< R) no slot fills. A row belongs to the last expert whose segment starts
    at or before it, and is empty unless it lies within that expert's kept count (rows past the
    last segment too)."""
    starts_real = tl.where(cmask, starts, 2147483647)
    e_of_r = tl.sum((starts_real[None, :] <= r[:, None]).to(tl.int32), axis=1) - 1
    onehot = cols[None, :] == e_of_r[:, None]  # [rows, BLOCK_E]
    start_r = tl.sum(tl.where(onehot, starts[None, :], 0), axis=1)
    kept_r = tl.sum(tl.where(onehot, kept[None, :], 0), axis=1)
    return (r < R) & (r - start_r >= kept_r)


@triton.jit
def _mark_empty_rows(row_to_slot_ptr, r, starts, kept, cols, cmask, R, BLOCK_R: tl.constexpr):
    """Write -1 to the rows r that no slot fills (filled rows are written by their slots, never
    here)."""
    tl.store(row_to_slot_ptr + r, tl.full([BLOCK_R], -1, tl.int32),
             mask=_empty_rows(r, starts, kept, cols, cmask, R))


@triton.jit
def _place(e, rank, valid, slot, kept, starts, slot_to_row_ptr, row_to_slot_ptr):
    """Rows of the slots: kept iff rank < kept[e]; row = starts[e] + rank. Returns (keep, row)."""
    e = tl.where(valid, e, 0)
    keep = valid & (rank < tl.gather(kept, e, axis=0))
    row = tl.gather(starts, e, axis=0) + rank
    tl.store(slot_to_row_ptr + slot, tl.where(keep, row, -1), mask=valid)
    tl.store(row_to_slot_ptr + row, slot.to(tl.int32), mask=keep)
    return keep, row


@triton.jit
def _copy_rows(x_ptr, out_ptr, src, dst, keep, D, stride_x, BLOCK_D: tl.constexpr,
               EVEN_D: tl.constexpr):
    """out[dst[i]] = x[src[i]] for the rows i where keep (the dispatch of a route's slots)."""
    src_base = x_ptr + src.to(tl.int64)[:, None] * stride_x
    dst_base = out_ptr + dst.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)[None, :]
        m = keep[:, None] if EVEN_D else keep[:, None] & (d < D)
        tl.store(dst_base + d, tl.load(src_base + d, mask=m), mask=m)


@triton.jit
def _zero_rows(out_ptr, r, empty, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """out[r[i]] = 0 for the rows i where empty."""
    base = out_ptr + r.to(tl.int64)[:, None] * D
    zero = tl.zeros([r.shape[0], BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)[None, :]
        m = empty[:, None] if EVEN_D else empty[:, None] & (d < D)
        tl.store(base + d, zero, mask=m)


@triton.jit
def _write_plan(I, rank, valid, slot, counts, kept, starts, total, cols, cmask, counts_ptr,
                kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, R, E: tl.constexpr,
                BT: tl.constexpr, KP: tl.constexpr, CAPACITY: tl.constexpr, PAD: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """The whole plan of a route whose tokens all lie in one tile (ranks final, no prefix)."""
    _place(tl.reshape(I, [BT * KP]), tl.reshape(rank, [BT * KP]), tl.reshape(valid, [BT * KP]),
           tl.reshape(slot, [BT * KP]), kept, starts, slot_to_row_ptr, row_to_slot_ptr)
    tl.store(counts_ptr + cols, counts, mask=cmask)
    tl.store(kept_ptr + cols, kept, mask=cmask)
    tl.store(offsets_ptr + cols, starts, mask=cmask)
    tl.store(offsets_ptr + E, total)
    if CAPACITY or PAD > 1:
        for r0 in range(0, R, BLOCK_R):
            _mark_empty_rows(row_to_slot_ptr, r0 + tl.arange(0, BLOCK_R), starts, kept, cols,
                             cmask, R, BLOCK_R)


@triton.jit
def _select_ids(
    base, rmask, valid, bias_ptr,
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    BT: tl.constexpr, SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr,
    STAGES: tl.constexpr, PACKED: tl.constexpr, SHIFT: tl.constexpr, EXACT_PACK: tl.constexpr,
    TIE_CHECK: tl.constexpr,
):
    """A tile's selection: (ids [BT, KP] (0 in padding), the selected logits [BT, KP] fp32,
    the softmax max and sum [BT] (if NEED_MS), the ids of each choice i0..i7 [BT]). base [BT]:
    each token's logits row, a real row for the padding tokens too (the packed column loop
    loads without a row mask); rmask: the real tokens; valid [BT, KP]: the real slots."""
    if PACKED:
        (i0, i1, i2, i3, i4, i5, i6, i7, x0, x1, x2, x3, x4, x5, x6, x7, m, s,
         unsure) = _select_packed(base, rmask, bias_ptr, BT, E, K, H, EH, SIGMOID, HAS_BIAS,
                                  KEY_LOGITS, NEED_MS, STAGES, SHIFT, EXACT_PACK,
                                  PACKED == 2)
        I = tl.where(valid, _stack(i0, i1, i2, i3, i4, i5, i6, i7, KP), 0)  # [BT, KP]
        if EXACT_PACK:
            xs = tl.load(base[:, None] + I, mask=valid, other=0.0).to(tl.float32)
        else:  # the finishing gathered the selected logits
            xs = _stack(x0, x1, x2, x3, x4, x5, x6, x7, KP)
            if TIE_CHECK:
                if tl.max(unsure.to(tl.int32), axis=0) != 0:  # the exact insertion decides
                    i0, i1, i2, i3, i4, i5, i6, i7, m, s = _select_rows(
                        base, rmask, bias_ptr, BT, E, K, H, EH, SIGMOID, SOFTMAX_AFTER, RENORM,
                        HAS_BIAS, KEY_LOGITS, NEED_MS, 1, 1)
                    I = tl.where(valid, _stack(i0, i1, i2, i3, i4, i5, i6, i7, KP), 0)
                    xs = tl.load(base[:, None] + I, mask=valid, other=0.0).to(tl.float32)
    else:
        i0, i1, i2, i3, i4, i5, i6, i7, m, s = _select_rows(
            base, rmask, bias_ptr, BT, E, K, H, EH, SIGMOID, SOFTMAX_AFTER, RENORM, HAS_BIAS,
            KEY_LOGITS, NEED_MS, STAGES)
        I = tl.where(valid, _stack(i0, i1, i2, i3, i4, i5, i6, i7, KP), 0)  # [BT, KP]
        xs = tl.load(base[:, None] + I, mask=valid, other=0.0).to(tl.float32)
    return I, xs, m, s, i0, i1, i2, i3, i4, i5, i6, i7


@triton.jit
def _select_tile(
    pid,
    logits_ptr,  # (T, E) fp32/bf16/fp16, row stride stride_t, unit column stride
    bias_ptr,  # (E,) selection bias; read only if HAS_BIAS
    ids_ptr,  # (T, K) int32 out
    weights_ptr,  # (T, K) fp32 out
    hist_ptr,  # (NT, BLOCK_E) int32 out: each tile's expert counts (if not FUSED_PLAN)
    counts_ptr, kept_ptr, offsets_ptr,  # (E,), (E,), (E+1,) int32 out (FUSED_PLAN)
    slot_to_row_ptr,  # (T*K,) int32 out: rows if FUSED_PLAN, else the ranks inside the tile
    row_to_slot_ptr,  # (R,) int32 out (FUSED_PLAN)
    T, stride_t, scale, C, R,
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    BT: tl.constexpr, BLOCK_E: tl.constexpr, W: tl.constexpr,
    SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr,
    STAGES: tl.constexpr,  # software-pipelining stages of the column loop
    PACKED: tl.constexpr, SHIFT: tl.constexpr,  # packed-key selection, index bits
    EXACT_PACK: tl.constexpr,  # the keys' low SHIFT bits are zero: packing cuts nothing
    TIE_CHECK: tl.constexpr,  # near ties go to the exact insertion (off only in a test)
    FUSED_PLAN: tl.constexpr,  # one tile holds every token: build the whole plan here
    LANE_RANKS: tl.constexpr,  # bit-transposed ranks (one thread a token, E <= 128)
    CAPACITY: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per tile of BT tokens (H threads per token): selection, weights, ids, each
    slot's rank inside the tile (into slot_to_row) and the tile's expert counts; with FUSED_PLAN
    (T <= BT) the whole plan as well."""
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    # rows past T read row T - 1 (_select_ids: the column loop loads without a row mask)
    base = logits_ptr + tl.minimum(rows, T - 1).to(tl.int64) * stride_t
    kc = tl.arange(0, KP)[None, :]
    valid = rmask[:, None] & (kc < K)
    slot = rows.to(tl.int64)[:, None] * K + kc
    I, xs, m, s, i0, i1, i2, i3, i4, i5, i6, i7 = _select_ids(
        base, rmask, valid, bias_ptr, E, K, KP, H, EH, BT, SIGMOID, SOFTMAX_AFTER, RENORM,
        HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT, EXACT_PACK, TIE_CHECK)
    tl.store(ids_ptr + slot, I, mask=valid)
    tl.store(weights_ptr + slot, _weights(xs, valid, m, s, scale, SIGMOID, SOFTMAX_AFTER,
                                          RENORM, NEED_MS), mask=valid)
    if LANE_RANKS:  # H == 1, E <= 128, not FUSED_PLAN: the tile counts go to hist here
        rank = _lane_ranks(rmask, i0, i1, i2, i3, i4, i5, i6, i7, hist_ptr + pid * BLOCK_E,
                           K, KP, E, BLOCK_E, BT)
        tl.store(slot_to_row_ptr + slot, rank, mask=valid)
    else:
        rank, words = _token_ranks(rmask, i0, i1, i2, i3, i4, i5, i6, i7, K, KP, W)
        cols = tl.arange(0, BLOCK_E)
        cmask = cols < E
        counts = (tl.gather(words, cols >> 2, axis=0) >> ((cols & 3) * 8)) & 255
        if FUSED_PLAN:  # every token is this tile's: the ranks are final, no prefix
            kept, starts, total = _layout(counts, cols, C, E, CAPACITY, PAD)
            _write_plan(I, rank, valid, slot, counts, kept, starts, total, cols, cmask,
                        counts_ptr, kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, R,
                        E, BT, KP, CAPACITY, PAD, BLOCK_R)
        else:  # the rank inside the tile goes to slot_to_row; _place_slots_kernel adds the prefix
            tl.store(hist_ptr + pid * BLOCK_E + cols, counts)
            tl.store(slot_to_row_ptr + slot, rank, mask=valid)


@triton.jit
def _select_rows_kernel(
    logits_ptr,  # (T, E) fp32/bf16/fp16, row stride stride_t, unit column stride
    bias_ptr,  # (E,) selection bias; read only if HAS_BIAS
    ids_ptr,  # (T, K) int32 out
    weights_ptr,  # (T, K) fp32 out
    hist_ptr,  # (NT, BLOCK_E) int32 out: each tile's expert counts (if not FUSED_PLAN)
    counts_ptr, kept_ptr, offsets_ptr,  # (E,), (E,), (E+1,) int32 out (FUSED_PLAN)
    slot_to_row_ptr,  # (T*K,) int32 out: rows if FUSED_PLAN, else the ranks inside the tile
    row_to_slot_ptr,  # (R,) int32 out (FUSED_PLAN)
    T, stride_t, scale, C, R,
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    BT: tl.constexpr, BLOCK_E: tl.constexpr, W: tl.constexpr,
    SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr,
    STAGES: tl.constexpr,  # software-pipelining stages of the column loop
    PACKED: tl.constexpr, SHIFT: tl.constexpr,  # packed-key selection, index bits
    EXACT_PACK: tl.constexpr,  # the keys' low SHIFT bits are zero: packing cuts nothing
    TIE_CHECK: tl.constexpr,  # near ties go to the exact insertion (off only in a test)
    FUSED_PLAN: tl.constexpr,  # one tile holds every token: build the whole plan here
    LANE_RANKS: tl.constexpr,  # bit-transposed ranks (one thread a token, E <= 128)
    CAPACITY: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,  # a programmatic dependent launch follows
):
    """One program per tile of BT tokens (see _select_tile)."""
    if PDL:  # the next launch may start now; it waits for this grid's end (_pdl_start)
        tl.extra.cuda.gdc_launch_dependents()
    _select_tile(tl.program_id(0), logits_ptr, bias_ptr, ids_ptr, weights_ptr, hist_ptr,
                 counts_ptr, kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, T,
                 stride_t, scale, C, R, E, K, KP, H, EH, BT, BLOCK_E, W, SIGMOID,
                 SOFTMAX_AFTER, RENORM, HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT,
                 EXACT_PACK, TIE_CHECK, FUSED_PLAN, LANE_RANKS, CAPACITY, PAD, BLOCK_R)


# ---------------------------------------------------------------------------------------------
# Programmatic dependent launch (sm_90): the scan and place kernels are launched with the PDL
# attribute, so the GPU starts their programs while the previous kernel still runs (after it
# called gdc_launch_dependents); each first waits (griddepcontrol.wait) until that kernel has
# finished and its writes are visible, so nothing is read or written early. The select kernel
# itself is launched plainly: it must not overlap whatever ran before it on the stream. In a
# CUDA graph this hides most of a kernel boundary. The interpreter never sees these (PDL is
# off there).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scan_cols(c, hist_ptr, prefix_ptr, total_ptr, NT, BLOCK_E: tl.constexpr, BC: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """Exclusive scan of the tile counts of expert columns [c*BC, c*BC + BC) down the tiles, in
    a fixed order. Loads bypass L1 (.cg): in the one-launch route other programs wrote hist."""
    cols = c * BC + tl.arange(0, BC)
    run = tl.zeros([BC], tl.int32)
    for p0 in range(0, NT, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        msk = (p < NT)[:, None]
        h = tl.load(hist_ptr + p[:, None] * BLOCK_E + cols[None, :], mask=msk, other=0,
                    cache_modifier=".cg")
        tl.store(prefix_ptr + p[:, None] * BLOCK_E + cols[None, :],
                 tl.cumsum(h, axis=0) - h + run[None, :], mask=msk)
        run += tl.sum(h, axis=0)
    tl.store(total_ptr + cols, run)


@triton.jit
def _scan_tiles_kernel(
    hist_ptr,  # (NT, BLOCK_E) int32 tile counts
    prefix_ptr,  # (NT, BLOCK_E) int32 out: counts of the earlier tiles
    total_ptr,  # (BLOCK_E,) int32 out: counts of all tiles
    NT, BLOCK_E: tl.constexpr, BC: tl.constexpr, BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent of the select kernel
):
    """Exclusive scan of the tile counts down the tiles, BC expert columns per program (O(NT*E)
    work in all)."""
    _pdl_start(PDL)  # the dependent's first step (_rowmap)
    _scan_cols(tl.program_id(0), hist_ptr, prefix_ptr, total_ptr, NT, BLOCK_E, BC, BLOCK_P)


@triton.jit
def _plan_totals(prefix_ptr, total_ptr, counts_ptr, kept_ptr, offsets_ptr, pid, NT, C,
                 E: tl.constexpr, BLOCK_E: tl.constexpr, CAPACITY: tl.constexpr,
                 PAD: tl.constexpr, SUM_TILES: tl.constexpr, NTP: tl.constexpr):
    """Every place program's view of the plan: (kept, starts, before). The expert totals come
    from the scan, or with SUM_TILES from this program's own scan of the tile counts (held in
    registers, [NTP, BLOCK_E]; `before` then holds every tile's prefix). Program 0 writes the
    counts, kept counts and offsets."""
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    if SUM_TILES:
        q = tl.arange(0, NTP)
        h = tl.load(prefix_ptr + q[:, None] * BLOCK_E + cols[None, :], mask=(q < NT)[:, None],
                    other=0, cache_modifier=".cg")
        total = tl.sum(h, axis=0)
        before = tl.reshape(tl.cumsum(h, axis=0) - h, [NTP * BLOCK_E])
    else:
        total = tl.load(total_ptr + cols, cache_modifier=".cg")
        before = total  # unused
    kept, starts, used = _layout(total, cols, C, E, CAPACITY, PAD)
    if pid == 0:
        tl.store(counts_ptr + cols, total, mask=cmask)
        tl.store(kept_ptr + cols, kept, mask=cmask)
        tl.store(offsets_ptr + cols, starts, mask=cmask)
        tl.store(offsets_ptr + E, used)
    return kept, starts, before


@triton.jit
def _place_block(b, ids_ptr, prefix_ptr, slot_to_row_ptr, row_to_slot_ptr, kept, starts, before,
                 N, NP, R, x_ptr, out_ptr, D, stride_x, E: tl.constexpr, BT: tl.constexpr,
                 K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_R: tl.constexpr, SUM_TILES: tl.constexpr, DISPATCH: tl.constexpr,
                 BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Block b < NP: BLOCK_S slots, elementwise: rank = the earlier tiles' count + the rank in
    the tile; kept iff rank < kept[e]; row = start of the expert + rank. Blocks >= NP mark
    BLOCK_R empty rows each (capacity or padded layouts only). With DISPATCH also the rows of
    the dispatch: x[token] copied to each kept slot's row, zeros to the empty rows."""
    if b < NP:
        slot = b.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        valid = slot < N
        e = tl.load(ids_ptr + slot, mask=valid, other=0, cache_modifier=".cg")
        rank = tl.load(slot_to_row_ptr + slot, mask=valid, other=0, cache_modifier=".cg")
        at = tl.where(valid, slot // (BT * K) * BLOCK_E + e, 0)
        if SUM_TILES:
            rank += tl.gather(before, at.to(tl.int32), axis=0)
        else:
            rank += tl.load(prefix_ptr + at, mask=valid, other=0, cache_modifier=".cg")
        keep, row = _place(e, rank, valid, slot, kept, starts, slot_to_row_ptr, row_to_slot_ptr)
        if DISPATCH:
            _copy_rows(x_ptr, out_ptr, slot // K, row, keep, D, stride_x, BLOCK_D, EVEN_D)
    else:
        cols = tl.arange(0, BLOCK_E)
        r = (b - NP) * BLOCK_R + tl.arange(0, BLOCK_R)
        empty = _empty_rows(r, starts, kept, cols, cols < E, R)
        tl.store(row_to_slot_ptr + r, tl.full([BLOCK_R], -1, tl.int32), mask=empty)
        if DISPATCH:
            _zero_rows(out_ptr, r, empty, D, BLOCK_D, EVEN_D)


@triton.jit
def _place_slots_kernel(
    ids_ptr,  # (T*K,) int32 experts of the slots
    prefix_ptr,  # (NT, BLOCK_E) int32: counts of the earlier tiles; the tiles' own counts if
                 # SUM_TILES (this kernel then scans them itself)
    total_ptr,  # (BLOCK_E,) int32 counts of all tiles (unused if SUM_TILES)
    counts_ptr, kept_ptr, offsets_ptr,  # (E,), (E,), (E+1,) int32 out (program 0)
    slot_to_row_ptr,  # (T*K,) int32 in: rank inside the slot's tile; out: the slot's row
    row_to_slot_ptr,  # (R,) int32 out
    N, NP, NT, C, R,
    x_ptr, out_ptr, D, stride_x,  # DISPATCH: tokens (T, D) in, rows (R, D) out
    E: tl.constexpr, BT: tl.constexpr, K: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr, CAPACITY: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    SUM_TILES: tl.constexpr, NTP: tl.constexpr,  # few tiles (NTP >= NT): no scan launch
    PDL: tl.constexpr,  # launched as a programmatic dependent of the previous kernel
    DISPATCH: tl.constexpr = False,  # also the dispatch of x into the rows (decode sizes)
    BLOCK_D: tl.constexpr = 16, EVEN_D: tl.constexpr = True,
):
    """Programs < NP place BLOCK_S slots each, programs >= NP mark empty rows (_place_block).
    With SUM_TILES every program scans the tile counts itself: at decode sizes that is cheaper
    than a scan launch."""
    _pdl_start(PDL)  # the dependent's first step (_rowmap)
    pid = tl.program_id(0)
    kept, starts, before = _plan_totals(prefix_ptr, total_ptr, counts_ptr, kept_ptr, offsets_ptr,
                                        pid, NT, C, E, BLOCK_E, CAPACITY, PAD, SUM_TILES, NTP)
    _place_block(pid, ids_ptr, prefix_ptr, slot_to_row_ptr, row_to_slot_ptr, kept, starts,
                 before, N, NP, R, x_ptr, out_ptr, D, stride_x, E, BT, K, BLOCK_S, BLOCK_E,
                 BLOCK_R, SUM_TILES, DISPATCH, BLOCK_D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# One launch: select, grid barrier, scan, grid barrier, place
#
# The three launches above cost a kernel boundary each (~1-2 us in a CUDA graph, ~20-30 us of
# host time eagerly). When every program of a grid is resident at once (a cooperative launch:
# the driver refuses a grid that is not), the kernel boundaries can be grid barriers instead:
# the same bodies run in one kernel, each program looping over tiles, scan columns and place
# blocks with a stride of the grid size. The barrier is one counter per route state, never
# reset: program 0 adds 2^31 - (G - 1), every other program adds 1, so the sum of one barrier's
# arrivals is 2^31: the sign bit flips exactly when the last program arrives, and the low bits
# are back where they were (the next barrier, and the next launch of any grid size, start
# clean). A program waits for the sign bit to differ from the one it saw when it arrived. The
# arrival is a release (the program's hist, ids and rank stores reach L2 before it counts) and
# the wait an acquire; the loads after a barrier also skip L1 (.cg). The interpreter runs
# programs one after another, so the barrier can only run on a GPU: CI tests the same bodies
# through the three launches, the GPU script through both.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grid_sync(sync_ptr):
    """Wait until every program of the grid has arrived (a cooperative launch)."""
    g = tl.num_programs(0)  # >= 2 (the launcher's rule): 2^31 - (g - 1) fits an int32
    add = tl.where(tl.program_id(0) == 0, 2147483647 - (g - 2), 1)
    seen = tl.atomic_add(sync_ptr, add, sem="release")
    now = tl.atomic_add(sync_ptr, 0, sem="acquire")
    while (seen ^ now) >= 0:
        now = tl.atomic_add(sync_ptr, 0, sem="acquire")


@triton.jit(do_not_specialize=["T", "C", "R", "NT", "N", "NP", "NPR", "NC"])
def _route_sync_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, hist_ptr,  # as _select_rows_kernel
    counts_ptr, kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr,
    prefix_ptr, total_ptr,  # as _scan_tiles_kernel (prefix_ptr = hist_ptr if SUM_TILES)
    sync_ptr,  # (1,) int32 barrier counter, low 31 bits zero between launches
    T, stride_t, scale, C, R,
    NT, N, NP, NPR, NC,  # tiles, slots, place blocks, place + mark blocks, scan column blocks
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    BT: tl.constexpr, BLOCK_E: tl.constexpr, W: tl.constexpr,
    SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr,
    STAGES: tl.constexpr, PACKED: tl.constexpr, SHIFT: tl.constexpr, EXACT_PACK: tl.constexpr,
    TIE_CHECK: tl.constexpr, LANE_RANKS: tl.constexpr,
    CAPACITY: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    BC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    SUM_TILES: tl.constexpr, NTP: tl.constexpr,
    ONE_TILE: tl.constexpr,  # NT == the grid size: program i selects tile i
):
    """The three launches of the route in one cooperative launch (see the section comment)."""
    pid = tl.program_id(0)
    g = tl.num_programs(0)
    if ONE_TILE:
        _select_tile(pid, logits_ptr, bias_ptr, ids_ptr, weights_ptr, hist_ptr, counts_ptr,
                     kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, T, stride_t,
                     scale, C, R, E, K, KP, H, EH, BT, BLOCK_E, W, SIGMOID, SOFTMAX_AFTER,
                     RENORM, HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT, EXACT_PACK,
                     TIE_CHECK, False, LANE_RANKS, CAPACITY, PAD, BLOCK_R)
    else:
        for t in range(pid, NT, g):
            _select_tile(t, logits_ptr, bias_ptr, ids_ptr, weights_ptr, hist_ptr, counts_ptr,
                         kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, T, stride_t,
                         scale, C, R, E, K, KP, H, EH, BT, BLOCK_E, W, SIGMOID, SOFTMAX_AFTER,
                         RENORM, HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT,
                         EXACT_PACK, TIE_CHECK, False, LANE_RANKS, CAPACITY, PAD, BLOCK_R)
    _grid_sync(sync_ptr)
    if not SUM_TILES:
        for c in range(pid, NC, g):
            _scan_cols(c, hist_ptr, prefix_ptr, total_ptr, NT, BLOCK_E, BC, BLOCK_P)
        _grid_sync(sync_ptr)
    kept, starts, before = _plan_totals(prefix_ptr, total_ptr, counts_ptr, kept_ptr, offsets_ptr,
                                        pid, NT, C, E, BLOCK_E, CAPACITY, PAD, SUM_TILES, NTP)
    for b in range(pid, NPR, g):
        _place_block(b, ids_ptr, prefix_ptr, slot_to_row_ptr, row_to_slot_ptr, kept, starts,
                     before, N, NP, R, ids_ptr, ids_ptr, 1, 1, E, BT, K, BLOCK_S, BLOCK_E,
                     BLOCK_R, SUM_TILES, False, 16, True)
