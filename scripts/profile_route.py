"""The routes to profile under Nsight Compute (GPU only): a few calls of each case, after warm-up.

    ncu --clock-control none --kernel-name regex:'_rows_|_tiles_|_slots_' --launch-skip 9 \
        --launch-count 9 --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python scripts/profile_route.py [--T 16384] [--E 128] [--K 8]
"""

from __future__ import annotations

import argparse

import torch

from routerlib.config import RouterConfig
from routerlib.kernels import route


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    cfg = RouterConfig(num_experts=args.E, top_k=args.K, renormalize=True, check_finite=False)
    logits = torch.randn(args.T, args.E, device="cuda") * 2
    with torch.no_grad():
        for _ in range(args.calls):
            route(logits, cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
