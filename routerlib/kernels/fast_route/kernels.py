"""The route's kernels (private: the launcher is launch.py).

  _select_rows_kernel   one program per tile of BT tokens: selection, weights, ids, in-tile ranks,
                        the tile's expert counts; the whole plan when one tile holds every token
  _scan_tiles_kernel    exclusive scan of the tile counts down the tiles
  _place_slots_kernel   elementwise over the slots: rank + earlier tiles' count, kept, rows
  _route_sync_kernel    the three in one cooperative launch with grid barriers (eager calls)
  _route_dispatch_kernel  decode sizes: the route and the dispatch in one launch

Bytes: select reads T*E*s (+ T*K*s, the K selected logits again, from L1/L2) and writes T*K*12
(ids, weights, in-tile ranks) + NT*E*4 (tile counts); the scan reads and writes NT*E*4; place
reads T*K*8 + NT*E*4 and writes T*K*4 + R*4.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels.common import pdl_start
from routerlib.kernels.fast_route.place import (
    _copy_rows,
    _empty_rows,
    _layout,
    _place_block,
    _plan_totals,
    _scan_cols,
    _write_plan,
    _zero_rows,
)
from routerlib.kernels.fast_route.ranks import _lane_ranks, _token_ranks
from routerlib.kernels.fast_route.select import _select_rows, _stack, _weights
from routerlib.kernels.fast_route.select_packed import _select_packed


@triton.jit
def _select_ids(
    base, rmask, valid, bias_ptr,
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    BT: tl.constexpr, SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr,
    STAGES: tl.constexpr, PACKED: tl.constexpr, SHIFT: tl.constexpr, EXACT_PACK: tl.constexpr,
    TIE_CHECK: tl.constexpr, NG: tl.constexpr = 1, TG: tl.constexpr = 1,
    TOP2: tl.constexpr = False,
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
            KEY_LOGITS, NEED_MS, STAGES, 4, NG, TG, TOP2)
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
    NG: tl.constexpr = 1, TG: tl.constexpr = 1, TOP2: tl.constexpr = False,  # group limit
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
        HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT, EXACT_PACK, TIE_CHECK, NG, TG,
        TOP2)
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
    NG: tl.constexpr, TG: tl.constexpr, TOP2: tl.constexpr,  # group limit (NG = 1: none)
):
    """One program per tile of BT tokens (see _select_tile)."""
    if PDL:  # the next launch may start now; it waits for this grid's end (_pdl_start)
        tl.extra.cuda.gdc_launch_dependents()
    _select_tile(tl.program_id(0), logits_ptr, bias_ptr, ids_ptr, weights_ptr, hist_ptr,
                 counts_ptr, kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, T,
                 stride_t, scale, C, R, E, K, KP, H, EH, BT, BLOCK_E, W, SIGMOID,
                 SOFTMAX_AFTER, RENORM, HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT,
                 EXACT_PACK, TIE_CHECK, FUSED_PLAN, LANE_RANKS, CAPACITY, PAD, BLOCK_R, NG, TG,
                 TOP2)


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
def _scan_tiles_kernel(
    hist_ptr,  # (NT, BLOCK_E) int32 tile counts
    prefix_ptr,  # (NT, BLOCK_E) int32 out: counts of the earlier tiles
    total_ptr,  # (BLOCK_E,) int32 out: counts of all tiles
    NT, BLOCK_E: tl.constexpr, BC: tl.constexpr, BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent of the select kernel
):
    """Exclusive scan of the tile counts down the tiles, BC expert columns per program (O(NT*E)
    work in all)."""
    pdl_start(PDL)
    _scan_cols(tl.program_id(0), hist_ptr, prefix_ptr, total_ptr, NT, BLOCK_E, BC, BLOCK_P)


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
    E: tl.constexpr, BT: tl.constexpr, K: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr, CAPACITY: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    SUM_TILES: tl.constexpr, NTP: tl.constexpr,  # few tiles (NTP >= NT): no scan launch
    PDL: tl.constexpr,  # launched as a programmatic dependent of the previous kernel
):
    """Programs < NP place BLOCK_S slots each, programs >= NP mark empty rows (_place_block).
    With SUM_TILES every program scans the tile counts itself: at decode sizes that is cheaper
    than a scan launch."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    kept, starts, before = _plan_totals(prefix_ptr, total_ptr, counts_ptr, kept_ptr, offsets_ptr,
                                        pid, NT, C, E, BLOCK_E, CAPACITY, PAD, SUM_TILES, NTP)
    _place_block(pid, ids_ptr, prefix_ptr, slot_to_row_ptr, row_to_slot_ptr, kept, starts,
                 before, N, NP, R, E, BT, K, BLOCK_S, BLOCK_E, BLOCK_R, SUM_TILES)


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
    NG: tl.constexpr, TG: tl.constexpr, TOP2: tl.constexpr,  # group limit (NG = 1: none)
):
    """The three launches of the route in one cooperative launch (see the section comment)."""
    pid = tl.program_id(0)
    g = tl.num_programs(0)
    if ONE_TILE:
        _select_tile(pid, logits_ptr, bias_ptr, ids_ptr, weights_ptr, hist_ptr, counts_ptr,
                     kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, T, stride_t,
                     scale, C, R, E, K, KP, H, EH, BT, BLOCK_E, W, SIGMOID, SOFTMAX_AFTER,
                     RENORM, HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT, EXACT_PACK,
                     TIE_CHECK, False, LANE_RANKS, CAPACITY, PAD, BLOCK_R, NG, TG,
                     TOP2)
    else:
        for t in range(pid, NT, g):
            _select_tile(t, logits_ptr, bias_ptr, ids_ptr, weights_ptr, hist_ptr, counts_ptr,
                         kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, T, stride_t,
                         scale, C, R, E, K, KP, H, EH, BT, BLOCK_E, W, SIGMOID, SOFTMAX_AFTER,
                         RENORM, HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT,
                         EXACT_PACK, TIE_CHECK, False, LANE_RANKS, CAPACITY, PAD, BLOCK_R, NG,
                         TG, TOP2)
    _grid_sync(sync_ptr)
    if not SUM_TILES:
        for c in range(pid, NC, g):
            _scan_cols(c, hist_ptr, prefix_ptr, total_ptr, NT, BLOCK_E, BC, BLOCK_P)
        _grid_sync(sync_ptr)
    kept, starts, before = _plan_totals(prefix_ptr, total_ptr, counts_ptr, kept_ptr, offsets_ptr,
                                        pid, NT, C, E, BLOCK_E, CAPACITY, PAD, SUM_TILES, NTP)
    for b in range(pid, NPR, g):
        _place_block(b, ids_ptr, prefix_ptr, slot_to_row_ptr, row_to_slot_ptr, kept, starts,
                     before, N, NP, R, E, BT, K, BLOCK_S, BLOCK_E, BLOCK_R, SUM_TILES)


# ---------------------------------------------------------------------------------------------
# The route with the dispatch in one launch (decode sizes)
#
# Triton kernel of the decode route with the dispatch in the same launch (private: the launcher
# is launch.route_dispatch_rows).
#
# At decode sizes the route and the dispatch are latency-bound chains of small kernels: select,
# place, then the gather of the token rows into the expert-major buffer, each a kernel boundary in
# a CUDA graph (~1-2 us) for a few microseconds of work. When every token fits one tile
# (T <= 128), a tile's whole plan costs one program a few microseconds and reads T*E logits
# (16 KB at T=64, E=64, from L2 after the first program): so every program of this kernel selects
# and plans all T tokens itself, in registers, and no program waits for another (no grid barrier,
# no second launch). Program 0 writes the route's outputs (ids, weights, counts, offsets,
# slot_to_row, row_to_slot); programs < NSP then copy SP slots each (x[t] -> out[row of (t, j)],
# 16-byte vectors along D), programs >= NSP write zeros to the empty rows of ZG*SP rows each
# (capacity or padded layouts only). Every output row is written by exactly one program.
#
# Bytes: each program reads T*E*s logits (L2 after the first); the copy reads the kept slots'
# token rows (T*D*s from HBM, the K reads of a token hit L2) and writes R*D*s: the dispatch floor.
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "C", "R", "NSP"])
def _route_dispatch_kernel(
    logits_ptr,  # (T, E) fp32/bf16/fp16, row stride stride_t, unit column stride
    bias_ptr,  # (E,) selection bias; read only if HAS_BIAS
    ids_ptr, weights_ptr,  # (T, K) int32, fp32 out
    counts_ptr, kept_ptr, offsets_ptr,  # (E,), (E,), (E+1,) int32 out
    slot_to_row_ptr,  # (T*K,) int32 out
    row_to_slot_ptr,  # (R,) int32 out
    x_ptr,  # (T, D) tokens, row stride stride_x, unit column stride
    out_ptr,  # (R, D) out: the dispatched rows, contiguous
    T, stride_t, scale, C, R, D, stride_x,
    NSP,  # programs that copy slots; the rest zero empty rows
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, EH: tl.constexpr,
    BT: tl.constexpr, BLOCK_E: tl.constexpr, W: tl.constexpr,
    SIGMOID: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, KEY_LOGITS: tl.constexpr, NEED_MS: tl.constexpr,
    STAGES: tl.constexpr, PACKED: tl.constexpr, SHIFT: tl.constexpr, EXACT_PACK: tl.constexpr,
    TIE_CHECK: tl.constexpr, CAPACITY: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    SP: tl.constexpr,  # slots (rows) a program copies (zeroes) at once
    ZG: tl.constexpr,  # groups of SP rows a zeroing program covers
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    NG: tl.constexpr, TG: tl.constexpr, TOP2: tl.constexpr,  # group limit (NG = 1: none)
):
    """Route T <= BT tokens and dispatch their rows in one launch (see the module docstring)."""
    pid = tl.program_id(0)
    toks = tl.arange(0, BT)
    rmask = toks < T
    base = logits_ptr + tl.minimum(toks, T - 1).to(tl.int64) * stride_t  # see _select_tile
    kc = tl.arange(0, KP)[None, :]
    valid = rmask[:, None] & (kc < K)
    slot = toks.to(tl.int64)[:, None] * K + kc
    I, xs, m, s, i0, i1, i2, i3, i4, i5, i6, i7 = _select_ids(
        base, rmask, valid, bias_ptr, E, K, KP, H, EH, BT, SIGMOID, SOFTMAX_AFTER, RENORM,
        HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT, EXACT_PACK, TIE_CHECK, NG, TG,
        TOP2)
    rank, words = _token_ranks(rmask, i0, i1, i2, i3, i4, i5, i6, i7, K, KP, W)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    counts = (tl.gather(words, cols >> 2, axis=0) >> ((cols & 3) * 8)) & 255
    kept, starts, total = _layout(counts, cols, C, E, CAPACITY, PAD)
    if pid == 0:
        tl.store(ids_ptr + slot, I, mask=valid)
        tl.store(weights_ptr + slot, _weights(xs, valid, m, s, scale, SIGMOID, SOFTMAX_AFTER,
                                              RENORM, NEED_MS), mask=valid)
        _write_plan(I, rank, valid, slot, counts, kept, starts, total, cols, cmask, counts_ptr,
                    kept_ptr, offsets_ptr, slot_to_row_ptr, row_to_slot_ptr, R, E, BT, KP,
                    CAPACITY, PAD, BLOCK_R)
    if pid < NSP:
        # every slot's row, in registers ([BT * KP], slot (t, j) at t * KP + j; -1: dropped)
        e = tl.reshape(I, [BT * KP])
        rk = tl.reshape(rank, [BT * KP])
        keep = tl.reshape(valid, [BT * KP]) & (rk < tl.gather(kept, e, axis=0))
        row_of = tl.where(keep, tl.gather(starts, e, axis=0) + rk, -1)
        q = pid * SP + tl.arange(0, SP)  # this program's slots, flat t * K + j
        qm = q < T * K
        t = q // K
        dst = tl.gather(row_of, tl.where(qm, t * KP + (q - t * K), 0), axis=0)
        _copy_rows(x_ptr, out_ptr, t, dst, qm & (dst >= 0), D, stride_x, BLOCK_D, EVEN_D)
    elif CAPACITY or PAD > 1:
        for g in tl.static_range(ZG):
            r = ((pid - NSP) * ZG + g) * SP + tl.arange(0, SP)
            empty = _empty_rows(r, starts, kept, cols, cmask, R)
            if tl.max(empty.to(tl.int32), axis=0) != 0:  # most groups are full: skip them
                _zero_rows(out_ptr, r, empty, D, BLOCK_D, EVEN_D)
