"""Each chosen slot's rank among the earlier tokens of its tile that chose the same expert, by
counting (no sort). With one thread a token and E <= 128 (the prefill default) by bit-transposed
membership masks (_lane_ranks); otherwise (_token_ranks) per token a column of E/4 int32 words
holding 8-bit fields (field e%4 of word e//4), whose exclusive cumsum along the tile's tokens
gives, in field e, how many earlier tokens of the tile went to e. Fields cannot overflow: a tile
has at most 128 tokens and a token takes an expert once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels.fast_route.select import _stack


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
