"""Same-run A/B of the decode path's launch modes (GPU only): logits -> route + dispatch ->
rows * 0.5 (the experts' stand-in) -> combine, as in bench.targets' decode section.

    python scripts/ab_decode_path.py 1,8,64,128 [--E 64] [--D 4096] [--rounds 3]

Modes: fused (the defaults: the dispatch inside the route's launches, route_rows.dispatch_mode;
the combine's D split over the grid at small T; the row-map kernels as programmatic dependent
launches), split (route, then dispatch: two ops), split_nodsplit (and D not split),
before (and no dependent launches: the path before this change). Per mode and T: each
kernel's device time (torch.profiler) and the CUDA-graph time of the path, the modes alternating
round by round so drift hits every mode alike (median of the rounds' medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from unittest import mock

import torch

from routerlib import ops
from routerlib.bench.route_breakdown import device_times
from routerlib.bench.timing import bench_cuda_graph
from routerlib.config import RouterConfig

MODES = {
    "fused": {},
    "split": {"ROUTERLIB_ROWS_DISPATCH": "0"},
    "split_nodsplit": {"ROUTERLIB_ROWS_DISPATCH": "0", "ROUTERLIB_ROWMAP_DSPLIT": "0"},
    "before": {"ROUTERLIB_ROWS_DISPATCH": "0", "ROUTERLIB_ROWMAP_DSPLIT": "0",
               "ROUTERLIB_ROWMAP_PDL": "0"},
    # the selection: keys inserted one by one instead of the sorting network; packed keys
    # forced at decode (4 threads a token)
    "no_network": {"ROUTERLIB_ROWS_NETWORK": "0"},
    "packed": {"ROUTERLIB_ROWS_PACKED": "1"},
    "packed_no_network": {"ROUTERLIB_ROWS_PACKED": "1", "ROUTERLIB_ROWS_NETWORK": "0"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("T", help="token counts, comma separated")
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--D", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="fused,split,split_nodsplit,before",
                    help=f"comma separated, of {', '.join(MODES)}")
    ap.add_argument("--bare", action="store_true",
                    help="no stand-in expert: combine reads the dispatched rows")
    args = ap.parse_args()
    modes = {m: MODES[m] for m in args.modes.split(",")}
    cfg = RouterConfig(num_experts=args.E, top_k=args.K, check_finite=False)
    for T in (int(t) for t in args.T.split(",")):
        logits = torch.randn(T, args.E, device="cuda") * 2
        x = torch.randn(T, args.D, device="cuda", dtype=torch.bfloat16)

        def path(logits: torch.Tensor = logits, x: torch.Tensor = x) -> torch.Tensor:
            sel, plan, rows = ops.route_dispatch(logits, x, cfg, backend="triton")
            return ops.combine(rows if args.bare else rows * 0.5, plan, sel.topk_weights,
                               "triton")

        graph = defaultdict(list)
        with torch.no_grad():
            for name, knobs in modes.items():
                with mock.patch.dict(os.environ, knobs):
                    dev = {k[:28]: round(v, 2) for k, v in device_times(path).items()}
                print(f"T={T} {name}: device {dev}", flush=True)
            for _ in range(args.rounds):
                for name, knobs in modes.items():
                    with mock.patch.dict(os.environ, knobs):
                        graph[name].append(bench_cuda_graph(path).median_us)
        bare = " bare" if args.bare else ""
        print(f"T={T} E={args.E} D={args.D}{bare} graph us (median of {args.rounds} rounds; "
              "each): "
              + ", ".join(f"{n} {statistics.median(v):.2f} {[round(t, 2) for t in v]}"
                          for n, v in graph.items()), flush=True)


if __name__ == "__main__":
    main()
