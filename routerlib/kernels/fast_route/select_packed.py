"""Packed-key selection: one int32 per key with the column in its low bits, sorted 8 at a time
by a network and merged, then finished exactly (private: see select.py and launch.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels.common import INT32_MIN, sortable
from routerlib.kernels.fast_route.select import _group_stats, _key_of, _load4

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
        p9 = tl.full(p9.shape, INT32_MIN, tl.int32)
    if L < 9:
        p8 = tl.full(p8.shape, INT32_MIN, tl.int32)
    if L < 8:
        p7 = tl.full(p7.shape, INT32_MIN, tl.int32)
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
    key = _pack(sortable(key), cols, SHIFT)
    if not EVEN:
        key = tl.where(cols < E, key, INT32_MIN)
    return key


@triton.jit
def _exact(p, base, rmask, bias_ptr, m, s, E: tl.constexpr, SIGMOID: tl.constexpr,
           HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, SOFTMAX_KEYS: tl.constexpr,
           SHIFT: tl.constexpr):
    """(exact sortable key, column, logit) of the packed entries p [BT]: the logit gathered
    again and its key recomputed. Empty entries (INT32_MIN) get (INT32_MIN, 2^30, 0): last in
    any order."""
    LOW: tl.constexpr = (1 << SHIFT) - 1
    real = p != INT32_MIN
    col = tl.where(real, LOW - (p & LOW), 0)
    x = tl.load(base + col, mask=rmask & real, other=0.0).to(tl.float32)
    key = sortable(_key_of(x, col, bias_ptr, m, s, E, SIGMOID, HAS_BIAS, KEY_LOGITS,
                            SOFTMAX_KEYS, True))
    return tl.where(real, key, INT32_MIN), tl.where(real, col, 1 << 30), x


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
    neg = tl.full([BT, H], INT32_MIN, tl.int32)
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
