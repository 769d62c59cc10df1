"""Routing in three launches (two with few tiles, one when every token fits one tile), no sort:
the fast route.

  1. _select_rows_kernel  one program per tile of BT tokens, H threads per token: score + top-K
                          by insertion into register lists (no cross-thread reductions; packed
                          int32 keys with the index in the low bits where that measured faster),
                          weights, ids; each slot's rank among the tile's earlier tokens of its
                          expert (popcounts of bit-transposed membership masks with one thread
                          a token and E <= 128, else a cumsum of packed 8-bit counts along the
                          tile; no sort) into slot_to_row, and the tile's expert counts.
  2. _scan_tiles_kernel   exclusive scan of the tile counts down the tiles (>= 16 programs);
                          skipped when tiles x experts <= _MAX_SUM_TILES (decode sizes): the
                          place kernel then scans them itself.
  3. _place_slots_kernel  elementwise over the slots: + the earlier tiles' count, kept iff
                          rank < C, row = the expert's start + rank; slot_to_row, row_to_slot;
                          extra programs mark the empty rows (capacity or padded layouts).
When T <= BT, kernel 1 builds the whole plan itself (FUSED_PLAN): one launch.
route_dispatch_rows adds the dispatch of the tokens: in the same single launch up to 16 tokens
(_route_dispatch_kernels.py), or (pinned, measured slower) in the place kernel.

Measured on an H100 (results/h100/route_breakdown_8a3804a.json, T=16384, E=128, K=8, fp32):
select 7.0 us (8.7 at 42230d5, 11.4 with the 8-bit count table at ba899a1), scan 3.0 us, place
4.1 us of device time; 19.7-20.1 us a route in a CUDA graph (results/h100/targets.json at
b6bfe8f, targets_c96d3dd.json), where a one-kernel graph takes 4.9 us.

Scope (`applies`): token choice, drop_policy "position", no group limit, K <= 8, E <= 512,
fp32/bf16/fp16 logits, no gradient and no loss sums needed (inference), not while torch.compile
traces. Everything else takes the general path (kernels/topk.py + kernels/plan.py). The results
equal the general path's and the reference's: the same ids, ranks and rows, integer for integer;
weights to fp32 rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from triton import knobs
from triton.runtime import driver

from routerlib.config import RouterConfig
from routerlib.kernels._route_dispatch_kernels import _route_dispatch_kernel
from routerlib.kernels._route_rows_kernels import (
    _place_slots_kernel,
    _route_sync_kernel,
    _scan_tiles_kernel,
    _select_rows_kernel,
)
from routerlib.kernels._rowmap import interpreting, pdl_supported
from routerlib.kernels._topk_kernels import next_pow2
from routerlib.reference.plan import num_rows
from routerlib.types import RoutingPlan, Selection

MAX_K = 8
MAX_E = 512
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_S = 1024  # slots per program of the place kernel
# tiles (rounded up to a power of two) x experts up to which the place kernel scans the tile
# counts itself, in registers. Past it a loop over the counts in every program measured slower
# than the scan launch (T=4096, 128 tiles x 128 experts: 23.3 vs 17.8 us, results/h100/
# ab_tiles_scan_6f2ebbd.txt against ab_lane_ranks_604cd5a.txt)
_MAX_SUM_TILES = 4096
# every knob a route reads (each call reads them all: they are part of its cache key), and
# TRITON_INTERPRET last
_KNOBS = ("ROUTERLIB_ROWS_CONFIG", "ROUTERLIB_ROWS_STAGES", "ROUTERLIB_ROWS_PACKED",
          "ROUTERLIB_ROWS_SCAN", "ROUTERLIB_ROWS_LANE_RANKS", "ROUTERLIB_ROWS_SYNC",
          "ROUTERLIB_ROWS_SYNC_GRID", "ROUTERLIB_ROWS_COOP", "ROUTERLIB_ROWS_PDL",
          "ROUTERLIB_ROWS_NETWORK", "ROUTERLIB_ROWS_DISPATCH_PROGRAMS", "TRITON_INTERPRET")
# CPython keeps the environment in a dict of encoded names (os.environ._data), which every
# os.environ write (monkeypatch.setenv, mock.patch.dict) updates: reading it directly costs
# ~0.1 us a knob instead of ~1 us through os.environ.get (nine a call: ~8 us of the eager
# route's host time on the lent hosts)
_ENV = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(os.environ.encodekey(k) for k in _KNOBS) if isinstance(_ENV, dict) else None


def _knob_values() -> tuple:
    """The knobs' current values (raw: bytes on POSIX), TRITON_INTERPRET last."""
    if _ENV_KEYS is not None:
        return tuple(map(_ENV.get, _ENV_KEYS))
    return tuple(map(os.environ.get, _KNOBS))


_empty = torch.empty  # every output comes from here (tests swap in a poisoning allocator)
# near ties go to the exact insertion; tests (and A/B timings of the packed path alone:
# ROUTERLIB_ROWS_TIE_CHECK=0, wrong answers on near ties) turn it off
_TIE_CHECK = os.environ.get("ROUTERLIB_ROWS_TIE_CHECK", "1") != "0"


_ROW_ROUTE_KEY = os.environ.encodekey("ROUTERLIB_ROW_ROUTE") if _ENV_KEYS is not None else None


def enabled() -> bool:
    """ROUTERLIB_ROW_ROUTE=0 switches the fast route off (the general path then runs). Read
    from the environment's dict as the knobs are (~0.1 us instead of ~1 a call)."""
    if _ROW_ROUTE_KEY is not None:
        return _ENV.get(_ROW_ROUTE_KEY) not in (b"0", "0")
    return os.environ.get("ROUTERLIB_ROW_ROUTE", "1") != "0"


def applies(logits: torch.Tensor, cfg: RouterConfig, need_stats: bool) -> bool:
    return (cfg.routing == "token_choice" and cfg.drop_policy == "position"
            and cfg.n_groups == 1 and cfg.top_k <= MAX_K and cfg.num_experts <= MAX_E
            and logits.dtype in _DTYPES and logits.shape[0] >= 1 and not need_stats
            and not (torch.is_grad_enabled() and logits.requires_grad)
            and not torch.compiler.is_compiling())


def rows_config(num_experts: int, num_tokens: int, top_k: int) -> tuple[int, int, int]:
    """(H threads per token, num_warps, BT tokens per tile). ROUTERLIB_ROWS_CONFIG="H,num_warps"
    pins one. BT = 32 / H * num_warps <= 128 (8-bit counts in the rank table). A thread holds
    W/H words of the tile's rank table (W = E/4 rounded up to a power of two): the defaults
    keep that <= 32."""
    pinned = os.environ.get("ROUTERLIB_ROWS_CONFIG")
    if pinned:
        try:
            h, nw = (int(v) for v in pinned.split(","))
        except ValueError:
            raise ValueError(f"ROUTERLIB_ROWS_CONFIG={pinned!r}: expected 'H,num_warps'") from None
        if h not in (1, 2, 4) or nw not in (1, 2, 4, 8) or 32 // h * nw > 128:
            raise ValueError(f"ROUTERLIB_ROWS_CONFIG={pinned!r}: H in 1, 2, 4; num_warps in "
                             "1, 2, 4, 8; 32 / H * num_warps <= 128")
        return h, nw, 32 // h * nw
    # Measured in CUDA graphs (the current kernels on an H200, results/h200/tune_route_84e5f4f.csv;
    # the previous design on an H100, results/h100/tune_route.csv, ranked them alike): up to ~1k
    # tokens many small tiles win (4 threads a token, 1 warp: T=64 11.6 us, T=256 15.4 us); for
    # prefill 1 thread a token and 1 warp a tile at E <= 128 (T=16384 28.7 us, within 0.4 us of
    # the best split; T=65536 69.4 us), 2 threads and 4 warps at E = 256 (44.3 us)
    if num_tokens <= 1024:
        h, nw = 4, 1
    elif num_experts <= 128:  # with the bit-transposed ranks, 4 warps a tile past 16k tokens
        # (T=65536: 55.2 vs 59.5 us; T=16384: 23.6 vs 22.1, results/h100/ab_tiles_scan_6f2ebbd.txt)
        h, nw = 1, 4 if num_tokens > 16384 else 1
    elif num_experts <= 256:
        h, nw = 2, 4
    else:
        h, nw = 4, 4
    return h, nw, 32 // h * nw


def _stages(packed: int, num_warps: int) -> int:
    """Software-pipelining stages of the select kernel's column loop. 0: the packed loop
    prefetches the next 16 columns into registers itself (no cp.async, shared memory or
    barrier: its sm_90 code has 285 instructions a 16-column step instead of 375), where it
    measured faster: tiles of 4 warps (T > 16384). Same-run A/B on an H100 against 3 stages
    (results/h100/ab_prefetch_d2a2fb5.txt, CUDA graph, E=128): T=65536 47.9 / 47.9 vs 52.3 /
    52.1 us; with one warp a tile it loses (T=16384 21.3 / 21.7 vs 19.7 / 19.9, T=4096 16.7 vs
    15.8: with one warp a scheduler the loads one step ahead apparently do not cover the
    latency that three cp.async stages cover; not profiled). 3 stages measured
    against 2 on an H100 (results/h100/stages_1d3dbd6.txt, E=128): T=16384 26.1 vs 28.9 us,
    T=65536 65.5 vs 72.2. ROUTERLIB_ROWS_STAGES pins another (0 with the exact insertion:
    its loop then runs unpipelined)."""
    pinned = os.environ.get("ROUTERLIB_ROWS_STAGES")
    if pinned is not None:
        return int(pinned)
    return 0 if packed and num_warps >= 4 else 3


def _packed(h: int) -> int:
    """Packed-key selection (see _route_rows_kernels) where it measured faster: one thread a
    token (h), at every T. Same-run A/B on an H100 (results/h100/ab_packed_2c62426.txt, CUDA
    graph, E=128 K=8): T=4096 20.8 vs 22.6 us, T=16384 24.2 vs 26.3 us (bf16 logits 22.1 vs
    24.7); slower with 4 threads a token (T=64: 12.9 vs 11.9; with the network on an H200
    10.4 vs 9.0) and at E=256 (2 threads, 51.1 vs 41.6: instruction-cache stalls, ncu). At
    T=65536 the insertion lost (66.7 vs 65.5 us) and the network wins (H200, results/h200/
    ab_network_56cd269.txt: 46.9 / 46.4 vs 50.5 / 50.9 us). ROUTERLIB_ROWS_PACKED=1 or 0
    forces it on or off.
    Returns 0 (off), 1 (keys inserted one by one) or 2 (8 at a time by a sorting network and a
    bitonic merge: half the min/max of the insertion at K=8; ROUTERLIB_ROWS_NETWORK=0 keeps the
    insertion). The select kernel at T=16384 E=128 issued 5,240 instructions a thread, 82% in
    the column loop, at 0.34 a cycle on one warp a scheduler (ncu, results/h100/
    ncu_route_T16384_E128_c26e3a6.txt): the insertion's min/max were the bulk of it. With the
    network the loop's sm_90 code has 407 instructions per 16 columns instead of 535."""
    pinned = os.environ.get("ROUTERLIB_ROWS_PACKED")
    on = pinned != "0" if pinned is not None else h == 1
    if not on:
        return 0
    return 1 if os.environ.get("ROUTERLIB_ROWS_NETWORK") == "0" else 2


def _sum_tiles(num_tiles: int, block_e: int) -> bool:
    """Whether the place kernel scans the tile counts itself (every program holds all of them in
    registers, num_tiles x block_e int32) instead of a scan launch: one launch less at decode
    sizes. ROUTERLIB_ROWS_SCAN=1 forces the scan launch, =0 the in-place scan (tests only: it
    needs the counts to fit the registers)."""
    pinned = os.environ.get("ROUTERLIB_ROWS_SCAN")
    if pinned is not None:
        return pinned == "0"
    return num_tiles * block_e <= _MAX_SUM_TILES


def _use_lane_ranks(h: int, num_warps: int, num_experts: int, fused: bool) -> bool:
    """Bit-transposed ranks (see _route_rows_kernels): one thread a token (a tile of 32 tokens a
    warp), E <= 128, several tiles. ROUTERLIB_ROWS_LANE_RANKS=0 keeps the one-hot table (A/B
    runs); =1 also takes them with several threads a token where a tile is whole rows of 32
    tokens (rows then span warps)."""
    pinned = os.environ.get("ROUTERLIB_ROWS_LANE_RANKS")
    if pinned == "0" or num_experts > 128 or fused:
        return False
    if pinned == "1":
        return 32 // h * num_warps % 32 == 0
    return h == 1


def _use_pdl(dev: torch.device) -> bool:
    """Programmatic dependent launches of the scan and place kernels (see _route_rows_kernels):
    on sm_90+ GPUs with a Triton that has them. ROUTERLIB_ROWS_PDL=0 turns them off."""
    return os.environ.get("ROUTERLIB_ROWS_PDL") != "0" and pdl_supported(dev)


def _use_sync(cuda: bool, num_tiles: int, scan: bool, capturing: bool, num_tokens: int,
              num_experts: int) -> bool:
    """The one-launch route (_route_sync_kernel: grid barriers instead of kernel boundaries), on
    a GPU with several tiles. Eagerly always: the host's launches set the pace (T=16384: 97 vs
    115 us a route, T=1024: 57 vs 70, results/h100/ab_pdl_a7653d2.txt). In a CUDA graph a barrier
    costs more than a kernel boundary with programmatic dependent launch, except where three
    short launches over tiny tiles are replaced (T <= 1024, 4 threads a token) and at E > 128
    up to T=4096 (64 tiles of 2 threads a token and 4 warps). E=128: T=1024 13.9 vs 15.0 us;
    T=64 (two launches) 11.8 vs 11.1; T=2048 16.8-17.2 vs 15.9; T=4096 17.3 vs 16.8; T=16384
    24.3 vs 20.7; T=65536 75.5 vs 54.6. E=256: T=1024 16.5 vs 17.5, T=4096 26.5 vs 29.3
    (ab_sync_pdl_e256_9af1b90.txt). ROUTERLIB_ROWS_SYNC=0 or 1 pins it off or on."""
    if not cuda or num_tiles < 2 or interpreting():
        return False
    pinned = os.environ.get("ROUTERLIB_ROWS_SYNC")
    if pinned is not None:
        return pinned != "0"
    return not capturing or (scan and (num_tokens <= 1024
                                       or (num_experts > 128 and num_tokens <= 4096)))


# Barrier counters of the one-launch route: one zeroed int32 pool per device, 32 ints (128
# bytes) a counter. A counter must never be shared by two launches that can run at once, so each
# stream gets its own, and each CUDA-graph capture a new one (replays of one graph are
# serialised by CUDA; two graphs may run side by side).
_SYNC_POOL_SLOTS = 4096
_sync_pools: dict[int, list] = {}  # device index -> [pool, next free slot]
_sync_by_stream: dict[tuple[int, int], torch.Tensor] = {}


def _sync_counter(dev: torch.device, idx: int, stream: int, capturing: bool
                  ) -> torch.Tensor | None:
    """This launch's barrier counter, or None (no pool yet while capturing a graph, or the
    pool spent by captures): the caller then takes the separate launches."""
    if not capturing:
        counter = _sync_by_stream.get((idx, stream))
        if counter is not None:
            return counter
    pool = _sync_pools.get(idx)
    if pool is None:
        if capturing:  # a zeroing fill would become a node of the graph
            return None
        pool = _sync_pools[idx] = [torch.zeros(_SYNC_POOL_SLOTS * 32, dtype=torch.int32,
                                               device=dev), 0]
    if pool[1] == _SYNC_POOL_SLOTS:
        return None
    counter = pool[0][pool[1] * 32:pool[1] * 32 + 1]
    pool[1] += 1
    if not capturing:
        _sync_by_stream[(idx, stream)] = counter
    return counter


_occupancy: dict[object, int] = {}  # compiled kernel's hash -> resident programs


def _resident_programs(args: tuple, kwargs: dict) -> int:
    """How many programs of this _route_sync_kernel specialisation fit the GPU at once
    (registers, threads and shared memory per SM: the CUDA occupancy rules). Compiles it."""
    compiled = _route_sync_kernel.warmup(*args, grid=(1,), **kwargs)
    key = getattr(compiled, "hash", id(compiled))
    got = _occupancy.get(key)
    if got is None:
        compiled._init_handles()
        num_warps = kwargs["num_warps"]
        props = torch.cuda.get_device_properties(args[0].device)
        warp_regs = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # 256-register units
        # registers are split over 4 schedulers, a warp's on one of them
        by_regs = 4 * (getattr(props, "regs_per_multiprocessor", 65536) // 4 // warp_regs)
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
        by_smem = (getattr(props, "shared_memory_per_multiprocessor", 233472)
                   // (compiled.metadata.shared + 1024))
        per_sm = min(32, by_regs // num_warps, by_threads, by_smem)
        got = _occupancy[key] = per_sm * props.multi_processor_count
    return got


def _carve(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Every int32/fp32 output of a route lives in one int32 allocation, each starting on a
    128-byte boundary (Triton's 16-byte pointer specialisation holds): a torch.empty costs
    ~5-10 us of host time on the lent H100 hosts (results/h100/route_breakdown.json), and the
    eager route made ten. Returns (the start of each, the allocation's length)."""
    offs, at = [], 0
    for n in sizes:
        offs.append(at)
        at += -(-n // 32) * 32
    return tuple(offs), max(at, 1)


@dataclass
class _Static:
    """What a route call depends on only through its key (shapes, config, dtypes, alignment,
    knobs): sizes, grids, the kernels' constexprs. `compiled` fills on the first call: later
    calls hand their arguments straight to each compiled kernel's launcher (_launch)."""

    C: int | None
    R: int
    NT: int
    sizes: tuple[int, ...]  # of the outputs (ids, ..., row_to_slot, hist, prefix, total)
    offs: tuple[int, ...]  # where each starts in the one int32 allocation (_carve)
    numel: int  # of that allocation
    fused: bool  # one tile: the select kernel builds the whole plan
    sum_tiles: bool  # the place step scans the tile counts itself (no scan output)
    sync: bool  # one cooperative launch (_route_sync_kernel)
    launches: list[tuple]  # (kernel, grid, kwargs) in launch order
    # int arguments fixed by the key: the one launch's sizes, the place kernel's slot blocks
    ints: tuple[int, ...] = ()
    compiled: list = field(default_factory=list)


_statics: dict[tuple, _Static] = {}


def _select_kw(T: int, E: int, cfg: RouterConfig, logits: torch.Tensor,
               bias: torch.Tensor | None, H: int, num_warps: int, BT: int, fused: bool) -> dict:
    """The selection's constexprs (_select_tile, _select_ids)."""
    EH = -(-E // (16 * H)) * 16  # columns per thread group, 16 per loop step
    block_e = max(2, next_pow2(E))
    softmax_after, renorm = cfg.softmax_after_topk, cfg.renormalize
    sigmoid = cfg.score_func == "sigmoid"
    key_logits = softmax_after or bias is None
    packed = _packed(H)
    return dict(
        E=E, K=cfg.top_k, KP=next_pow2(cfg.top_k), H=H, EH=EH, BT=BT, BLOCK_E=block_e,
        W=next_pow2(-(-E // 4)), SIGMOID=sigmoid, SOFTMAX_AFTER=softmax_after, RENORM=renorm,
        HAS_BIAS=bias is not None, KEY_LOGITS=key_logits,
        NEED_MS=not sigmoid and not softmax_after and not (key_logits and renorm),
        STAGES=_stages(packed, num_warps), PACKED=packed,
        SHIFT=max(1, (H * EH - 1).bit_length()),
        TIE_CHECK=_TIE_CHECK, LANE_RANKS=_use_lane_ranks(H, num_warps, E, fused),
        # bf16/fp16 logits as the keys: their fp32 low 13 bits are zero, packing cuts nothing
        EXACT_PACK=bias is None and logits.dtype != torch.float32,
        CAPACITY=cfg.capacity(T) is not None, PAD=cfg.pad_to_multiple,
        BLOCK_R=max(16, min(1024, 8192 // block_e)))


def _static(T: int, E: int, cfg: RouterConfig, logits: torch.Tensor, bias: torch.Tensor | None,
            capturing: bool, allow_sync: bool, D: int | None = None) -> _Static:
    """The launch plan of a route; with D (the dispatch's width) the place kernel also
    dispatches (dispatch_mode "place": two launches, the scan skipped)."""
    K = cfg.top_k
    C = cfg.capacity(T)
    R = num_rows(T, cfg)
    H, num_warps, BT = rows_config(E, T, K)
    NT = -(-T // BT)
    block_e = max(2, next_pow2(E))
    fused = NT == 1
    ntp = next_pow2(NT)
    sum_tiles = _sum_tiles(ntp, block_e)
    scan = not fused and not sum_tiles  # the scan step: its output, the tile counts' prefix
    sync = allow_sync and _use_sync(logits.is_cuda, NT, scan, capturing, T, E)
    n_hist = 0 if fused else NT * block_e
    sizes = (T * K, T * K, T * K, E, E, E + 1, R, n_hist, n_hist if scan else 0,
             block_e if scan else 0)
    capacity, pad = C is not None, cfg.pad_to_multiple
    mark = capacity or pad > 1
    n = T * K
    sel_kw = _select_kw(T, E, cfg, logits, bias, H, num_warps, BT, fused)
    if sync:
        bc = max(2, block_e // 64)  # 64 scan programs: short columns, low latency
        # the mark-empty-rows block is [BLOCK_R, BLOCK_E] booleans: <= 64 a thread (with the
        # place kernel's BLOCK_R and one warp it took 161 registers, sm_90 compile)
        block_r = max(2, min(1024, 2048 * num_warps // block_e))
        block_s = max(128, min(1024, next_pow2(BT * K)))  # a tile's slots
        sync_kw = dict(sel_kw, BC=bc, BLOCK_P=max(2, min(ntp, 2048 // bc)), BLOCK_R=block_r,
                       BLOCK_S=block_s, SUM_TILES=sum_tiles, NTP=ntp if sum_tiles else 1,
                       num_warps=num_warps,
                       # the driver refuses (instead of hanging) a grid that cannot all be
                       # resident; ROUTERLIB_ROWS_COOP=0 drops the check (A/B runs)
                       launch_cooperative_grid=os.environ.get("ROUTERLIB_ROWS_COOP") != "0")
        n_place = -(-n // block_s)
        ints = (NT, n, n_place, n_place + (-(-R // block_r) if mark else 0),
                0 if sum_tiles else block_e // bc)
        # a stand-in argument list of the right types and alignment, to compile it
        i32 = torch.empty(1, dtype=torch.int32, device=logits.device)
        args = (logits, bias if bias is not None else logits, i32, i32.view(torch.float32),
                *[i32] * 9, T, logits.stride(0), 1.0, C or 0, R, *ints)
        g = min(NT, _resident_programs(args, dict(sync_kw, ONE_TILE=True)))
        cap = os.environ.get("ROUTERLIB_ROWS_SYNC_GRID")  # tests: programs loop over tiles
        if cap:
            g = min(g, int(cap))
        if g < NT:
            g = min(g, _resident_programs(args, dict(sync_kw, ONE_TILE=False)))
        if g < 2:  # the barrier's arithmetic needs two programs
            raise RuntimeError(f"route_rows: {g} program(s) of the one-launch route fit the GPU")
        launches = [(_route_sync_kernel, g, dict(sync_kw, ONE_TILE=g == NT))]
        return _Static(C, R, NT, sizes, *_carve(sizes), fused, sum_tiles, True, launches, ints)
    pdl = not fused and _use_pdl(logits.device)
    dep = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)  # a dependent launch
    launches = [(_select_rows_kernel, NT, dict(sel_kw, FUSED_PLAN=fused, num_warps=num_warps,
                                               PDL=pdl))]
    if scan:
        bc = max(2, min(32, block_e // 16))  # >= 16 programs: the scan is latency-bound
        launches.append((_scan_tiles_kernel, block_e // bc, dict(
            BLOCK_E=block_e, BC=bc, BLOCK_P=max(2, min(ntp, 4096 // bc)), num_warps=4, **dep)))
    if not fused:
        # every constexpr explicit: the direct launch passes them in parameter order (_launch)
        block_s, block_r, copy = _BLOCK_S, sel_kw["BLOCK_R"], dict(DISPATCH=False, BLOCK_D=16,
                                                                   EVEN_D=True)
        if D is not None:  # small blocks of slots: the copy needs ~one program an SM
            block_s, block_d = _dispatch_block(n, D, 4)
            block_r = block_s * _DISPATCH_ZERO_GROUPS
            copy = dict(DISPATCH=True, BLOCK_D=block_d, EVEN_D=D % block_d == 0)
        n_place = -(-n // block_s)
        launches.append((_place_slots_kernel, n_place + (-(-R // block_r) if mark else 0), dict(
            E=E, BT=BT, K=K, BLOCK_S=block_s, BLOCK_E=block_e, CAPACITY=capacity,
            PAD=pad, BLOCK_R=block_r, SUM_TILES=sum_tiles,
            NTP=ntp if sum_tiles else 1, num_warps=4, **dep, **copy)))
        return _Static(C, R, NT, sizes, *_carve(sizes), fused, sum_tiles, False, launches,
                       (n_place,))
    return _Static(C, R, NT, sizes, *_carve(sizes), fused, sum_tiles, False, launches)


def _no_launch_hooks() -> bool:
    """Whether no Triton launch hook is installed (a profiler's): the direct launch skips them.
    Triton 3.9 keeps them in a HookChain (empty: none), older versions as None."""
    return all(h is None or not getattr(h, "calls", True)
               for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def _launch(st: _Static, i: int, args: tuple, stream: int | None, fast: bool) -> None:
    """Launch st.launches[i]. The first time through Triton's JIT (it compiles and specialises
    on the arguments; the key of st pins everything it specialises on), later (fast) straight
    through the compiled kernel's launcher with raw pointers: JITFunction.run's per-call
    binding, specialisation and cache lookup cost ~10-20 us of host time a launch on the lent
    hosts (results/h100/route_breakdown.json)."""
    kernel, grid, kwargs = st.launches[i]
    if fast:
        compiled, tail = st.compiled[i]
        compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *args, *tail)
        return
    compiled = kernel[(grid,)](*args, **kwargs)
    if stream is not None and len(st.compiled) == i:  # the constexprs, in parameter order
        st.compiled.append((compiled, tuple(kwargs[a] for a in kernel.arg_names[len(args):])))


def route_rows(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None
               ) -> tuple[Selection, RoutingPlan]:
    """The fast route; the caller checks `applies` (and validated the inputs). Loss sums are not
    computed (Selection.prob_sum / zsq_sum are None)."""
    return _route_rows(logits, cfg, bias, None)[:2]


def _route_rows(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None,
                tokens: torch.Tensor | None
                ) -> tuple[Selection, RoutingPlan, torch.Tensor | None]:
    """route_rows; with tokens (dispatch_mode "place") the place kernel also dispatches them:
    the third result holds the rows."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    T, E = logits.shape
    dev = logits.device
    knob_values = _knob_values()
    cuda = logits.is_cuda and knob_values[-1] not in (b"1", "1")  # not TRITON_INTERPRET=1
    capturing = cuda and torch.cuda.is_current_stream_capturing()
    idx = driver.active.get_current_device() if cuda else -1
    key = (T, cfg, logits.dtype, logits.stride(0), logits.data_ptr() % 16, dev, idx,
           None if bias is None else (bias.dtype, bias.data_ptr() % 16), capturing,
           _TIE_CHECK, knob_values)
    if tokens is not None:
        if tokens.stride(1) != 1:
            tokens = tokens.contiguous()
        key += (tokens.dtype, tokens.shape[1], tokens.stride(0), tokens.data_ptr() % 16)
    st = _statics.get(key)
    if st is None:
        st = _statics[key] = _static(T, E, cfg, logits, bias, capturing, tokens is None,
                                     None if tokens is None else tokens.shape[1])
    stream = driver.active.get_current_stream(idx) if cuda else None
    counter = _sync_counter(dev, idx, stream, capturing) if st.sync else None
    if st.sync and counter is None:  # no counter to be had: the separate launches
        key += ("no sync",)
        st = _statics.get(key)
        if st is None:
            st = _statics[key] = _static(T, E, cfg, logits, bias, capturing, False)
    K = cfg.top_k
    buf = _empty((st.numel,), dtype=torch.int32, device=dev)
    o = st.offs
    ids, slot_to_row, weights, counts, kept, offsets, row_to_slot = _views(buf, o, T, K, E, st.R)
    fast = stream is not None and len(st.compiled) == len(st.launches) and _no_launch_hooks()
    if fast:  # raw pointers: the launcher takes ints as they are (no driver query per tensor)
        base = buf.data_ptr()
        p = [base + 4 * at for at in o]
        x = logits.data_ptr()
        args = [x, bias.data_ptr() if bias is not None else x, *p]
        if st.sync:
            args.append(counter.data_ptr())
    else:
        args = [logits, bias if bias is not None else logits, ids, slot_to_row, weights, counts,
                kept, offsets, row_to_slot,
                *(buf.as_strided((n,), (1,), at) for n, at in zip(st.sizes[7:], o[7:])),
                counter]
    x, b, a_ids, a_s2r, a_w, a_cnt, a_kept, a_off, a_r2s, hist, prefix, total, ctr = args + [
        None] * (13 - len(args))
    if st.fused:
        hist = prefix = total = a_ids  # unused
    elif st.sum_tiles:  # the place step reads the tile counts and scans them itself
        prefix = total = hist  # total: unused
    C, R = st.C, st.R
    sel_args = (x, b, a_ids, a_w, hist, a_cnt, a_kept, a_off, a_s2r, a_r2s, T,
                logits.stride(0), float(cfg.routed_scaling_factor), C or 0, R)
    if st.sync:
        _launch(st, 0, sel_args[:10] + (prefix, total, ctr) + sel_args[10:] + st.ints,
                stream, fast)
    else:
        _launch(st, 0, sel_args, stream, fast)
        if not st.fused:
            if not st.sum_tiles:
                _launch(st, 1, (hist, prefix, total, st.NT), stream, fast)
            if tokens is None:
                copy = (a_ids, a_ids, 1, 1)  # no dispatch (unused)
            else:
                rows = _empty((R, tokens.shape[1]), dtype=tokens.dtype, device=dev)
                copy = ((tokens.data_ptr(), rows.data_ptr()) if fast else (tokens, rows)) + (
                    tokens.shape[1], tokens.stride(0))
            _launch(st, len(st.launches) - 1, (a_ids, prefix, total, a_cnt, a_kept, a_off, a_s2r,
                                               a_r2s, T * K, st.ints[0], st.NT, C or 0, R)
                    + copy, stream, fast)
    sel = Selection.of_kernel(ids, weights)
    plan = RoutingPlan.of_kernel(counts, kept, offsets, slot_to_row, row_to_slot, C, R)
    return sel, plan, None if tokens is None else rows


def _views(buf: torch.Tensor, o: tuple[int, ...], T: int, K: int, E: int, R: int
           ) -> tuple[torch.Tensor, ...]:
    """(ids, slot_to_row, weights, counts, kept, offsets, row_to_slot): views of a route's one
    int32 allocation (_carve). torch.as_strided rather than the method: ~0.2 us less a view
    (CPU timeit, 10.3-11.5 vs 11.1-12.9 us for the seven)."""
    view = torch.as_strided
    return (view(buf, (T, K), (K, 1), o[0]), view(buf, (T, K), (K, 1), o[1]),
            view(buf.view(torch.float32), (T, K), (K, 1), o[2]),
            view(buf, (E,), (1,), o[3]), view(buf, (E,), (1,), o[4]),
            view(buf, (E + 1,), (1,), o[5]), view(buf, (R,), (1,), o[6]))


# ---------------------------------------------------------------------------------------------
# The route with the dispatch in the same launch (decode sizes; _route_dispatch_kernels.py)
# ---------------------------------------------------------------------------------------------

_DISPATCH_SLOT_PROGRAMS = 128  # about one program an SM copies slots (132 SMs on an H100)
_DISPATCH_ZERO_GROUPS = 8  # a zeroing program covers this many blocks of slots' worth of rows
# up to this T the one-launch route + dispatch (every program plans all tokens) by default.
# Same-run A/Bs on an H100 (CUDA graph, E=64 K=8 D=4096, the path with the combine): against the
# route then dispatch with the D split (results/h100/ab_decode_082f3c8.txt) T=1 14.8 vs 14.9 us,
# T=16 16.8 vs 17.1, T=64 (place kernel copying) 21.0 vs 18.7, T=256 42.7 vs 34.3; the one
# launch at T=64 planned with 8 warps in every program took 22.6 vs 21.0 (ab_decode_68e72d1.txt,
# before the D split). The place kernel copies each slot's row from x (K reads of a token row
# from L2, 4 warps a program): slower than scatter_rows, which reads a token once.
_ONE_LAUNCH_DISPATCH_T = 16


def dispatch_config(num_tokens: int, num_experts: int) -> tuple[int, int, int] | None:
    """(H threads per token, num_warps, BT) of the one-launch route + dispatch, or None where it
    does not apply (T > _ONE_LAUNCH_DISPATCH_T). 4 threads a token (a thread then holds <= 32
    words of the rank table at E <= 512), 4 warps: a tile of 32 tokens; they also copy."""
    return (4, 4, 32) if num_tokens <= _ONE_LAUNCH_DISPATCH_T else None


def dispatch_mode(logits: torch.Tensor, x: torch.Tensor, cfg: RouterConfig) -> str | None:
    """How route_dispatch_rows dispatches these inputs (the caller checked `applies` and
    validated both): "one" (T <= 16: one launch, _route_dispatch_kernels.py), "place" (the
    route's place kernel also dispatches: two launches where the route has no scan launch; only
    with ROUTERLIB_ROWS_DISPATCH=place, it measured slower), or None (the route, then dispatch,
    the default past 16 tokens). ROUTERLIB_ROWS_DISPATCH=0 switches both off."""
    pinned = os.environ.get("ROUTERLIB_ROWS_DISPATCH")
    if pinned == "0" or x.shape[1] == 0:
        return None
    T, E = logits.shape
    if pinned != "place":
        return "one" if dispatch_config(T, E) is not None else None
    _, _, BT = rows_config(E, T, cfg.top_k)
    NT = -(-T // BT)
    return "place" if NT > 1 and _sum_tiles(next_pow2(NT), max(2, next_pow2(E))) else None


def _dispatch_block(n: int, D: int, num_warps: int) -> tuple[int, int]:
    """(slots a program copies, BLOCK_D): ~_DISPATCH_SLOT_PROGRAMS programs, 16 elements a
    thread a step. ROUTERLIB_ROWS_DISPATCH_PROGRAMS sets another count (A/B runs)."""
    programs = int(os.environ.get("ROUTERLIB_ROWS_DISPATCH_PROGRAMS", _DISPATCH_SLOT_PROGRAMS))
    sp = max(1, min(16, next_pow2(-(-n // programs))))
    return sp, max(16, min(next_pow2(D), 16 * 32 * num_warps // sp))


def _dispatch_static(T: int, E: int, D: int, cfg: RouterConfig, logits: torch.Tensor,
                     bias: torch.Tensor | None) -> _Static:
    K = cfg.top_k
    C = cfg.capacity(T)
    R = num_rows(T, cfg)
    H, num_warps, BT = dispatch_config(T, E)
    sizes = (T * K, T * K, T * K, E, E, E + 1, R)
    n = T * K
    sp, block_d = _dispatch_block(n, D, num_warps)
    zg = _DISPATCH_ZERO_GROUPS
    nsp = -(-n // sp)
    mark = C is not None or cfg.pad_to_multiple > 1
    kw = dict(_select_kw(T, E, cfg, logits, bias, H, num_warps, BT, True), SP=sp, ZG=zg,
              BLOCK_D=block_d, EVEN_D=D % block_d == 0, num_warps=num_warps)
    del kw["LANE_RANKS"]
    grid = nsp + (-(-R // (sp * zg)) if mark else 0)
    return _Static(C, R, 1, sizes, *_carve(sizes), True, False, False,
                   [(_route_dispatch_kernel, grid, kw)], (nsp,))


def route_dispatch_rows(logits: torch.Tensor, x: torch.Tensor, cfg: RouterConfig,
                        bias: torch.Tensor | None, mode: str
                        ) -> tuple[Selection, RoutingPlan, torch.Tensor]:
    """route_rows, then dispatch(x, plan), in one or two launches. The caller checks `applies`,
    validated the inputs and passes dispatch_mode's answer ("one" or "place"). Returns
    (selection, plan, rows [R, D] in x's dtype: row r holds x[row_to_slot[r] // K], empty rows
    are zero)."""
    if mode == "place":
        return _route_rows(logits, cfg, bias, x)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    T, E = logits.shape
    D = x.shape[1]
    dev = logits.device
    knob_values = _knob_values()
    cuda = logits.is_cuda and knob_values[-1] not in (b"1", "1")
    idx = driver.active.get_current_device() if cuda else -1
    key = ("dispatch", T, cfg, logits.dtype, logits.stride(0), logits.data_ptr() % 16, dev, idx,
           None if bias is None else (bias.dtype, bias.data_ptr() % 16), _TIE_CHECK,
           knob_values, x.dtype, D, x.stride(0), x.data_ptr() % 16)
    st = _statics.get(key)
    if st is None:
        st = _statics[key] = _dispatch_static(T, E, D, cfg, logits, bias)
    stream = driver.active.get_current_stream(idx) if cuda else None
    K, C, R = cfg.top_k, st.C, st.R
    buf = _empty((st.numel,), dtype=torch.int32, device=dev)
    rows = _empty((R, D), dtype=x.dtype, device=dev)
    o = st.offs
    ids, slot_to_row, weights, counts, kept, offsets, row_to_slot = _views(buf, o, T, K, E, R)
    fast = stream is not None and len(st.compiled) == 1 and _no_launch_hooks()
    if fast:  # raw pointers (see route_rows)
        p = [buf.data_ptr() + 4 * at for at in o]
        lg = logits.data_ptr()
        args = (lg, bias.data_ptr() if bias is not None else lg, p[0], p[2], p[3], p[4], p[5],
                p[1], p[6], x.data_ptr(), rows.data_ptr())
    else:
        args = (logits, bias if bias is not None else logits, ids, weights, counts, kept,
                offsets, slot_to_row, row_to_slot, x, rows)
    _launch(st, 0, args + (T, logits.stride(0), float(cfg.routed_scaling_factor), C or 0, R, D,
                           x.stride(0)) + st.ints, stream, fast)
    sel = Selection.of_kernel(ids, weights)
    plan = RoutingPlan.of_kernel(counts, kept, offsets, slot_to_row, row_to_slot, C, R)
    return sel, plan, rows
