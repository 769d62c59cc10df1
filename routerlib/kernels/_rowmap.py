"""The two row-map kernels behind dispatch and combine (each op's backward is the other's kernel).

Both walk the tokens (token-major), so every HBM byte moves exactly once:

  scatter_rows   per token t: read src[t] once, write w[t, j] * src[t] (or src[t] itself) to the
                 row of each kept slot j; optionally also dot(src[t], dot_src[row]) per slot.
                 Extra programs write zeros to the empty rows (row_to_slot == -1).
                 Used by dispatch forward (x -> rows: reads T*D, writes R*D: the floor) and by
                 combine backward (grad_y -> grad_expert_out and grad_weights, one read of grad_y).
  gather_reduce  per token t: y[t] = sum_j w[t, j] * src[slot_to_row[t, j]] in fp32 registers.
                 Used by combine forward (reads T*K*D, writes T*D: the floor) and by dispatch
                 backward (w = 1: the dual of the gather, written as a gather so no atomics).

Every output row or token is written by exactly one program: no atomics, deterministic results.
Where the token blocks alone leave SMs idle (decode sizes) the grid's second axis splits D into
ranges of whole blocks (d_split); on Hopper both kernels are programmatic dependent launches
(_pdl_flags).

Launch configs: on a GPU, triton.autotune over `_hopper_configs()` keyed on (D, S, flags, dtypes)
and the token class of T (token_class: six size classes from decode to prefill): without the
class a process keeps the configs chosen at its first call's T for every T of that D (the
decode path then ran 1.7x slower at T=64 after a first call at T=1). A class, not T itself: a
server sees every batch size, and each new key costs one tuning sweep.
Each launch key's config is chosen once (_launch) and reused; the pins ROUTERLIB_SCATTER_CONFIG /
ROUTERLIB_GATHER_CONFIG (read once, at import) set one for tuning: "default" (the heuristic
below) or "BLOCK_T=4,BLOCK_D=1024,num_warps=8". Under TRITON_INTERPRET=1 there is no autotune.
"""

from __future__ import annotations

import bisect
import os

import torch
import triton
import triton.language as tl

from routerlib.kernels.common import interpreting, next_pow2, pdl_start, pdl_supported

# Slot loops up to this S are unrolled (all K row loads in flight at once); beyond it (expert
# choice, S = E) they run as a runtime loop.
MAX_UNROLL = 16
# A zeroing program of scatter_rows covers ZERO_GROUPS * BLOCK_T rows (most of them full rows
# it only glances at: one int32 read each).
ZERO_GROUPS = 8
# Set by tests: outputs are allocated filled with NaN, so any element a kernel forgets to write
# shows up. Never set in production (it costs one extra write of every output).
POISON_OUTPUTS = False

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# The tuning pins, one per kernel, read once here: "default" (default_config) or
# "BLOCK_T=4,BLOCK_D=1024,num_warps=8"; unset, the configs are chosen as _config says.
PINS = {"scatter": ("ROUTERLIB_SCATTER_CONFIG", os.environ.get("ROUTERLIB_SCATTER_CONFIG", "")),
        "gather": ("ROUTERLIB_GATHER_CONFIG", os.environ.get("ROUTERLIB_GATHER_CONFIG", ""))}


@triton.jit
def _d_range(D, BLOCK_D: tl.constexpr):
    """This program's columns [lo, hi) of D: the grid's second axis splits D into that many
    ranges of whole blocks (small T: more programs than token blocks alone give)."""
    per = tl.cdiv(tl.cdiv(D, BLOCK_D), tl.num_programs(1)) * BLOCK_D
    lo = tl.program_id(1) * per
    return lo, tl.minimum(D, lo + per)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Launch configs
# ----------------------------------------------------------------------------------------------

def default_config(D: int) -> dict[str, int]:
    """Heuristic config (interpreter, pinned runs): a ~4K-element tile, several tokens per program
    when D is small so each program still moves enough bytes."""
    block_d = min(next_pow2(max(D, 1)), 2048)
    block_t = max(1, min(64, 4096 // block_d))
    tile = block_t * block_d
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": num_warps}


def parse_pin(env: str, value: str, D: int) -> dict[str, int] | None:
    """The config a pin's value names (env: the pin's name, for the error), or None (unset)."""
    value = value.strip()
    if not value:
        return None
    if value == "default":
        return default_config(D)
    try:
        cfg = {k.strip(): int(v) for k, v in (kv.split("=") for kv in value.split(","))}
    except ValueError as e:
        raise ValueError(f"{env}={value!r}: expected 'default' or "
                         "'BLOCK_T=<int>,BLOCK_D=<int>,num_warps=<int>'") from e
    missing = {"BLOCK_T", "BLOCK_D"} - cfg.keys()
    if missing:
        raise ValueError(f"{env}={value!r}: missing {sorted(missing)}")
    return cfg


_sm_counts: dict[int, int] = {}
# Programs a launch aims for per SM before splitting D: 2 keep every SM busy with one wave.
PROGRAMS_PER_SM = 2


def sm_count(dev: torch.device) -> int:
    """The device's SMs (8 on the CPU: the interpreter then also exercises the D split)."""
    if dev.type != "cuda":
        return 8
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    got = _sm_counts.get(idx)
    if got is None:
        got = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return got


def d_split(programs: int, D: int, block_d: int, dev: torch.device) -> int:
    """Ranges of D per token block (the grid's second axis): where the token blocks alone leave
    SMs idle (decode: T=64 at BLOCK_T=1 is 64 programs on 132 SMs), split D into up to
    PROGRAMS_PER_SM * SMs / programs ranges of whole blocks; 1 at prefill sizes (without the
    split the decode path took 27.0-41.1 us instead of 15.0-29.0 on an H200)."""
    want = -(-PROGRAMS_PER_SM * sm_count(dev) // max(programs, 1))
    return max(1, min(-(-D // block_d), want))


# upper bounds of the token classes of the autotune key (class 5: past the last)
TOKEN_CLASSES = (16, 128, 1024, 8192, 32768)


def token_class(num_tokens: int) -> int:
    """The autotune key's size class of T: 0 for T <= 16 (decode) ... 5 for T > 32768 (the
    bounds below T; every dispatch and combine call asks, so a bisect, not a loop)."""
    return bisect.bisect_left(TOKEN_CLASSES, num_tokens)


def _pdl_flags(dev: torch.device) -> dict:
    """Both kernels as programmatic dependent launches where supported (each waits for the
    previous kernel's end before its first load, so its launch and prologue overlap that
    kernel's tail)."""
    return dict(PDL=True, launch_pdl=True) if pdl_supported(dev) else {}


def decode_config(t_class: int, D: int) -> dict[str, int] | None:
    """The fixed config of token class 1 (17 <= T <= 128, the decode target's T=64), or None
    (autotune). There the autotuner, timing each kernel alone, chose wide tiles (scatter
    BLOCK_T=4, BLOCK_D=1024, 8 warps; gather BLOCK_T=2, BLOCK_D=2048, 8 warps) and the decode
    path (route, dispatch, combine of T=64 D=4096 in a CUDA graph) took 15.1 / 15.4 us on an
    H100; one token a program, 1024 columns, 4 warps: 14.7 / 14.7."""
    if t_class != 1:
        return None
    block_d = min(1024, max(16, next_pow2(D)))
    return {"BLOCK_T": 1, "BLOCK_D": block_d, "num_warps": max(1, min(4, block_d // 256))}


_chosen: dict[tuple, dict] = {}  # launch key -> the config every later call takes


def _launch(which: str, tuned, plain, key: tuple, D: int, grid, args: tuple, flags: dict,
            config: dict | None) -> None:
    """Launch `plain` with the config chosen once per key (D, S, token class, dtypes, flags,
    device): an explicit one (config), the pin, the interpreter's default, decode_config, or
    the autotuner's pick on the key's first call. No environment read or autotuner dispatch
    after the first call."""
    if config is None:
        config = _chosen.get(key)
    if config is None:
        env, value = PINS[which]
        config = parse_pin(env, value, D)
        if config is None and interpreting():
            config = default_config(D)
        if config is None:
            config = decode_config(args[-1], D)
        if config is None:  # autotune once: the winner serves every later call of the key
            tuned[grid](*args, **flags)
            best = tuned.best_config
            _chosen[key] = {**best.kwargs, "num_warps": best.num_warps,
                            "num_stages": best.num_stages}
            return
        _chosen[key] = config
    plain[grid](*args, **flags, **config)


def _hopper_configs() -> list[triton.Config]:
    """H100/H200: 16-byte vectors need BLOCK_D >= 8 (bf16) per thread-chunk; tiles of 2K-8K
    elements keep 8-32 elements per thread in flight with 4-8 warps."""
    configs = []
    for block_d in (512, 1024, 2048):
        for tile, num_warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
            configs.append(triton.Config({"BLOCK_T": max(1, tile // block_d), "BLOCK_D": block_d},
                                         num_warps=num_warps))
    return configs


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Small D: clamp BLOCK_D to D's next power of two and spend the tile on more tokens."""
    cap = max(16, next_pow2(named_args["D"]))
    seen: set[tuple[int, int, int]] = set()
    out = []
    for c in configs:
        tile = c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_D"]
        block_d = min(c.kwargs["BLOCK_D"], cap)
        block_t = max(1, min(128, tile // block_d))
        key = (block_t, block_d, c.num_warps)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({"BLOCK_T": block_t, "BLOCK_D": block_d},
                                     num_warps=c.num_warps))
    return out


_EVEN_D = {"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0}


# ----------------------------------------------------------------------------------------------
# scatter_rows: dispatch forward, combine backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _scatter_slot(j, src, dots, toks64, tmask, d, m, slot_cols, S, D,
                  slot_to_row_ptr, w_ptr, dot_src_ptr, dst_ptr,
                  HAS_WEIGHTS: tl.constexpr, COMPUTE_DOT: tl.constexpr):
    """Write slot j of each token in the block; return the dot accumulator with column j added."""
    row = tl.load(slot_to_row_ptr + toks64 * S + j, mask=tmask, other=-1)  # [BLOCK_T]
    kept = row >= 0
    offs = row.to(tl.int64)[:, None] * D + d[None, :]  # [BLOCK_T, BLOCK_D]; int64: R*D > 2^31
    mk = m & kept[:, None]
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + toks64 * S + j, mask=kept, other=0.0)  # [BLOCK_T] fp32
        val = (src.to(tl.float32) * w[:, None]).to(dst_ptr.dtype.element_ty)
    else:
        val = src  # an exact copy, no rounding
    tl.store(dst_ptr + offs, val, mask=mk)
    if COMPUTE_DOT:
        other = tl.load(dot_src_ptr + offs, mask=mk, other=0.0)
        # fp32 inputs: products and sum in fp64 (a product of two fp32 is exact there), so the
        # D-long dot, which cancels, comes out as the exact one rounded once
        part = tl.sum(src.to(dots.dtype) * other.to(dots.dtype), axis=1)  # [BLOCK_T]
        dots = tl.where(slot_cols[None, :] == j, dots + part[:, None], dots)
    return dots


@triton.jit
def _scatter_rows_kernel(
    src_ptr,          # [T, D]  x (dispatch) or grad_y (combine backward)
    slot_to_row_ptr,  # [T, S]  int32, -1 = dropped slot
    row_to_slot_ptr,  # [R]     int32, -1 = empty row
    w_ptr,            # [T, S]  fp32 slot weights (read only if HAS_WEIGHTS)
    dot_src_ptr,      # [R, D]  expert_out (read only if COMPUTE_DOT)
    dot_out_ptr,      # [T, S]  fp32 dot(src[t], dot_src[row]) per slot (if COMPUTE_DOT)
    dst_ptr,          # [R, D]  rows
    T, R, D, S,
    T_CLASS,  # token_class(T): read only by the autotune key
    S_UNROLL: tl.constexpr,   # S when S <= MAX_UNROLL (slot loop unrolled), else 0
    S_PAD: tl.constexpr,      # next power of two >= S (dot accumulator width)
    HAS_WEIGHTS: tl.constexpr,
    COMPUTE_DOT: tl.constexpr,
    DOT_F64: tl.constexpr,    # the dot of fp32 inputs accumulates in fp64
    ZERO_GROUPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,     # D % BLOCK_D == 0: no column mask
    PDL: tl.constexpr = False,  # launched as a programmatic dependent (_pdl_flags)
):
    pdl_start(PDL)
    pid = tl.program_id(0)
    num_token_blocks = tl.cdiv(T, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    if pid < num_token_blocks:
        toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = toks < T
        toks64 = toks.to(tl.int64)
        slot_cols = tl.arange(0, S_PAD)
        dots = tl.zeros([BLOCK_T, S_PAD], dtype=tl.float64 if DOT_F64 else tl.float32)
        d_lo, d_hi = _d_range(D, BLOCK_D)  # all of D when COMPUTE_DOT (the host's rule)
        for d0 in range(d_lo, d_hi, BLOCK_D):
            d = d0 + cols
            if EVEN_D:
                m = tmask[:, None]
            else:
                m = tmask[:, None] & (d < D)[None, :]
            src = tl.load(src_ptr + toks64[:, None] * D + d[None, :], mask=m, other=0.0)
            if S_UNROLL > 0:
                for j in tl.static_range(S_UNROLL):
                    dots = _scatter_slot(j, src, dots, toks64, tmask, d, m, slot_cols, S, D,
                                         slot_to_row_ptr, w_ptr, dot_src_ptr, dst_ptr,
                                         HAS_WEIGHTS, COMPUTE_DOT)
            else:
                for j in range(S):
                    dots = _scatter_slot(j, src, dots, toks64, tmask, d, m, slot_cols, S, D,
                                         slot_to_row_ptr, w_ptr, dot_src_ptr, dst_ptr,
                                         HAS_WEIGHTS, COMPUTE_DOT)
        if COMPUTE_DOT:
            dmask = tmask[:, None] & (slot_cols < S)[None, :]
            tl.store(dot_out_ptr + toks64[:, None] * S + slot_cols[None, :], dots.to(tl.float32),
                     mask=dmask)
    else:
        # Zero the empty rows (padding, capacity left unfilled): no slot writes them.
        zero = tl.zeros([BLOCK_T, BLOCK_D], dtype=dst_ptr.dtype.element_ty)
        d_lo, d_hi = _d_range(D, BLOCK_D)
        for g in tl.static_range(ZERO_GROUPS):
            rows = ((pid - num_token_blocks) * ZERO_GROUPS + g) * BLOCK_T + tl.arange(0, BLOCK_T)
            in_range = rows < R
            slot = tl.load(row_to_slot_ptr + rows, mask=in_range, other=0)
            is_empty = in_range & (slot < 0)
            if tl.sum(is_empty.to(tl.int32), axis=0) > 0:  # most groups are full: skip them
                base = rows.to(tl.int64)[:, None] * D
                for d0 in range(d_lo, d_hi, BLOCK_D):
                    d = d0 + cols
                    if EVEN_D:
                        zm = is_empty[:, None]
                    else:
                        zm = is_empty[:, None] & (d < D)[None, :]
                    tl.store(dst_ptr + base + d[None, :], zero, mask=zm)


_scatter_rows_plain = triton.heuristics(_EVEN_D)(_scatter_rows_kernel)
_scatter_rows_tuned = triton.autotune(
    configs=_hopper_configs(), key=["D", "S", "T_CLASS", "HAS_WEIGHTS", "COMPUTE_DOT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_scatter_rows_plain)


def scatter_rows(src: torch.Tensor, slot_to_row: torch.Tensor, row_to_slot: torch.Tensor,
                 weights: torch.Tensor | None = None, dot_src: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, config: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dst[row] = weights[t, j] * src[t] (or src[t]) for each kept slot (t, j) -> row; empty rows
    are zero. With dot_src, also dots[t, j] = <src[t], dot_src[row]> in fp32 (0 if dropped).

    src: [T, D]; slot_to_row: [T, S] int32; row_to_slot: [R] int32; weights: [T, S] fp32 or None;
    dot_src: [R, D] or None. Returns (dst [R, D] in out_dtype or src.dtype, dots [T, S] or None).
    config: {"BLOCK_T", "BLOCK_D", "num_warps"} instead of the chosen one (benchmarks, tests).
    """
    src = src.contiguous()
    slot_to_row = slot_to_row.contiguous()
    row_to_slot = row_to_slot.contiguous()
    T, D = src.shape
    S = slot_to_row.shape[1]
    R = row_to_slot.shape[0]
    dst = empty((R, D), out_dtype or src.dtype, src.device)
    dots = None
    if dot_src is not None:
        dot_src = dot_src.contiguous()
        dots = empty((T, S), torch.float32, src.device)
    if weights is not None:
        weights = weights.contiguous()
    if D == 0 or R == 0:  # nothing to move; the dot over an empty row is 0
        if dots is not None:
            dots.zero_()
        return dst, dots
    args = (src, slot_to_row, row_to_slot, src if weights is None else weights,
            src if dot_src is None else dot_src, dst if dots is None else dots, dst, T, R, D, S,
            token_class(T))
    # The dot accumulator is [BLOCK_T, S_PAD]; without dots keep it one column wide.
    flags = dict(S_UNROLL=S if S <= MAX_UNROLL else 0,
                 S_PAD=next_pow2(S) if dot_src is not None else 1,
                 HAS_WEIGHTS=weights is not None, COMPUTE_DOT=dot_src is not None,
                 DOT_F64=dot_src is not None and dot_src.dtype == torch.float32
                 and src.dtype == torch.float32,
                 ZERO_GROUPS=ZERO_GROUPS, **_pdl_flags(src.device))

    def grid(meta: dict) -> tuple[int, int]:
        bt = meta["BLOCK_T"]
        tokens = triton.cdiv(T, bt)  # the D split counts the copying programs only
        split = 1 if dot_src is not None else d_split(tokens, D, meta["BLOCK_D"], src.device)
        return (tokens + triton.cdiv(R, bt * ZERO_GROUPS), split)

    key = ("scatter", D, S, args[-1], src.dtype, dst.dtype, src.device, weights is None,
           dot_src is None, flags.get("DOT_F64"), "PDL" in flags)
    _launch("scatter", _scatter_rows_tuned, _scatter_rows_plain, key, D, grid, args, flags,
            config)
    return dst, dots


# ----------------------------------------------------------------------------------------------
# gather_reduce: combine forward, dispatch backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _gather_slot(j, acc, toks64, tmask, d, m, S, D, src_ptr, slot_to_row_ptr, w_ptr,
                 HAS_WEIGHTS: tl.constexpr):
    """acc += w[t, j] * src[slot_to_row[t, j]] (fp32) for each token of the block."""
    row = tl.load(slot_to_row_ptr + toks64 * S + j, mask=tmask, other=-1)  # [BLOCK_T]
    kept = row >= 0
    vals = tl.load(src_ptr + row.to(tl.int64)[:, None] * D + d[None, :], mask=m & kept[:, None],
                   other=0.0).to(tl.float32)
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + toks64 * S + j, mask=kept, other=0.0)  # dropped slots add nothing
        acc += vals * w[:, None]
    else:
        acc += vals
    return acc


@triton.jit
def _gather_reduce_kernel(
    src_ptr,          # [R, D]  expert_out (combine) or grad of the dispatched rows
    slot_to_row_ptr,  # [T, S]  int32, -1 = dropped slot
    w_ptr,            # [T, S]  fp32 slot weights (read only if HAS_WEIGHTS)
    out_ptr,          # [T, D]
    T, D, S,
    T_CLASS,  # token_class(T): read only by the autotune key
    S_UNROLL: tl.constexpr,   # S when S <= MAX_UNROLL (slot loop unrolled), else 0
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,     # D % BLOCK_D == 0: no column mask
    PDL: tl.constexpr = False,  # launched as a programmatic dependent (_pdl_flags)
):
    pdl_start(PDL)
    pid = tl.program_id(0)
    toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    toks64 = toks.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    d_lo, d_hi = _d_range(D, BLOCK_D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + cols
        if EVEN_D:
            m = tmask[:, None]
        else:
            m = tmask[:, None] & (d < D)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if S_UNROLL > 0:
            for j in tl.static_range(S_UNROLL):
                acc = _gather_slot(j, acc, toks64, tmask, d, m, S, D, src_ptr, slot_to_row_ptr,
                                   w_ptr, HAS_WEIGHTS)
        else:
            for j in range(S):
                acc = _gather_slot(j, acc, toks64, tmask, d, m, S, D, src_ptr, slot_to_row_ptr,
                                   w_ptr, HAS_WEIGHTS)
        tl.store(out_ptr + toks64[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m)


_gather_reduce_plain = triton.heuristics(_EVEN_D)(_gather_reduce_kernel)
_gather_reduce_tuned = triton.autotune(
    configs=_hopper_configs(), key=["D", "S", "T_CLASS", "HAS_WEIGHTS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_gather_reduce_plain)


def gather_reduce(src: torch.Tensor, slot_to_row: torch.Tensor,
                  weights: torch.Tensor | None = None, config: dict | None = None
                  ) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * src[slot_to_row[t, j]] over kept slots (weights = 1 if None),
    accumulated in fp32, written in src's dtype.

    src: [R, D]; slot_to_row: [T, S] int32 (-1 = dropped); weights: [T, S] fp32. Returns [T, D].
    config: {"BLOCK_T", "BLOCK_D", "num_warps"} instead of the chosen one (benchmarks, tests).
    """
    src = src.contiguous()
    slot_to_row = slot_to_row.contiguous()
    T, S = slot_to_row.shape
    D = src.shape[1]
    out = empty((T, D), src.dtype, src.device)
    if T == 0 or D == 0:
        return out
    if weights is not None:
        weights = weights.contiguous()
    args = (src, slot_to_row, src if weights is None else weights, out, T, D, S, token_class(T))
    flags = dict(S_UNROLL=S if S <= MAX_UNROLL else 0, HAS_WEIGHTS=weights is not None,
                 **_pdl_flags(src.device))

    def grid(meta: dict) -> tuple[int, int]:
        tokens = triton.cdiv(T, meta["BLOCK_T"])
        return (tokens, d_split(tokens, D, meta["BLOCK_D"], src.device))

    key = ("gather", D, S, args[-1], src.dtype, src.device, weights is None, "PDL" in flags)
    _launch("gather", _gather_reduce_tuned, _gather_reduce_plain, key, D, grid, args, flags,
            config)
    return out
