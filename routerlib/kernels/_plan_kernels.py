"""Triton kernels of the sort-free routing plan (launchers in routerlib.kernels.plan).

A slot is s = t*K + k. The plan is a counting sort of the T*K slot ids by expert, in blocks of
BLOCK slots (one program each):

  _block_hist_kernel   histogram of each block over experts -> partial[e, b]
  _block_scan_kernel   one program per expert: exclusive scan of partial[e, :] over the blocks
                       (in place) and the total count -> expert_counts[e]
  _rank_kernel         per block: kept counts and offsets (every program derives them from the
                       E counts; program 0 stores them), each slot's stable rank = its block's
                       prefix + the number of earlier same-expert slots inside the block
                       ([BLOCK, BLOCK] comparisons), slot_to_row / row_to_slot, and -1 on the
                       empty rows this program owns. With SINGLE=True one program loops over all
                       blocks with a running per-expert count: the whole plan in one launch.
  _key_rank_kernel     priority / random policies only: _rank_kernel then writes the slots grouped
                       by expert (arrival order) to scratch, and this kernel ranks each slot by the
                       number of same-expert slots with a better key (key desc, slot asc): tiles of
                       [BI, BJ] comparisons over the expert's segment, O(count_e^2) per expert.

All metadata is int32: slot ids, rows and counts are bounded by T*K and R < 2^31.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _masked_hist(ids, valid, E_PAD: tl.constexpr):
    """Histogram of ids[valid] over E_PAD bins. Invalid lanes must hold 0: they land in bin 0 and
    are taken out again (tl.histogram's mask argument is newer than some supported Tritons)."""
    hist = tl.histogram(ids, E_PAD)
    n_invalid = tl.sum((valid == 0).to(tl.int32), axis=0)
    return hist - tl.where(tl.arange(0, E_PAD) == 0, n_invalid, 0)


@triton.jit
def _sortable_key(key_ptr, slot, valid):
    """fp32 key -> int32 whose signed order is the float order (-0 == +0, NaN above +inf)."""
    k = tl.load(key_ptr + slot, mask=valid, other=0.0)
    bits = k.to(tl.int32, bitcast=True)
    bits = tl.where(k == 0.0, 0, bits)  # -0.0 == +0.0, as a float compare says
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    return tl.where(k != k, 0x7F800001, bits)  # NaN beats +inf (0x7F800000), as in torch.sort


@triton.jit
def _block_hist_kernel(
    ids_ptr,  # [N] int32 expert of each slot (N = T*K)
    partial_ptr,  # [E, NB] int32 out: histogram of each block
    N,
    E,
    NB,
    BLOCK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    hist = _masked_hist(ids, valid, E_PAD)
    e = tl.arange(0, E_PAD)
    tl.store(partial_ptr + e * NB + b, hist, mask=e < E)


@triton.jit
def _block_scan_kernel(
    partial_ptr,  # [E, NB] int32 in: block histograms; out: exclusive prefix over blocks
    counts_ptr,  # [E] int32 out: expert_counts
    NB,
    SCAN: tl.constexpr,
):
    e = tl.program_id(0)
    row = partial_ptr + e.to(tl.int64) * NB
    carry = 0
    for c0 in range(0, NB, SCAN):
        c = c0 + tl.arange(0, SCAN)
        v = tl.load(row + c, mask=c < NB, other=0)
        tl.store(row + c, tl.cumsum(v, axis=0) - v + carry, mask=c < NB)
        carry += tl.sum(v, axis=0)
    tl.store(counts_ptr + e, carry)


@triton.jit
def _rank_kernel(
    ids_ptr,  # [N] int32 expert of each slot
    key_ptr,  # [N] fp32 policy key (weights or random priority); GROUP only
    partial_ptr,  # [E, NB] int32 exclusive prefix over blocks (not SINGLE)
    counts_ptr,  # [E] int32 expert_counts: in (not SINGLE) or out (SINGLE)
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
    NB,  # number of blocks (= programs unless SINGLE)
    FILL_W,  # empty-row candidates per expert: C (capacity) or PAD-1 (ragged), >= 1
    FILL_PER_PROG,  # candidates each program owns
    TAIL_PER_PROG,  # ragged: tail rows [offsets[E], R) each program owns
    CAPACITY: tl.constexpr,
    GROUP: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
    E_PAD: tl.constexpr,
    FILL: tl.constexpr,  # rows per empty-row store
):
    b = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    emask = e < E
    idx = tl.arange(0, BLOCK)

    # ---- counts, and the slots of each expert before this program's first slot
    if SINGLE:
        total = tl.zeros([E_PAD], dtype=tl.int32)
        for c0 in range(0, N, BLOCK):
            m = c0 + idx < N
            total += _masked_hist(tl.load(ids_ptr + c0 + idx, mask=m, other=0), m, E_PAD)
        running = tl.zeros([E_PAD], dtype=tl.int32)
        s_lo = 0
        s_hi = N
    else:
        total = tl.load(counts_ptr + e, mask=emask, other=0)
        running = tl.load(partial_ptr + e * NB + b, mask=emask, other=0)
        s_lo = b * BLOCK
        s_hi = s_lo + 1  # one block

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
    seg = tl.cumsum(total, axis=0) - total  # start of each expert among the N slots
    if b == 0:
        if SINGLE:
            tl.store(counts_ptr + e, total, mask=emask)
        tl.store(kept_ptr + e, kept, mask=emask)
        tl.store(offsets_ptr + e, offsets, mask=emask)
        tl.store(offsets_ptr + E, rows_used)
        if GROUP:
            tl.store(seg_ptr + e, seg, mask=emask)
            tl.store(seg_ptr + E, N)

    # ---- stable rank of each slot among its expert's slots (a counting sort):
    # rank = running[e] (same-expert slots of earlier blocks) + earlier same-expert slots here
    for c0 in range(s_lo, s_hi, BLOCK):
        slot = c0 + idx
        live = slot < N
        ids = tl.load(ids_ptr + slot, mask=live, other=0)
        same = (ids[:, None] == ids[None, :]) & (idx[None, :] < idx[:, None])
        local = tl.sum(same.to(tl.int32), axis=1)  # [BLOCK]
        if GROUP:
            pos = tl.gather(seg + running, ids, 0) + local
            tl.store(gslot_ptr + pos, slot, mask=live)
            tl.store(gexp_ptr + pos, ids, mask=live)
            tl.store(gkey_ptr + pos, _sortable_key(key_ptr, slot, live), mask=live)
        else:
            if CAPACITY:
                rank = tl.gather(running, ids, 0) + local
                keep = live & (rank < C)
                row = ids * C + rank
            else:
                row = tl.gather(offsets + running, ids, 0) + local
                keep = live
            tl.store(slot_to_row_ptr + slot, tl.where(keep, row, -1), mask=live)
            tl.store(row_to_slot_ptr + row, slot, mask=keep)
        running += _masked_hist(ids, live, E_PAD)

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
