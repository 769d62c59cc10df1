"""Same-run A/B of the route's launch modes (GPU only): per-kernel device time, CUDA-graph time
and interleaved eager wall time for each knob set.

    python scripts/ab_route_modes.py 1024,4096,16384 [--E 128]

Modes: sync (one cooperative launch), sync_nocoop (the same without the cooperative attribute),
split (three launches, programmatic dependent launch where available), split_nopdl. The eager
wall times interleave the modes batch by batch (25 batches of 20 calls each, median and min),
so host noise hits every mode alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from routerlib.bench.timing import bench_cuda_graph
from routerlib.config import RouterConfig
from routerlib.kernels import route

MODES = {
    "sync": {"ROUTERLIB_ROWS_SYNC": "1"},
    "sync_nocoop": {"ROUTERLIB_ROWS_SYNC": "1", "ROUTERLIB_ROWS_COOP": "0"},
    "split": {"ROUTERLIB_ROWS_SYNC": "0"},
    "split_nopdl": {"ROUTERLIB_ROWS_SYNC": "0", "ROUTERLIB_ROWS_PDL": "0"},
}


def device_times(fn: Callable[[], object], reps: int = 30) -> dict[str, float]:
    """Median device time (us) of each kernel fn launches, over reps calls."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:30]].append(ev.device_time_total)
    return {k: round(statistics.median(v), 2) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("T", help="token counts, comma separated")
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--K", type=int, default=8)
    args = ap.parse_args()
    for T in (int(t) for t in args.T.split(",")):
        cfg = RouterConfig(num_experts=args.E, top_k=args.K, renormalize=True,
                           check_finite=False)
        logits = torch.randn(T, args.E, device="cuda") * 2
        fn = lambda lg=logits, c=cfg: route(lg, c)  # noqa: E731
        with torch.no_grad():
            for name, knobs in MODES.items():
                with mock.patch.dict(os.environ, knobs):
                    dev = device_times(fn)
                    g = [bench_cuda_graph(fn).median_us for _ in range(2)]
                print(f"T={T} {name}: device {dev} graph {g[0]:.2f}/{g[1]:.2f}", flush=True)
            walls = defaultdict(list)
            for _ in range(25):
                for name, knobs in MODES.items():
                    with mock.patch.dict(os.environ, knobs):
                        fn()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(20):
                            fn()
                        torch.cuda.synchronize()
                        walls[name].append((time.perf_counter() - t0) / 20 * 1e6)
        print(f"T={T} eager wall us (median/min of 25 interleaved batches of 20): " + ", ".join(
            f"{n} {statistics.median(v):.1f}/{min(v):.1f}" for n, v in walls.items()), flush=True)


if __name__ == "__main__":
    main()
