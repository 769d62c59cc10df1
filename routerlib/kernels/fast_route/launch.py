"""The fast route's host side: the launch plan of a call (sizes, grids, constexprs) built once
per key and cached, then the launches through each compiled kernel's launcher.

Three launches (two with few tiles: the place kernel scans the tile counts itself; one when every
token fits one tile: the select kernel builds the whole plan), or the same in one cooperative
launch with grid barriers (eager calls), or, for route_dispatch at decode sizes, the route and the
dispatch in one launch. The launch configuration (config.py) is chosen once per shape and cached;
a caller may pass another (`launch=`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from triton import knobs
from triton.runtime import driver

from routerlib.config import RouterConfig
from routerlib.kernels.common import interpreting, next_pow2, pdl_supported
from routerlib.kernels.fast_route.config import RouteLaunch, launch_config, sum_tiles, use_sync
from routerlib.kernels.fast_route.kernels import (
    _place_slots_kernel,
    _route_dispatch_kernel,
    _route_sync_kernel,
    _scan_tiles_kernel,
    _select_rows_kernel,
)
from routerlib.kernels.fast_route.sync import resident_programs, sync_counter
from routerlib.kernels.plan import build_plan
from routerlib.reference.plan import num_rows
from routerlib.types import RoutingPlan, Selection

_BLOCK_S = 1024  # slots per program of the place kernel
_DISPATCH_SLOT_PROGRAMS = 128  # about one program an SM copies slots (132 SMs on an H100)
_DISPATCH_ZERO_GROUPS = 8  # a zeroing program covers this many blocks of slots' worth of rows
_INTERPRET = interpreting()  # read once: Triton reads it at import as well
_empty = torch.empty  # every output comes from here (tests swap in a poisoning allocator)


def _carve(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Every int32/fp32 output of a route lives in one int32 allocation, each starting on a
    128-byte boundary (Triton's 16-byte pointer specialisation holds): a torch.empty costs
    ~5-10 us of host time on the lent H100 hosts, and the eager route made ten. Returns (the
    start of each, the allocation's length)."""
    offs, at = [], 0
    for n in sizes:
        offs.append(at)
        at += -(-n // 32) * 32
    return tuple(offs), max(at, 1)


@dataclass
class _Static:
    """What a route call depends on only through its key (shapes, config, dtypes, alignment,
    launch configuration): sizes, grids, the kernels' constexprs. `compiled` fills on the first
    call: later calls hand their arguments straight to each compiled kernel's launcher (_launch)."""

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
               bias: torch.Tensor | None, lc: RouteLaunch, fused: bool) -> dict:
    """The selection's constexprs (_select_tile, _select_ids)."""
    H, BT = lc.threads_per_token, lc.tokens_per_tile
    EH = -(-E // (16 * H)) * 16  # columns per thread group, 16 per loop step
    block_e = max(2, next_pow2(E))
    softmax_after, renorm = cfg.softmax_after_topk, cfg.renormalize
    sigmoid = cfg.score_func == "sigmoid"
    grouped = cfg.n_groups > 1
    key_logits = softmax_after or (bias is None and not grouped)  # reference.selection_key
    # 2: the keys sorted by a network (group-limited routing takes the exact insertion)
    packed = 2 if lc.packed and not grouped else 0
    return dict(
        E=E, K=cfg.top_k, KP=next_pow2(cfg.top_k), H=H, EH=EH, BT=BT, BLOCK_E=block_e,
        W=next_pow2(-(-E // 4)), SIGMOID=sigmoid, SOFTMAX_AFTER=softmax_after, RENORM=renorm,
        HAS_BIAS=bias is not None, KEY_LOGITS=key_logits,
        NEED_MS=not sigmoid and not softmax_after and not (key_logits and renorm),
        STAGES=lc.stages, PACKED=packed,
        SHIFT=max(1, (H * EH - 1).bit_length()),
        TIE_CHECK=lc.tie_check, LANE_RANKS=lc.lane_ranks and E <= 128 and not fused,
        # bf16/fp16 logits as the keys: their fp32 low 13 bits are zero, packing cuts nothing
        EXACT_PACK=bias is None and logits.dtype != torch.float32,
        CAPACITY=cfg.capacity(T) is not None, PAD=cfg.pad_to_multiple,
        BLOCK_R=max(16, min(1024, 8192 // block_e)),
        NG=cfg.n_groups, TG=cfg.topk_groups, TOP2=cfg.group_score == "top2_sum")


def _static(T: int, E: int, cfg: RouterConfig, logits: torch.Tensor, bias: torch.Tensor | None,
            capturing: bool, allow_sync: bool, lc: RouteLaunch, on_gpu: bool) -> _Static:
    """The launch plan of a route."""
    K = cfg.top_k
    C = cfg.capacity(T)
    R = num_rows(T, cfg)
    num_warps, BT = lc.num_warps, lc.tokens_per_tile
    NT = -(-T // BT)
    block_e = max(2, next_pow2(E))
    fused = NT == 1
    ntp = next_pow2(NT)
    summed = sum_tiles(lc, ntp, block_e)
    scan = not fused and not summed  # the scan step: its output, the tile counts' prefix
    n_hist = 0 if fused else NT * block_e
    sizes = (T * K, T * K, T * K, E, E, E + 1, R, n_hist, n_hist if scan else 0,
             block_e if scan else 0)
    sel_kw = _select_kw(T, E, cfg, logits, bias, lc, fused)
    if cfg.drop_policy != "position":  # the selection only: route_rows plans by key
        launches = [(_select_rows_kernel, NT, dict(sel_kw, FUSED_PLAN=fused,
                                                   num_warps=num_warps, PDL=False))]
        return _Static(C, R, NT, sizes, *_carve(sizes), fused, summed, False, launches)
    sync = allow_sync and use_sync(lc, on_gpu, NT, scan, capturing, T, E)
    capacity, pad = C is not None, cfg.pad_to_multiple
    mark = capacity or pad > 1
    n = T * K
    if sync:
        bc = max(2, block_e // 64)  # 64 scan programs: short columns, low latency
        # the mark-empty-rows block is [BLOCK_R, BLOCK_E] booleans: <= 64 a thread (with the
        # place kernel's BLOCK_R and one warp it took 161 registers, sm_90 compile)
        block_r = max(2, min(1024, 2048 * num_warps // block_e))
        block_s = max(128, min(1024, next_pow2(BT * K)))  # a tile's slots
        sync_kw = dict(sel_kw, BC=bc, BLOCK_P=max(2, min(ntp, 2048 // bc)), BLOCK_R=block_r,
                       BLOCK_S=block_s, SUM_TILES=summed, NTP=ntp if summed else 1,
                       num_warps=num_warps,
                       # the driver refuses (instead of hanging) a grid that cannot all be
                       # resident
                       launch_cooperative_grid=True)
        n_place = -(-n // block_s)
        ints = (NT, n, n_place, n_place + (-(-R // block_r) if mark else 0),
                0 if summed else block_e // bc)
        # a stand-in argument list of the right types and alignment, to compile it
        i32 = torch.empty(1, dtype=torch.int32, device=logits.device)
        args = (logits, bias if bias is not None else logits, i32, i32.view(torch.float32),
                *[i32] * 9, T, logits.stride(0), 1.0, C or 0, R, *ints)
        g = min(NT, resident_programs(args, dict(sync_kw, ONE_TILE=True)))
        if lc.sync_grid is not None:  # programs loop over tiles
            g = min(g, lc.sync_grid)
        if g < NT:
            g = min(g, resident_programs(args, dict(sync_kw, ONE_TILE=False)))
        if g < 2:  # the barrier's arithmetic needs two programs
            raise RuntimeError(f"route_rows: {g} program(s) of the one-launch route fit the GPU")
        launches = [(_route_sync_kernel, g, dict(sync_kw, ONE_TILE=g == NT))]
        return _Static(C, R, NT, sizes, *_carve(sizes), fused, summed, True, launches, ints)
    pdl = not fused and (lc.pdl if lc.pdl is not None else pdl_supported(logits.device))
    dep = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)  # a dependent launch
    launches = [(_select_rows_kernel, NT, dict(sel_kw, FUSED_PLAN=fused, num_warps=num_warps,
                                               PDL=pdl))]
    if scan:
        bc = max(2, min(32, block_e // 16))  # >= 16 programs: the scan is latency-bound
        launches.append((_scan_tiles_kernel, block_e // bc, dict(
            BLOCK_E=block_e, BC=bc, BLOCK_P=max(2, min(ntp, 4096 // bc)), num_warps=4, **dep)))
    if not fused:
        n_place = -(-n // _BLOCK_S)
        block_r = sel_kw["BLOCK_R"]
        launches.append((_place_slots_kernel, n_place + (-(-R // block_r) if mark else 0), dict(
            E=E, BT=BT, K=K, BLOCK_S=_BLOCK_S, BLOCK_E=block_e, CAPACITY=capacity,
            PAD=pad, BLOCK_R=block_r, SUM_TILES=summed,
            NTP=ntp if summed else 1, num_warps=4, **dep)))
        return _Static(C, R, NT, sizes, *_carve(sizes), fused, summed, False, launches,
                       (n_place,))
    return _Static(C, R, NT, sizes, *_carve(sizes), fused, summed, False, launches)


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
    hosts."""
    kernel, grid, kwargs = st.launches[i]
    if fast:
        compiled, tail = st.compiled[i]
        compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *args, *tail)
        return
    compiled = kernel[(grid,)](*args, **kwargs)
    if stream is not None and len(st.compiled) == i:  # the constexprs, in parameter order
        st.compiled.append((compiled, tuple(kwargs[a] for a in kernel.arg_names[len(args):])))


def route_rows(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
               launch: RouteLaunch | None = None, priority: torch.Tensor | None = None
               ) -> tuple[Selection, RoutingPlan]:
    """The fast route; the caller checks `applies` (and validated the inputs). Loss sums are not
    computed (Selection.prob_sum / zsq_sum are None). launch: another launch configuration
    than launch_config's (benchmarks, tests). drop_policy "priority" / "random" (priority: the
    random keys [T, K]): every expert's rows in key order, so the plan of the selection is the
    key-ranking plan of kernels/plan.py."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    T, E = logits.shape
    dev = logits.device
    cuda = logits.is_cuda and not _INTERPRET
    capturing = cuda and torch.cuda.is_current_stream_capturing()
    idx = driver.active.get_current_device() if cuda else -1
    lc = launch if launch is not None else launch_config(T, E, cfg.top_k)
    key = (T, cfg, logits.dtype, logits.stride(0), logits.data_ptr() % 16, dev, idx,
           None if bias is None else (bias.dtype, bias.data_ptr() % 16), capturing, lc)
    st = _statics.get(key)
    if st is None:
        st = _statics[key] = _static(T, E, cfg, logits, bias, capturing, True, lc, cuda)
    stream = driver.active.get_current_stream(idx) if cuda else None
    counter = sync_counter(dev, idx, stream, capturing) if st.sync else None
    if st.sync and counter is None:  # no counter to be had: the separate launches
        key += ("no sync",)
        st = _statics.get(key)
        if st is None:
            st = _statics[key] = _static(T, E, cfg, logits, bias, capturing, False, lc, cuda)
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
        if not st.fused and len(st.launches) > 1:
            if not st.sum_tiles:
                _launch(st, 1, (hist, prefix, total, st.NT), stream, fast)
            _launch(st, len(st.launches) - 1, (a_ids, prefix, total, a_cnt, a_kept, a_off, a_s2r,
                                               a_r2s, T * K, st.ints[0], st.NT, C or 0, R),
                    stream, fast)
    sel = Selection.of_kernel(ids, weights)
    if cfg.drop_policy != "position":
        return sel, build_plan(ids, weights, cfg, priority)
    plan = RoutingPlan.of_kernel(counts, kept, offsets, slot_to_row, row_to_slot, C, R)
    return sel, plan


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
# The route with the dispatch in the same launch (decode sizes; kernels._route_dispatch_kernel)
# ---------------------------------------------------------------------------------------------


def dispatch_in_one(num_tokens: int, D: int, launch: RouteLaunch | None = None) -> bool:
    """Whether route_dispatch runs in one launch: T <= ONE_LAUNCH_DISPATCH_T by default (the
    route then dispatch took over from T = 64 on: 21.0 vs 18.7 us on an H100)."""
    if D == 0:
        return False
    return (launch or launch_config(num_tokens, 1, 1)).dispatch_one


def _dispatch_block(n: int, D: int, num_warps: int) -> tuple[int, int]:
    """(slots a program copies, BLOCK_D): ~_DISPATCH_SLOT_PROGRAMS programs, 16 elements a
    thread a step."""
    sp = max(1, min(16, next_pow2(-(-n // _DISPATCH_SLOT_PROGRAMS))))
    return sp, max(16, min(next_pow2(D), 16 * 32 * num_warps // sp))


def _dispatch_static(T: int, E: int, D: int, cfg: RouterConfig, logits: torch.Tensor,
                     bias: torch.Tensor | None, lc: RouteLaunch) -> _Static:
    """The one launch: 4 threads a token (a thread then holds <= 32 words of the rank table at
    E <= 512), 4 warps: a tile of 32 tokens; they also copy."""
    K = cfg.top_k
    C = cfg.capacity(T)
    R = num_rows(T, cfg)
    lc = lc.replace(threads_per_token=4, num_warps=4, packed=False, stages=max(1, lc.stages),
                    lane_ranks=False)
    num_warps = lc.num_warps
    sizes = (T * K, T * K, T * K, E, E, E + 1, R)
    n = T * K
    sp, block_d = _dispatch_block(n, D, num_warps)
    zg = _DISPATCH_ZERO_GROUPS
    nsp = -(-n // sp)
    mark = C is not None or cfg.pad_to_multiple > 1
    kw = dict(_select_kw(T, E, cfg, logits, bias, lc, True), SP=sp, ZG=zg,
              BLOCK_D=block_d, EVEN_D=D % block_d == 0, num_warps=num_warps)
    del kw["LANE_RANKS"]
    grid = nsp + (-(-R // (sp * zg)) if mark else 0)
    return _Static(C, R, 1, sizes, *_carve(sizes), True, False, False,
                   [(_route_dispatch_kernel, grid, kw)], (nsp,))


def route_dispatch_rows(logits: torch.Tensor, x: torch.Tensor, cfg: RouterConfig,
                        bias: torch.Tensor | None, launch: RouteLaunch | None = None
                        ) -> tuple[Selection, RoutingPlan, torch.Tensor]:
    """route_rows, then dispatch(x, plan), in one launch. The caller checks `applies` and
    dispatch_in_one, and validated the inputs. Returns (selection, plan, rows [R, D] in x's
    dtype: row r holds x[row_to_slot[r] // K], empty rows are zero)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    T, E = logits.shape
    D = x.shape[1]
    dev = logits.device
    cuda = logits.is_cuda and not _INTERPRET
    idx = driver.active.get_current_device() if cuda else -1
    lc = launch if launch is not None else launch_config(T, E, cfg.top_k)
    key = ("dispatch", T, cfg, logits.dtype, logits.stride(0), logits.data_ptr() % 16, dev, idx,
           None if bias is None else (bias.dtype, bias.data_ptr() % 16), lc,
           x.dtype, D, x.stride(0), x.data_ptr() % 16)
    st = _statics.get(key)
    if st is None:
        st = _statics[key] = _dispatch_static(T, E, D, cfg, logits, bias, lc)
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
