"""The @triton.jit kernels behind routerlib.kernels.experts (launchers and autograd live there).

Two kernels, each a grouped GEMM over the ragged expert segments of a RoutingPlan:

  _grouped_mm_kernel     out[r] = A[r] @ W[e(r)] for every used row r, tiles of BLOCK_M rows that
                         never straddle two experts. A is read straight from the tokens through
                         row_to_slot (A_GATHER) or from a row buffer. Epilogues: plain store,
                         SwiGLU of a gate/up pair of accumulators, scaling by the combine weight,
                         and the SwiGLU backward (with the partial dots of d(combine weight),
                         optionally storing the recomputed h for a library weight gradient).
  _grouped_wgrad_kernel  dW[e] = A_e^T @ B_e over the rows of expert e (the weight gradients):
                         A and B rows read through the plan or from row buffers, with SwiGLU
                         recomputed from the saved pre-activations on load.

The tile map (_tile_of) is computed inside each program from kept_counts [E] and
expert_offsets [E+1]: tile i belongs to the expert whose cumulative tile count first exceeds i.
No host sync, no tile-map tensor, and an expert without rows owns no tile. The grid is a static
bound on the number of tiles; programs past the real count return at once.

Loads of A and B tiles go through _load_a / _load_b so a dequantizing variant can replace them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Epilogues of _grouped_mm_kernel
EPI_STORE = 0  # out = acc
EPI_SWIGLU = 1  # gate/up accumulators: h = silu(gate) * up (+ the pre-activations if PRE)
EPI_SCALE = 2  # out = weight[slot] * acc
EPI_SWIGLU_BWD = 3  # acc = dy @ W_down^T: d(gate), d(up) and d(weight) partial dots


@triton.jit
def _tile_of(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Tile pid_m of the ragged tile map -> (expert, first row, end of the expert's rows, valid).
    Expert e owns ceil(kept_counts[e] / BLOCK_M) consecutive tiles."""
    e = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + e, mask=e < E, other=0)  # [BLOCK_E] int32 rows used
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)  # inclusive
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)  # E when pid_m is past the last tile
    first = tl.sum(tl.where(e < expert, tiles, 0), 0)
    rows_e = tl.sum(tl.where(e == expert, cnt, 0), 0)
    start = tl.load(offsets_ptr + expert)  # offsets has E + 1 entries
    return expert, start + (pid_m - first) * BLOCK_M, start + rows_e, expert < E


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Programs in groups of GROUP_M row tiles walk N together: consecutive programs reuse the
    same weight tiles (same expert) and A rows from L2."""
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _load_a(a_ptr, src_rows, row_ok, offs_k, K, stride_a):
    """A tile [BLOCK_M, BLOCK_K] of rows src_rows (masked rows and columns read 0)."""
    ptrs = a_ptr + src_rows[:, None].to(tl.int64) * stride_a + offs_k[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)


@triton.jit
def _load_b(b_ptr, offs_k, offs_n, K, N, stride_bk, stride_bn):
    """B tile [BLOCK_K, BLOCK_N] of one expert's weight matrix (any strides: W or W^T)."""
    ptrs = (b_ptr + offs_k[:, None].to(tl.int64) * stride_bk
            + offs_n[None, :].to(tl.int64) * stride_bn)
    return tl.load(ptrs, mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. IEEE: fp32 tiles multiplied in full fp32 (no TF32). UPCAST (set under
    TRITON_INTERPRET=1 only): the interpreter's tl.dot reads 16-bit float tiles as integers, so
    there the tiles go in as fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _grouped_mm_kernel(
    a_ptr,  # A_GATHER: tokens [T, K]; else rows [R, K]
    b_ptr,  # [E, ...] one weight matrix an expert, read through stride_be/bk/bn
    out_ptr,  # [R, N] (EPI_SWIGLU_BWD: [R, 2N] d(gate) | d(up))
    pre_ptr,  # EPI_SWIGLU with PRE: [R, 2N] gate | up pre-activations written;
    #           EPI_SWIGLU_BWD: [R, 2N] the saved pre-activations read
    dw_ptr,  # EPI_SWIGLU_BWD: [R, num_n] fp32 partial dots of d(combine weight)
    h_ptr,  # EPI_SWIGLU_BWD with STORE_H: [R, N] the recomputed h (for dW_down elsewhere)
    row_to_slot_ptr,  # [R] int32
    counts_ptr,  # [E] int32 rows used by each expert
    offsets_ptr,  # [E + 1] int32 first row of each expert's segment
    weights_ptr,  # [T * S] fp32 combine weight of each slot
    N, K, S, E, M_TILES,
    stride_a, stride_be, stride_bk, stride_bn, stride_out, stride_pre,
    EPILOGUE: tl.constexpr, A_GATHER: tl.constexpr, NEED_SLOT: tl.constexpr, PRE: tl.constexpr,
    STORE_H: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), M_TILES, num_n, GROUP_M)
    expert, row_lo, row_hi, valid = _tile_of(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if not valid:
        return
    offs_m = row_lo + tl.arange(0, BLOCK_M)  # [BLOCK_M] buffer rows
    row_ok = offs_m < row_hi
    slot = offs_m
    if NEED_SLOT:
        slot = tl.load(row_to_slot_ptr + offs_m, mask=row_ok, other=-1)
        row_ok = row_ok & (slot >= 0)
    src = offs_m
    if A_GATHER:
        src = slot // S  # token of the row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the up half (EPI_SWIGLU)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _load_a(a_ptr, src, row_ok, offs_k, K, stride_a)
        b = _load_b(b_base, offs_k, offs_n, K, N, stride_bk, stride_bn)
        acc = _dot(a, b, acc, IEEE, UPCAST)
        if EPILOGUE == 1:
            b2 = _load_b(b_base + N * stride_bn, offs_k, offs_n, K, N, stride_bk, stride_bn)
            acc2 = _dot(a, b2, acc2, IEEE, UPCAST)
    rows64 = offs_m.to(tl.int64)
    n_ok = offs_n < N
    mask = (offs_m < row_hi)[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rows64[:, None] * stride_out + offs_n[None, :]
    if EPILOGUE == 0:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        h = acc * tl.sigmoid(acc) * acc2
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=mask)
        if PRE:
            pre_ptrs = pre_ptr + rows64[:, None] * stride_pre + offs_n[None, :]
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
            tl.store(pre_ptrs + N, acc2.to(pre_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 2:
        w = tl.load(weights_ptr + slot, mask=row_ok, other=0.0)  # [BLOCK_M] fp32
        tl.store(out_ptrs, (acc * w[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # acc = dy[token] @ W_down[e]^T = d(unweighted h); recompute h from the saved pair
        pre_ptrs = pre_ptr + rows64[:, None] * stride_pre + offs_n[None, :]
        g = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(pre_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        # d(weight) = <dy, h @ W_down> = <dy @ W_down^T, h>, one partial dot per N tile;
        # h rounded to the activation dtype as the forward's down GEMM read it
        h_lo = (silu * u).to(pre_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + rows64[:, None] * N + offs_n[None, :], h_lo, mask=mask)
        h = h_lo.to(tl.float32)
        dot = tl.sum(tl.where(mask, acc * h, 0.0), 1)  # [BLOCK_M]
        tl.store(dw_ptr + rows64 * num_n + pid_n, dot, mask=offs_m < row_hi)
        w = tl.load(weights_ptr + slot, mask=row_ok, other=0.0)
        dh = acc * w[:, None]
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(out_ptrs, dg.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptrs + N, (dh * silu).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,  # A_GATHER: tokens [T, M]; A_SWIGLU: pre-activations [R, 2M]; else rows [R, M]
    b_ptr,  # B_GATHER: tokens [T, N] (scaled by the slot's weight if B_SCALE); else rows [R, N]
    out_ptr,  # [E, M, N] contiguous
    row_to_slot_ptr,  # [R] int32
    counts_ptr,  # [E] int32
    offsets_ptr,  # [E + 1] int32
    weights_ptr,  # [T * S] fp32
    M, N, S, stride_a, stride_b,
    A_GATHER: tl.constexpr, A_SWIGLU: tl.constexpr, B_GATHER: tl.constexpr,
    B_SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[e][m, n] = sum over rows r of expert e of A[r, m] * B[r, n]; an expert without rows
    writes zeros (its gradient)."""
    expert = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    start = tl.load(offsets_ptr + expert)
    end = start + tl.load(counts_ptr + expert)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] buffer rows
        r_ok = rows < end
        slot = tl.load(row_to_slot_ptr + rows, mask=r_ok, other=-1)
        r_ok = r_ok & (slot >= 0)
        token = slot // S
        a_rows = rows
        if A_GATHER:
            a_rows = token
        a_mask = r_ok[:, None] & m_ok[None, :]
        a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_a + offs_m[None, :]
        if A_SWIGLU:
            g = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            u = tl.load(a_ptrs + M, mask=a_mask, other=0.0).to(tl.float32)
            a = (g * tl.sigmoid(g) * u).to(a_ptr.dtype.element_ty)  # [BLOCK_K, BLOCK_M]
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b_rows = rows
        if B_GATHER:
            b_rows = token
        b_ptrs = b_ptr + b_rows[:, None].to(tl.int64) * stride_b + offs_n[None, :]
        b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if B_SCALE:
            w = tl.load(weights_ptr + slot, mask=r_ok, other=0.0)
            b = (b.to(tl.float32) * w[:, None]).to(b_ptr.dtype.element_ty)
        acc = _dot(tl.trans(a), b, acc, IEEE, UPCAST)
    out_ptrs = (out_ptr + expert.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N
                + offs_n[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
