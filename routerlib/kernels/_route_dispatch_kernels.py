"""Triton kernel of the decode route with the dispatch in the same launch (private: the launcher
is route_rows.route_dispatch_rows).

At decode sizes the route and the dispatch are latency-bound chains of small kernels: select,
place, then the gather of the token rows into the expert-major buffer, each a kernel boundary in
a CUDA graph (~1-2 us) for a few microseconds of work. When every token fits one tile
(T <= 128), a tile's whole plan costs one program a few microseconds and reads T*E logits
(16 KB at T=64, E=64, from L2 after the first program): so every program of this kernel selects
and plans all T tokens itself, in registers, and no program waits for another (no grid barrier,
no second launch). Program 0 writes the route's outputs (ids, weights, counts, offsets,
slot_to_row, row_to_slot); programs < NSP then copy SP slots each (x[t] -> out[row of (t, j)],
16-byte vectors along D), programs >= NSP write zeros to the empty rows of ZG*SP rows each
(capacity or padded layouts only). Every output row is written by exactly one program.

Bytes: each program reads T*E*s logits (L2 after the first); the copy reads the kept slots'
token rows (T*D*s from HBM, the K reads of a token hit L2) and writes R*D*s: the dispatch floor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from routerlib.kernels._route_rows_kernels import (
    _copy_rows,
    _empty_rows,
    _layout,
    _select_ids,
    _token_ranks,
    _weights,
    _write_plan,
    _zero_rows,
)


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
        HAS_BIAS, KEY_LOGITS, NEED_MS, STAGES, PACKED, SHIFT, EXACT_PACK, TIE_CHECK)
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
