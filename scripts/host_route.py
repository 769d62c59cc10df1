"""Host wall time of an eager Triton route as the targets measure it (GPU only): ops.route
under no_grad, its outputs flattened, back-to-back calls synchronised every 20
(bench.timing.host_wall_us). For A/B runs of the host path between two checkouts, one process
each, alternating:

    for r in 1 2 3; do for d in build/old .; do
        PYTHONPATH=$d python3 scripts/host_route.py; done; done
Prints one line: the checkout's commit (ROUTERLIB_GIT_COMMIT), the shape and the median of
--rounds host_wall_us medians, then all of them.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from routerlib import ops
from routerlib.bench.timing import host_wall_us
from routerlib.config import RouterConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    cfg = RouterConfig(num_experts=args.E, top_k=args.K, check_finite=False)
    logits = torch.randn(args.T, args.E, device="cuda") * 2

    def call():
        with torch.no_grad():
            sel, plan = ops.route(logits, cfg, backend="triton")
            return (sel.topk_ids, sel.topk_weights, plan.slot_to_row, plan.row_to_slot)

    walls = [host_wall_us(call) for _ in range(args.rounds)]
    print(f"{os.environ.get('ROUTERLIB_GIT_COMMIT', '?')[:7]} {ops.__file__} T={args.T} "
          f"E={args.E} K={args.K} host wall {statistics.median(walls):.1f} us "
          f"(rounds {' '.join(f'{w:.1f}' for w in walls)})")


if __name__ == "__main__":
    main()
