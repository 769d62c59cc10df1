"""Same-run A/B of the route's launch modes (GPU only): per-kernel device time, CUDA-graph time
and interleaved eager wall time for each knob set.

    python scripts/ab_route_modes.py 1024,4096,16384 [--E 128]

Modes: sync (one cooperative launch), sync_nocoop (the same without the cooperative attribute),
split (three launches, programmatic dependent launch where available), split_nopdl. The eager
wall times interleave the modes batch by batch (25 batches of 20 calls each after 10 warm-up
calls, bench.timing.host_wall_us; median and min),
so host noise hits every mode alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from unittest import mock

import torch

from routerlib.bench.route_breakdown import device_times
from routerlib.bench.timing import bench_cuda_graph, host_wall_us
from routerlib.config import RouterConfig
from routerlib.kernels import route

MODES = {
    "sync": {"ROUTERLIB_ROWS_SYNC": "1"},
    "sync_nocoop": {"ROUTERLIB_ROWS_SYNC": "1", "ROUTERLIB_ROWS_COOP": "0"},
    "split": {"ROUTERLIB_ROWS_SYNC": "0"},
    "split_nopdl": {"ROUTERLIB_ROWS_SYNC": "0", "ROUTERLIB_ROWS_PDL": "0"},
}


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
                    dev = {k[:30]: round(v, 2) for k, v in device_times(fn).items()}
                    g = [bench_cuda_graph(fn).median_us for _ in range(2)]
                print(f"T={T} {name}: device {dev} graph {g[0]:.2f}/{g[1]:.2f}", flush=True)
            walls = defaultdict(list)  # modes alternate batch by batch: noise hits all alike
            for _ in range(25):
                for name, knobs in MODES.items():
                    with mock.patch.dict(os.environ, knobs):
                        walls[name].append(host_wall_us(fn, reps=20))
        print(f"T={T} eager wall us (median/min of 25 interleaved batches of 20): " + ", ".join(
            f"{n} {statistics.median(v):.1f}/{min(v):.1f}" for n, v in walls.items()), flush=True)


if __name__ == "__main__":
    main()
