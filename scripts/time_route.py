"""Time one route in a CUDA graph (GPU only), for comparisons of launch configurations:

    python scripts/time_route.py --T 16384 --E 128 --K 8 --variants "-|stages=2|num_warps=4"
Each variant replaces fields of the default fast_route.RouteLaunch of the shape ('-': the
default). Prints one line a variant: the launch configuration, the median us in a CUDA graph,
the host wall us per eager call (bench.timing.host_wall_us) and whether the plan equals the
reference's. With --D the timed function is the decode path instead: route + dispatch (+ rows
* 0.5 with --stand-in) + combine of bf16 tokens.
With --profile it only runs a few routes (no timing; the three launches, not the one-launch
route), for Nsight Compute:

    ncu --clock-control none --kernel-name regex:'_rows_|_tiles_|_slots_' --launch-skip 9 \
        --launch-count 6 --section SpeedOfLight --section WarpStateStats \
        python scripts/time_route.py --profile
"""

from __future__ import annotations

import argparse

import torch

from routerlib import reference as ref
from routerlib.bench.timing import bench_cuda_graph, host_wall_us
from routerlib.config import RouterConfig
from routerlib.kernels import combine, dispatch, route
from routerlib.kernels.fast_route import RouteLaunch, launch_config


def _launch(T: int, E: int, K: int, variant: str, profile: bool) -> RouteLaunch:
    """The default launch of the shape with the variant's fields ("f=v f=v") replaced."""
    lc = launch_config(T, E, K)
    if profile:
        lc = lc.replace(sync=False)
    changes = {}
    for kv in variant.split():
        if kv == "-":
            continue
        name, value = kv.split("=", 1)
        changes[name] = {"True": True, "False": False, "None": None}.get(value) \
            if value in ("True", "False", "None") else int(value)
    return lc.replace(**changes)


def _time(args: argparse.Namespace, T: int, lc: RouteLaunch) -> str:
    cfg = RouterConfig(num_experts=args.E, top_k=args.K, renormalize=bool(args.renormalize),
                       check_finite=False)
    logits = (torch.randn(T, args.E, device="cuda") * 2).to(getattr(torch, args.dtype))
    with torch.no_grad():
        if args.profile:
            for _ in range(6):
                route(logits, cfg, launch=lc)
            torch.cuda.synchronize()
            return "profiled"
        ok = torch.equal(route(logits, cfg, launch=lc)[1].slot_to_row,
                         ref.build_plan(ref.select(logits, cfg), cfg).slot_to_row)
        fn = lambda: route(logits, cfg, launch=lc)  # noqa: E731
        if args.D:
            x = torch.randn(T, args.D, device="cuda", dtype=torch.bfloat16)

            def fn():
                sel, plan = route(logits, cfg, launch=lc)
                rows = dispatch(x, plan)
                return combine(rows * 0.5 if args.stand_in else rows, plan, sel.topk_weights)

            sel, plan = route(logits, cfg)
            scale = 0.5 if args.stand_in else 1.0
            want = ref.combine(ref.dispatch(x, plan).float() * scale, plan, sel.topk_weights)
            ok = ok and torch.allclose(fn().float(), want.float(), rtol=2e-2, atol=2e-2)
        us = bench_cuda_graph(fn).median_us
        wall = host_wall_us(fn)
    what = f"path D={args.D}{' stand-in' if args.stand_in else ''}" if args.D else "route"
    return (f"{what} T={T} E={args.E} K={args.K} {args.dtype} {lc} graph {us:.2f} us "
            f"eager wall {wall:.1f} us ok={ok}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="16384", help="token counts, comma separated")
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--renormalize", type=int, default=1,
                    help="0: softmax weights over all experts (OLMoE; the targets' decode case)")
    ap.add_argument("--D", type=int, default=0, help="time route + dispatch + combine")
    ap.add_argument("--stand-in", action="store_true", help="with --D: rows * 0.5 (experts)")
    ap.add_argument("--variants", default="",
                    help="RouteLaunch field sets to time in turn, '|' between sets, e.g. "
                         "'-|threads_per_token=1 num_warps=4|sum_tiles=False' ('-': the "
                         "default)")
    ap.add_argument("--profile", action="store_true", help="6 routes, no timing (for ncu)")
    args = ap.parse_args()
    for T in (int(t) for t in args.T.split(",")):
        for variant in (args.variants or "-").split("|"):
            print(_time(args, T, _launch(T, args.E, args.K, variant, args.profile)), flush=True)


if __name__ == "__main__":
    main()
