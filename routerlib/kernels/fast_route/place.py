"""The plan from the tile counts and the in-tile ranks: layout (kept counts, expert starts),
the scan of the tile counts down the tiles, and the elementwise place of every slot (private:
the kernels are in kernels.py)."""

from __future__ import annotations

import triton
import triton.language as tl


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
                 N, NP, R, E: tl.constexpr, BT: tl.constexpr, K: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
                 SUM_TILES: tl.constexpr):
    """Block b < NP: BLOCK_S slots, elementwise: rank = the earlier tiles' count + the rank in
    the tile; kept iff rank < kept[e]; row = start of the expert + rank. Blocks >= NP mark
    BLOCK_R empty rows each (capacity or padded layouts only)."""
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
        _place(e, rank, valid, slot, kept, starts, slot_to_row_ptr, row_to_slot_ptr)
    else:
        cols = tl.arange(0, BLOCK_E)
        r = (b - NP) * BLOCK_R + tl.arange(0, BLOCK_R)
        empty = _empty_rows(r, starts, kept, cols, cols < E, R)
        tl.store(row_to_slot_ptr + r, tl.full([BLOCK_R], -1, tl.int32), mask=empty)
