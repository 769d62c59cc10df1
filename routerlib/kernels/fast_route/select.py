"""Selection with few threads per token: the exact insertion into register lists, and the
combine weights (private: the launcher is routerlib.kernels.fast_route.launch).

The general top-K kernel (kernels/_topk_kernels.py) spreads a token's E experts over a warp and
runs K max-reductions across it: K * log2(32) dependent shuffles per token. Here a token's experts
are split among H (1, 2 or 4) threads; each thread streams its columns 4 at a time (one 16-byte
load for fp32) and inserts every key into a sorted list of the K best it has seen, held in
registers (per list entry one compare and four selects, all entries in parallel, no shuffles).
The H lists are merged at the end (the same insertion). Columns arrive in increasing index order
and a new key lands below the equal keys already in the list, so among equal keys the lower
expert index wins, as in the reference's stable sort. Keys are fp32 turned into order-preserving
int32 (common.sortable: -0.0 == +0.0, NaN above +inf as in torch.sort). The packed variant
(select_packed.py) holds one int32 per key with the column in its low bits instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels.common import INT32_MIN, div_rn, sortable


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
def _group_bits(base, rmask, bias_ptr, m, s, BT: tl.constexpr, E: tl.constexpr,
                SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr,
                SOFTMAX_KEYS: tl.constexpr, NG: tl.constexpr, TG: tl.constexpr,
                TOP2: tl.constexpr):
    """Group-limited routing's first pass: a bitmask [BT] int32 of the topk_groups (TG) groups
    of NG contiguous groups each token keeps, as reference.gating.group_limit: a group's score is
    the max (or, TOP2, the sum of the two best) of its selection keys; ties keep the lower group.
    m, s [BT]: the softmax max and sum (SOFTMAX_KEYS)."""
    EG: tl.constexpr = E // NG
    EGP: tl.constexpr = triton.next_power_of_2(EG)
    NGP: tl.constexpr = triton.next_power_of_2(NG)
    c = tl.arange(0, EGP)[None, :]  # [1, EGP] column inside a group
    gi = tl.arange(0, NGP)[None, :]  # [1, NGP]
    gs = tl.full([BT, NGP], float("-inf"), tl.float32)  # group scores, -inf past NG
    for g in tl.static_range(NG):
        cols = g * EG + c
        inside = c < EG
        x = tl.load(base[:, None] + cols, mask=rmask[:, None] & inside, other=0.0)
        key = _key_of(x.to(tl.float32), cols, bias_ptr, m[:, None], s[:, None], E, SIGMOID,
                      HAS_BIAS, KEY_LOGITS, SOFTMAX_KEYS, False)
        key = tl.where(inside, key, float("-inf"))  # [BT, EGP]
        best = tl.max(key, axis=1)
        if TOP2 and EG > 1:  # the best once removed (its first column), then the next best
            first = tl.min(tl.where(key == best[:, None], c, EGP), axis=1)
            best = best + tl.max(tl.where(c == first[:, None], float("-inf"), key), axis=1)
        gs = tl.where(gi == g, best[:, None], gs)
    # group g's rank: the groups j that beat it (higher score, or equal with a lower index)
    rank = tl.zeros([BT, NGP], tl.int32)
    for j in tl.static_range(NG):
        sj = tl.max(tl.where(gi == j, gs, float("-inf")), axis=1)[:, None]  # [BT, 1]
        rank += ((sj > gs) | ((sj == gs) & (j < gi))).to(tl.int32)
    keep = (rank < TG) & (gi < NG)
    return tl.sum(tl.where(keep, 1 << gi, 0), axis=1)


@triton.jit
def _group_mask(key, cols, gbits, E: tl.constexpr, NG: tl.constexpr):
    """Keys [BT, H, 4] of the experts in groups the token drops (gbits [BT, 1, 1]) to -inf."""
    if NG > 1:
        key = tl.where(((gbits >> (cols // (E // NG))) & 1) != 0, key, float("-inf"))
    return key


@triton.jit
def _chunk(x, col, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7,
           i7, E: tl.constexpr, K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
           KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr, KEYS_FIRST: tl.constexpr,
           gbits=0, NG: tl.constexpr = 1):
    """One [BT, H, 4] chunk of logits x (columns col + 0..3, col: [1, H]): the online softmax
    statistics (NEED_MS) and, when the keys need no normaliser, their insertion."""
    if NEED_MS:
        m_new = tl.maximum(m, tl.max(x, axis=2))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, :, None]), axis=2)
        m = m_new
    if KEYS_FIRST:
        cols = col[:, :, None] + tl.arange(0, 4)[None, None, :]
        key = _key_of(x, cols, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS, False, False)
        key = _group_mask(key, cols, gbits, E, NG)
        key = tl.where(cols < E, sortable(key), INT32_MIN)
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
    NG: tl.constexpr = 1, TG: tl.constexpr = 1, TOP2: tl.constexpr = False,
):
    """Top-K of the tokens whose logits rows start at `base` [BT] (row pointers). Thread group
    h of a token scans columns [h*EH, (h+1)*EH) (EH a multiple of 16). Returns (ids [BT] x 8, m
    [BT], s [BT]): the selected experts best first (entries past K unused), and the softmax max
    and sum of exps of each row (only if NEED_MS)."""
    hcol = (tl.arange(0, H) * EH)[None, :]  # [1, H] first column of each thread group
    neg = tl.full([BT, H], INT32_MIN, tl.int32)
    zero = tl.zeros([BT, H], tl.int32)
    k0, k1, k2, k3, k4, k5, k6, k7 = neg, neg, neg, neg, neg, neg, neg, neg
    i0, i1, i2, i3, i4, i5, i6, i7 = zero, zero, zero, zero, zero, zero, zero, zero
    m = tl.full([BT, H], -3.0e38, tl.float32)  # finite: exp(m - m_new) stays a number
    s = tl.zeros([BT, H], tl.float32)
    KEYS_FIRST: tl.constexpr = KEY_LOGITS or SIGMOID  # keys need no softmax normaliser
    gbits = tl.zeros([BT, 1, 1], tl.int32)  # group limit: the groups each token keeps
    if NG > 1 and KEYS_FIRST:
        none = tl.zeros([BT], tl.float32)  # no softmax normaliser needed
        gbits = _group_bits(base, rmask, bias_ptr, none, none, BT, E, SIGMOID, HAS_BIAS,
                            KEY_LOGITS, False, NG, TG, TOP2)[:, None, None]
    if UNROLL == 1:  # the packed path's rare fallback: small code, 4 columns a step
        for c in range(0, EH, 4):
            col = hcol + c
            x = _load4(base, rmask, col[:, :, None], E)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x, col, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6,
                i6, k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, NEED_MS, KEYS_FIRST, gbits, NG)
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
                i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST, gbits,
                NG)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x1, col + 4, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6,
                k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST, gbits,
                NG)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x2, col + 8, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6,
                k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST, gbits,
                NG)
            m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6, i6, k7, i7 = _chunk(
                x3, col + 12, bias_ptr, m, s, k0, i0, k1, i1, k2, i2, k3, i3, k4, i4, k5, i5, k6,
                i6, k7, i7, E, K, SIGMOID, HAS_BIAS, KEY_LOGITS, False, KEYS_FIRST, gbits,
                NG)
    m, s = _group_stats(m, s, NEED_MS)
    if not KEYS_FIRST:  # softmax scores + bias: a second pass once the normaliser is known
        if NG > 1:
            gbits = _group_bits(base, rmask, bias_ptr, m, s, BT, E, SIGMOID, HAS_BIAS,
                                KEY_LOGITS, True, NG, TG, TOP2)[:, None, None]
        for c in range(0, EH, 4):  # a loop, not unrolled: small code, fast compile
            col = hcol + c
            x = _load4(base, rmask, col[:, :, None], E)
            cols = col[:, :, None] + tl.arange(0, 4)[None, None, :]
            key = _key_of(x, cols, bias_ptr, m[:, None, None], s[:, None, None], E, SIGMOID,
                          HAS_BIAS, KEY_LOGITS, True, False)
            key = _group_mask(key, cols, gbits, E, NG)
            key = tl.where(cols < E, sortable(key), INT32_MIN)
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
        w = div_rn(ek, tl.sum(ek, axis=1)[:, None])
    else:
        if SIGMOID:
            p = 1.0 / (1.0 + tl.exp(-xs))
        else:
            p = div_rn(tl.exp(xs - m[:, None]), s[:, None])
        w = tl.where(valid, p, 0.0)
        if RENORM:
            w = div_rn(w, (tl.sum(w, axis=1) + 1e-20)[:, None])
    return w * scale
