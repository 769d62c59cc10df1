"""Time one route in a CUDA graph (GPU only), for A/B runs of launch knobs from the shell:

    ROUTERLIB_ROWS_STAGES=3 python scripts/time_route.py --T 16384 --E 128 --K 8
Prints one line: the knobs seen, the median us in a CUDA graph and whether the plan equals the
reference's. With --profile it only runs a few routes (no timing), for Nsight Compute:

    ncu --clock-control none --kernel-name regex:'_rows_|_tiles_|_slots_' --launch-skip 9 \
        --launch-count 6 --section SpeedOfLight --section WarpStateStats \
        python scripts/time_route.py --profile
"""

from __future__ import annotations

import argparse
import os

import torch

from routerlib import reference as ref
from routerlib.bench.timing import bench_cuda_graph
from routerlib.config import RouterConfig
from routerlib.kernels import route


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--profile", action="store_true", help="6 routes, no timing (for ncu)")
    args = ap.parse_args()
    cfg = RouterConfig(num_experts=args.E, top_k=args.K, renormalize=True, check_finite=False)
    logits = (torch.randn(args.T, args.E, device="cuda") * 2).to(getattr(torch, args.dtype))
    with torch.no_grad():
        if args.profile:
            for _ in range(6):
                route(logits, cfg)
            torch.cuda.synchronize()
            return
        ok = torch.equal(route(logits, cfg)[1].slot_to_row,
                         ref.build_plan(ref.select(logits, cfg), cfg).slot_to_row)
        us = bench_cuda_graph(lambda: route(logits, cfg)).median_us
    knobs = {k: v for k, v in os.environ.items() if k.startswith("ROUTERLIB_")}
    print(f"T={args.T} E={args.E} K={args.K} {args.dtype} {knobs} graph {us:.2f} us ok={ok}")


if __name__ == "__main__":
    main()
