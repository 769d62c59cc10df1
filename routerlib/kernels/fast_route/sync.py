"""The one-launch route's host side: barrier counters and how many programs fit the GPU."""

from __future__ import annotations

import torch

from routerlib.kernels.fast_route.kernels import _route_sync_kernel

# Barrier counters of the one-launch route: one zeroed int32 pool per device, 32 ints (128
# bytes) a counter. A counter must never be shared by two launches that can run at once, so each
# stream gets its own, and each CUDA-graph capture a new one (replays of one graph are
# serialised by CUDA; two graphs may run side by side).
_SYNC_POOL_SLOTS = 4096
_sync_pools: dict[int, list] = {}  # device index -> [pool, next free slot]
_sync_by_stream: dict[tuple[int, int], torch.Tensor] = {}


def sync_counter(dev: torch.device, idx: int, stream: int, capturing: bool
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


def resident_programs(args: tuple, kwargs: dict) -> int:
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
