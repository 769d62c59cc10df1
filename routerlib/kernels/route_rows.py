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

Measured on an H100 (results/h100/route_breakdown.json at 42230d5, T=16384, E=128, K=8, fp32):
select 8.7 us (bit-transposed ranks; 11.4 us with the 8-bit count table at ba899a1), scan 3.0
us, place 3.9 us of device time; 22.1 us a route in a CUDA graph (results/h100/targets.json),
where a one-kernel graph takes 4.8 us.

Scope (`applies`): token choice, drop_policy "position", no group limit, K <= 8, E <= 512,
fp32/bf16/fp16 logits, no gradient and no loss sums needed (inference), not while torch.compile
traces. Everything else takes the general path (kernels/topk.py + kernels/plan.py). The results
equal the general path's and the reference's: the same ids, ranks and rows, integer for integer;
weights to fp32 rounding.
"""

from __future__ import annotations

import os

import torch
import triton

from routerlib.config import RouterConfig
from routerlib.kernels._route_rows_kernels import (
    _place_slots_kernel,
    _route_sync_kernel,
    _scan_tiles_kernel,
    _select_rows_kernel,
)
from routerlib.kernels._rowmap import interpreting
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
_empty = torch.empty  # every output comes from here (tests swap in a poisoning allocator)
# near ties go to the exact insertion; tests (and A/B timings of the packed path alone:
# ROUTERLIB_ROWS_TIE_CHECK=0, wrong answers on near ties) turn it off
_TIE_CHECK = os.environ.get("ROUTERLIB_ROWS_TIE_CHECK", "1") != "0"


def enabled() -> bool:
    """ROUTERLIB_ROW_ROUTE=0 switches the fast route off (the general path then runs)."""
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


def _stages() -> int:
    """Software-pipelining stages of the select kernel's column loop. 3, measured against 2 in
    one run on an H100 (results/h100/stages_1d3dbd6.txt, CUDA graph, E=128): T=16384 26.1 vs
    28.9 us, T=65536 65.5 vs 72.2 us (and twice on an H200, results/h200/).
    ROUTERLIB_ROWS_STAGES pins another."""
    return int(os.environ.get("ROUTERLIB_ROWS_STAGES", "3"))


def _packed(h: int, num_tokens: int) -> bool:
    """Packed-key selection (see _route_rows_kernels) where it measured faster: one thread a
    token, up to 16k tokens. Same-run A/B on an H100 (results/h100/ab_packed_2c62426.txt,
    CUDA graph, E=128 K=8): T=4096 20.8 vs 22.6 us, T=16384 24.2 vs 26.3 us (bf16 logits 22.1
    vs 24.7); slower at T=65536 (66.7 vs 65.5), with 4 threads a token (T=64: 12.9 vs 11.9) and
    at E=256 (2 threads, 51.1 vs 41.6: instruction-cache stalls, ncu). ROUTERLIB_ROWS_PACKED=1
    or 0 forces it on or off."""
    pinned = os.environ.get("ROUTERLIB_ROWS_PACKED")
    if pinned is not None:
        return pinned != "0"
    return h == 1 and num_tokens <= 16384


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


def _use_sync(dev: torch.device, num_tiles: int) -> bool:
    """The one-launch route (_route_sync_kernel: grid barriers instead of kernel boundaries):
    on a GPU with several tiles. ROUTERLIB_ROWS_SYNC=0 keeps the separate launches."""
    if os.environ.get("ROUTERLIB_ROWS_SYNC", "1") == "0":
        return False
    return dev.type == "cuda" and num_tiles > 1 and not interpreting()


# Barrier counters of the one-launch route: one zeroed int32 pool per device, 32 ints (128
# bytes) a counter. A counter must never be shared by two launches that can run at once, so each
# stream gets its own, and each CUDA-graph capture a new one (replays of one graph are
# serialised by CUDA; two graphs may run side by side).
_SYNC_POOL_SLOTS = 4096
_sync_pools: dict[int, list] = {}  # device index -> [pool, next free slot]
_sync_by_stream: dict[tuple[int, int], torch.Tensor] = {}


def _sync_counter(dev: torch.device) -> torch.Tensor | None:
    """This launch's barrier counter, or None (no pool yet while capturing a graph, or the
    pool spent by captures): the caller then takes the separate launches."""
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    capturing = torch.cuda.is_current_stream_capturing()
    if not capturing:
        key = (idx, torch.cuda.current_stream(idx).cuda_stream)
        counter = _sync_by_stream.get(key)
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
        _sync_by_stream[key] = counter
    return counter


_occupancy: dict[tuple, int] = {}


def _resident_programs(key: tuple, dev: torch.device, args: tuple, kwargs: dict) -> int:
    """How many programs of this _route_sync_kernel specialisation fit the GPU at once
    (registers, threads and shared memory per SM: the CUDA occupancy rules). Compiles it, once
    per key."""
    got = _occupancy.get(key)
    if got is None:
        num_warps = kwargs["num_warps"]
        compiled = _route_sync_kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(dev)
        warp_regs = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # 256-register units
        # registers are split over 4 schedulers, a warp's on one of them
        by_regs = 4 * (getattr(props, "regs_per_multiprocessor", 65536) // 4 // warp_regs)
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
        by_smem = (getattr(props, "shared_memory_per_multiprocessor", 233472)
                   // (compiled.metadata.shared + 1024))
        per_sm = min(32, by_regs // num_warps, by_threads, by_smem)
        got = _occupancy[key] = per_sm * props.multi_processor_count
    return got


def _carve(sizes: tuple[int, ...], dev: torch.device) -> list[torch.Tensor]:
    """Every int32/fp32 output of a route as views of one int32 allocation, each starting on a
    128-byte boundary (Triton's 16-byte pointer specialisation holds): a torch.empty costs
    ~10 us of host time on the lent H100 hosts (results/h100/route_breakdown.json at ba899a1),
    and the eager route made ten."""
    lengths = []
    for n in sizes:
        lengths += [n, -n % 32]
    buf = _empty((sum(lengths),), dtype=torch.int32, device=dev)
    return list(buf.split(lengths)[::2])


def route_rows(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None
               ) -> tuple[Selection, RoutingPlan]:
    """The fast route; the caller checks `applies` (and validated the inputs). Loss sums are not
    computed (Selection.prob_sum / zsq_sum are None)."""
    T, E = logits.shape
    K = cfg.top_k
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    C = cfg.capacity(T)
    R = num_rows(T, cfg)
    H, num_warps, BT = rows_config(E, T, K)
    NT = triton.cdiv(T, BT)
    EH = triton.cdiv(E, 16 * H) * 16  # columns per thread group, 16 per loop step
    block_e = max(2, next_pow2(E))
    W = next_pow2(triton.cdiv(E, 4))
    fused = NT == 1
    ntp = next_pow2(NT)
    sum_tiles = _sum_tiles(ntp, block_e)
    scan = not fused and not sum_tiles  # the scan launch: its output, the tile counts' prefix
    n_hist = 0 if fused else NT * block_e
    (ids, slot_to_row, weights, counts, kept, offsets, row_to_slot, hist, prefix,
     total) = _carve((T * K, T * K, T * K, E, E, E + 1, R, n_hist, n_hist if scan else 0,
                      block_e if scan else 0), dev)
    ids, slot_to_row = ids.view(T, K), slot_to_row.view(T, K)
    weights = weights.view(torch.float32).view(T, K)
    if fused:
        hist = prefix = total = ids  # unused
    elif sum_tiles:  # the place kernel reads the tile counts and scans them itself
        prefix = total = hist  # total: unused
    softmax_after, renorm = cfg.softmax_after_topk, cfg.renormalize
    sigmoid = cfg.score_func == "sigmoid"
    key_logits = softmax_after or bias is None
    block_r = max(16, min(1024, 8192 // block_e))
    capacity, pad = C is not None, cfg.pad_to_multiple
    packed = _packed(H, T)
    sel_args = (logits, bias if bias is not None else logits, ids, weights, hist,
                counts, kept, offsets, slot_to_row, row_to_slot,
                T, logits.stride(0), float(cfg.routed_scaling_factor), C or 0, R)
    sel_kw = dict(
        E=E, K=K, KP=next_pow2(K), H=H, EH=EH, BT=BT, BLOCK_E=block_e, W=W,
        SIGMOID=sigmoid, SOFTMAX_AFTER=softmax_after, RENORM=renorm,
        HAS_BIAS=bias is not None, KEY_LOGITS=key_logits,
        NEED_MS=not sigmoid and not softmax_after and not (key_logits and renorm),
        STAGES=_stages(), PACKED=packed, SHIFT=max(1, (H * EH - 1).bit_length()),
        TIE_CHECK=_TIE_CHECK, LANE_RANKS=_use_lane_ranks(H, num_warps, E, fused),
        # bf16/fp16 logits as the keys: their fp32 low 13 bits are zero, packing cuts nothing
        EXACT_PACK=bias is None and logits.dtype != torch.float32,
        CAPACITY=capacity, PAD=pad, BLOCK_R=block_r)
    mark = capacity or pad > 1
    n = T * K
    counter = _sync_counter(dev) if _use_sync(dev, NT) else None
    if counter is not None:  # one cooperative launch
        bc = max(2, block_e // 64)  # 64 scan programs: short columns, low latency
        # the mark-empty-rows block is [BLOCK_R, BLOCK_E] booleans: <= 64 a thread (with the
        # place kernel's BLOCK_R and one warp it took 161 registers, sm_90 compile)
        block_r = max(2, min(1024, 2048 * num_warps // block_e))
        sync_kw = dict(sel_kw, BC=bc, BLOCK_P=max(2, min(ntp, 2048 // bc)), BLOCK_R=block_r,
                       BLOCK_S=max(128, min(1024, next_pow2(BT * K))),  # a tile's slots
                       SUM_TILES=sum_tiles, NTP=ntp if sum_tiles else 1,
                       num_warps=num_warps, launch_cooperative_grid=True)
        n_place = triton.cdiv(n, sync_kw["BLOCK_S"])
        ints = (NT, n, n_place, n_place + (triton.cdiv(R, block_r) if mark else 0),
                0 if sum_tiles else block_e // bc)
        args = sel_args[:10] + (prefix, total, counter) + sel_args[10:] + ints
        # integer arguments are not specialised (do_not_specialize), the pointers' and the row
        # stride's 16-byte alignment are: one compiled kernel per key
        key = (dev.index, logits.dtype, logits.data_ptr() % 16, logits.stride(0) % 16,
               None if bias is None else bias.data_ptr() % 16, *sync_kw.values())
        cap = os.environ.get("ROUTERLIB_ROWS_SYNC_GRID")  # tests: programs loop over tiles
        g = min(NT, int(cap) if cap else NT,
                _resident_programs(key + (True,), dev, args, dict(sync_kw, ONE_TILE=True)))
        one_tile = g == NT
        if not one_tile:
            g = min(g, _resident_programs(key + (False,), dev, args,
                                          dict(sync_kw, ONE_TILE=False)))
        if g < 2:  # the barrier's arithmetic needs two programs
            raise RuntimeError(f"route_rows: {g} program(s) of the one-launch route fit the GPU")
        _route_sync_kernel[(g,)](*args, ONE_TILE=one_tile, **sync_kw)
    else:
        _select_rows_kernel[(NT,)](*sel_args, FUSED_PLAN=fused, num_warps=num_warps, **sel_kw)
    if not fused and counter is None:
        if scan:
            bc = max(2, min(32, block_e // 16))  # >= 16 programs: the scan is latency-bound
            _scan_tiles_kernel[(block_e // bc,)](
                hist, prefix, total, NT, BLOCK_E=block_e, BC=bc,
                BLOCK_P=max(2, min(ntp, 4096 // bc)), num_warps=4)
        n_place = triton.cdiv(n, _BLOCK_S)
        _place_slots_kernel[(n_place + (triton.cdiv(R, block_r) if mark else 0),)](
            ids, prefix, total, counts, kept, offsets, slot_to_row, row_to_slot,
            n, n_place, NT, C or 0, R,
            E=E, BT=BT, K=K, BLOCK_S=_BLOCK_S, BLOCK_E=block_e, CAPACITY=capacity,
            PAD=pad, BLOCK_R=block_r, SUM_TILES=sum_tiles, NTP=ntp if sum_tiles else 1,
            num_warps=4)
    sel = Selection(topk_ids=ids, topk_weights=weights, scores=None)
    plan = RoutingPlan(expert_counts=counts, kept_counts=kept, expert_offsets=offsets,
                       slot_to_row=slot_to_row, row_to_slot=row_to_slot, capacity=C,
                       num_rows=R)
    return sel, plan
