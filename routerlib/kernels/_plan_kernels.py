"""Triton kernels of the sort-free routing plan (launchers in routerlib.kernels.plan).

A slot is s = t*K + k. The plan is a counting sort of the T*K slot ids by expert:

  _block_hist_kernel   per block of BLOCK slots: histogram over experts -> partial[b, :]
  _plan_kernel         per block: sums the partials of all blocks (total counts) and of the earlier
                       blocks (block prefix), derives kept counts and offsets, ranks its slots
                       (stable local rank from an in-register sort of (expert, index) keys), writes
                       slot_to_row / row_to_slot, and marks the empty rows of its share with -1.
                       With SINGLE=True one program does everything (no partials, 1 launch).
  _key_rank_kernel     priority / random policies only: _plan_kernel then writes the slots grouped
                       by expert (arrival order) to scratch, and this kernel ranks each slot by the
                       number of same-expert slots with a better key (key desc, slot asc): tiles of
                       [BI, BJ] comparisons over the expert's segment, O(count_e^2) per expert.

All metadata is int32: slot ids, rows and counts are bounded by T*K and R < 2^31.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels.common import sortable


@triton.jit
def _masked_hist(ids, valid, E_PAD: tl.constexpr):
    """Histogram of ids[valid] over E_PAD bins. Invalid lanes must hold 0: they land in bin 0 and
    are taken out again (tl.histogram's mask argument is newer than some supported Tritons)."""
    hist = tl.histogram(ids, E_PAD)
    n_invalid = tl.sum((valid == 0).to(tl.int32), axis=0)
    return hist - tl.where(tl.arange(0, E_PAD) == 0, n_invalid, 0)


@triton.jit
def _sortable_key(key_ptr, slot, valid):
    """The fp32 policy key of each slot as a sortable int32 (see common.sortable)."""
    return sortable(tl.load(key_ptr + slot, mask=valid, other=0.0))


@triton.jit
def _block_hist_kernel(
    ids_ptr,  # [N] int32 expert of each slot (N = T*K)
    partial_ptr,  # [NB, E_PAD] int32 out: histogram of each block
    N,
    BLOCK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    hist = _masked_hist(ids, valid, E_PAD)
    tl.store(partial_ptr + b * E_PAD + tl.arange(0, E_PAD), hist)


@triton.jit
def _plan_kernel(
    ids_ptr,  # [N] int32 expert of each slot
    key_ptr,  # [N] fp32 policy key (weights or random priority); GROUP only
    partial_ptr,  # [NB, E_PAD] int32 block histograms; not SINGLE only
    counts_ptr,  # [E] int32 out: expert_counts
    kept_ptr,  # [E] int32 out: kept_counts
    offsets_ptr,  # [E+1] int32 out: expert_offsets
    slot_to_row_ptr,  # [N] int32 out (not GROUP)
    row_to_slot_ptr,  # [R] int32 out: slots (not GROUP) and -1 on empty rows (always)
    seg_ptr,  # [E+1] int32 out (GROUP): start of each expert in the grouped scratch
    gslot_ptr,  # [N] int32 out (GROUP): slots grouped by expert, arrival order inside
    gexp_ptr,  # [N] int32 out (GROUP): their experts
    gkey_ptr,  # [N] int32 out (GROUP): their sortable keys
    N,
    E,
    C,  # capacity (CAPACITY only)
    PAD,  # pad_to_multiple (ragged only)
    R,  # rows of the buffer
    NB,  # number of blocks (= programs)
    FILL_W,  # empty-row candidates per expert: C (capacity) or PAD-1 (ragged), >= 1
    FILL_PER_PROG,  # candidates each program owns
    TAIL_PER_PROG,  # ragged: tail rows [offsets[E], R) each program owns
    CAPACITY: tl.constexpr,
    GROUP: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
    E_PAD: tl.constexpr,
    PB: tl.constexpr,  # partial rows summed per step
    FILL: tl.constexpr,  # rows per empty-row store
):
    b = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    emask = e < E

    # ---- this block's slots and histogram
    idx = tl.arange(0, BLOCK)
    offs = b * BLOCK + idx
    valid = offs < N
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    hist = _masked_hist(ids, valid, E_PAD)  # [E_PAD]

    # ---- total counts and the counts of earlier blocks (the partials sit in L2)
    if SINGLE:
        total = hist
        prefix = tl.zeros([E_PAD], dtype=tl.int32)
    else:
        total = tl.zeros([E_PAD], dtype=tl.int32)
        prefix = tl.zeros([E_PAD], dtype=tl.int32)
        for r0 in range(0, NB, PB):
            rows = r0 + tl.arange(0, PB)
            tile = tl.load(partial_ptr + rows[:, None] * E_PAD + e[None, :],
                           mask=rows[:, None] < NB, other=0)  # [PB, E_PAD]
            total += tl.sum(tile, axis=0)
            prefix += tl.sum(tl.where(rows[:, None] < b, tile, 0), axis=0)
    total = tl.where(emask, total, 0)

    # ---- kept counts and offsets
    if CAPACITY:
        kept = tl.minimum(total, C)
        offsets = e * C
        seg_end = offsets + C
        rows_used = E * C
    else:
        kept = total
        padded = (kept + PAD - 1) // PAD * PAD
        seg_end = tl.cumsum(padded, axis=0)
        offsets = seg_end - padded
        rows_used = tl.sum(padded, axis=0)
    if b == 0:
        tl.store(counts_ptr + e, total, mask=emask)
        tl.store(kept_ptr + e, kept, mask=emask)
        tl.store(offsets_ptr + e, offsets, mask=emask)
        tl.store(offsets_ptr + E, rows_used)
        if GROUP:
            tl.store(seg_ptr + e, tl.cumsum(total, axis=0) - total, mask=emask)
            tl.store(seg_ptr + E, N)

    # ---- stable rank of each slot among its expert's slots (counting sort):
    # sorting the keys (expert, local index) lists the block grouped by expert, arrival order kept;
    # a slot's place p in that list minus its expert's start in the block is its local rank.
    packed = tl.where(valid, ids * BLOCK + idx, E * BLOCK + idx)  # invalid lanes sort last
    srt = tl.sort(packed)
    e_s = srt // BLOCK  # [BLOCK] expert of the p-th slot in grouped order
    slot = b * BLOCK + srt % BLOCK
    live = e_s < E
    e_g = tl.minimum(e_s, E_PAD - 1)  # in range for the gather
    local_start = tl.cumsum(hist, axis=0) - hist
    rank_base = prefix - local_start  # [E_PAD] rank = rank_base[e] + p
    if GROUP:
        seg = tl.cumsum(total, axis=0) - total
        pos = tl.gather(seg + rank_base, e_g, 0) + idx
        tl.store(gslot_ptr + pos, slot, mask=live)
        tl.store(gexp_ptr + pos, e_s, mask=live)
        tl.store(gkey_ptr + pos, _sortable_key(key_ptr, slot, live), mask=live)
    else:
        if CAPACITY:
            rank = tl.gather(rank_base, e_g, 0) + idx
            keep = live & (rank < C)
            row = e_s * C + rank
        else:
            row = tl.gather(offsets + rank_base, e_g, 0) + idx
            keep = live
        tl.store(slot_to_row_ptr + slot, tl.where(keep, row, -1), mask=live)
        tl.store(row_to_slot_ptr + row, slot, mask=keep)

    # ---- empty rows -> -1. Candidates are (expert, j) pairs, j < FILL_W: capacity rows e*C + j
    # with j >= kept[e]; ragged padding rows offsets[e] + kept[e] + j below the padded end. Each
    # program owns FILL_PER_PROG candidates; rows no slot fills are written by exactly one program.
    n_cand = E * FILL_W
    f_lo = b * FILL_PER_PROG
    f_hi = tl.minimum(f_lo + FILL_PER_PROG, n_cand)
    for f0 in range(f_lo, f_hi, FILL):
        f = f0 + tl.arange(0, FILL)
        fm = f < f_hi
        fe = tl.minimum(f // FILL_W, E_PAD - 1)
        j = f % FILL_W
        if CAPACITY:
            empty = fm & (j >= tl.gather(kept, fe, 0))
            frow = f
        else:
            frow = tl.gather(offsets + kept, fe, 0) + j
            empty = fm & (frow < tl.gather(seg_end, fe, 0))
        tl.store(row_to_slot_ptr + frow, tl.full([FILL], -1, tl.int32), mask=empty)
    if not CAPACITY:
        # tail rows [offsets[E], R): at most E*(PAD-1) of them (sum of kept = N when dropless)
        t_lo = b * TAIL_PER_PROG
        for t0 in range(t_lo, t_lo + TAIL_PER_PROG, FILL):
            t = t0 + tl.arange(0, FILL)
            trow = rows_used + t
            tm = (t < t_lo + TAIL_PER_PROG) & (trow < R)
            tl.store(row_to_slot_ptr + trow, tl.full([FILL], -1, tl.int32), mask=tm)


@triton.jit
def _key_rank_kernel(
    gslot_ptr,  # [N] int32 slots grouped by expert (arrival order inside)
    gexp_ptr,  # [N] int32 their experts
    gkey_ptr,  # [N] int32 their sortable keys
    seg_ptr,  # [E+1] int32 segment starts in the grouped order
    offsets_ptr,  # [E+1] int32 expert_offsets
    slot_to_row_ptr,  # [N] int32 out
    row_to_slot_ptr,  # [R] int32 out (slot rows only; empty rows are already -1)
    N,
    C,
    CAPACITY: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
):
    """rank(i) = #{j in i's expert: key_j > key_i or (key_j == key_i and j before i)}."""
    p = tl.program_id(0)
    i = p * BI + tl.arange(0, BI)
    im = i < N
    e_i = tl.load(gexp_ptr + i, mask=im, other=0)
    k_i = tl.load(gkey_ptr + i, mask=im, other=0)
    s_i = tl.load(gslot_ptr + i, mask=im, other=0)
    # the tile's experts are sorted: compare against their segments only
    lo = tl.min(tl.where(im, tl.load(seg_ptr + e_i, mask=im, other=0), N), axis=0)
    hi = tl.max(tl.where(im, tl.load(seg_ptr + e_i + 1, mask=im, other=0), 0), axis=0)
    rank = tl.zeros([BI], dtype=tl.int32)
    for j0 in range(lo, hi, BJ):
        j = j0 + tl.arange(0, BJ)
        jm = j < hi
        e_j = tl.load(gexp_ptr + j, mask=jm, other=-1)
        k_j = tl.load(gkey_ptr + j, mask=jm, other=0)
        same = e_j[None, :] == e_i[:, None]
        beats = (k_j[None, :] > k_i[:, None]) | ((k_j[None, :] == k_i[:, None])
                                                & (j[None, :] < i[:, None]))
        rank += tl.sum((same & beats).to(tl.int32), axis=1)
    if CAPACITY:
        keep = im & (rank < C)
    else:
        keep = im
    row = tl.load(offsets_ptr + e_i, mask=im, other=0) + rank
    tl.store(slot_to_row_ptr + s_i, tl.where(keep, row, -1), mask=im)
    tl.store(row_to_slot_ptr + row, s_i, mask=keep)
