"""The route's launch configuration: one frozen value per (T, E, K, device kind, capture state),
chosen by the rules below (each the winner of a same-run measurement, see docs/decisions.md),
cached, and overridable explicitly (`route(..., launch=...)`; the benchmarks' variants)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

# tiles (rounded up to a power of two) x experts up to which the place kernel scans the tile
# counts itself, in registers; past it a scan launch is faster
MAX_SUM_TILES = 4096
# up to this T, route_dispatch runs the route and the dispatch in one launch
ONE_LAUNCH_DISPATCH_T = 16


@dataclass(frozen=True)
class RouteLaunch:
    """How the fast route runs. None fields are decided per call by the rule named.

    threads_per_token  H: 1, 2 or 4 threads share a token's E columns
    num_warps          warps a tile; a tile holds BT = 32 / H * num_warps <= 128 tokens
    packed             packed int32 keys sorted by a network (one thread a token), else the
                       exact insertion (group-limited routing always takes the exact insertion)
    stages             software-pipelining stages of the column loop; 0: the packed loop's
                       register prefetch
    lane_ranks         in-tile ranks by bit-transposed masks (H = 1, E <= 128, several tiles),
                       else by a cumsum of packed 8-bit counts
    sum_tiles          the place kernel scans the tile counts itself (no scan launch);
                       None: when tiles x experts <= MAX_SUM_TILES
    sync               one cooperative launch with grid barriers instead of three (a GPU,
                       several tiles); None: eagerly, and in a CUDA graph at decode sizes
    pdl                programmatic dependent launches (sm_90+); None: where supported
    dispatch_one       route_dispatch in one launch (T <= ONE_LAUNCH_DISPATCH_T)
    tie_check          near ties of packed keys go to the exact insertion (off only in a test)
    sync_grid          at most this many programs in the one launch (tests: loops over tiles)
    """

    threads_per_token: int
    num_warps: int
    packed: bool
    stages: int
    lane_ranks: bool
    sum_tiles: bool | None = None
    sync: bool | None = None
    pdl: bool | None = None
    dispatch_one: bool = False
    tie_check: bool = True
    sync_grid: int | None = None

    def __post_init__(self) -> None:
        h, nw = self.threads_per_token, self.num_warps
        if h not in (1, 2, 4) or nw not in (1, 2, 4, 8) or 32 // h * nw > 128:
            raise ValueError(f"RouteLaunch(threads_per_token={h}, num_warps={nw}): H in 1, 2, "
                             "4; num_warps in 1, 2, 4, 8; 32 / H * num_warps <= 128")
        if self.stages < 0 or (self.stages == 0 and not self.packed):
            raise ValueError(f"RouteLaunch.stages={self.stages}: >= 1 (0 only with packed)")
        if self.lane_ranks and 32 // h * nw % 32:
            raise ValueError("RouteLaunch.lane_ranks needs tiles of whole rows of 32 tokens")
        if self.sync_grid is not None and self.sync_grid < 2:
            raise ValueError(f"RouteLaunch.sync_grid={self.sync_grid}: must be >= 2")

    @property
    def tokens_per_tile(self) -> int:
        return 32 // self.threads_per_token * self.num_warps

    def replace(self, **changes) -> RouteLaunch:
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=4096)
def launch_config(num_tokens: int, num_experts: int, top_k: int) -> RouteLaunch:
    """The measured-best launch of a route of T tokens over E experts (cached).

    Split (H, warps), in CUDA graphs on an H200 and an H100: up to ~1k tokens many small tiles
    (4 threads a token, 1 warp); for prefill one thread a token at E <= 128 (4 warps a tile past
    16k tokens), 2 threads and 4 warps at E <= 256, 4 and 4 beyond. Packed keys with the network
    where one thread holds a token (they lose with 4 threads a token and at E = 256). The packed
    loop's register prefetch with 4-warp tiles, else 3 cp.async stages."""
    T, E = num_tokens, num_experts
    if T <= 1024:
        h, nw = 4, 1
    elif E <= 128:
        h, nw = 1, 4 if T > 16384 else 1
    elif E <= 256:
        h, nw = 2, 4
    else:
        h, nw = 4, 4
    packed = h == 1
    bt = 32 // h * nw
    return RouteLaunch(threads_per_token=h, num_warps=nw, packed=packed,
                       stages=0 if packed and nw >= 4 else 3,
                       lane_ranks=h == 1 and E <= 128 and T > bt,
                       dispatch_one=T <= ONE_LAUNCH_DISPATCH_T)


def sum_tiles(lc: RouteLaunch, num_tiles_pow2: int, block_e: int) -> bool:
    """Whether the place kernel scans the tile counts itself (lc.sum_tiles, or by size)."""
    if lc.sum_tiles is not None:
        return lc.sum_tiles
    return num_tiles_pow2 * block_e <= MAX_SUM_TILES


def use_sync(lc: RouteLaunch, on_gpu: bool, num_tiles: int, scan: bool, capturing: bool,
             num_tokens: int, num_experts: int) -> bool:
    """The one-launch route, on a GPU with several tiles. Eagerly always (the host's launches
    set the pace); in a CUDA graph a barrier costs more than a kernel boundary with dependent
    launches, except where three short launches over tiny tiles are replaced (T <= 1024, with
    the scan launch) and at E > 128 up to T = 4096."""
    if not on_gpu or num_tiles < 2:
        return False
    if lc.sync is not None:
        return lc.sync
    return not capturing or (scan and (num_tokens <= 1024
                                       or (num_experts > 128 and num_tokens <= 4096)))
