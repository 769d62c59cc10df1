"""Where the routing time goes (GPU only): per-kernel device time of each route and the host
time of an eager call, split into its parts.

    python -m routerlib.bench.route_breakdown --out build/breakdown

Device side: torch.profiler over repeated calls; the median device time of each kernel name.
Host side: the wall time of back-to-back eager calls of (a) the whole route, (b) the same with
the Triton launches replaced by no-ops (allocations + Python logic), (c) one torch.empty. Also the
route in a CUDA graph and the graph floor (one tiny kernel in a graph), timed alike. Each case
runs as one launch and as its three launches (RouteLaunch.sync), for the time of each stage.
Rows go to <out>/route_breakdown.json / .csv (routerlib.bench.results); the host profiles and
per-kernel names to <out>/route_breakdown_detail.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from unittest import mock

import torch

from routerlib.bench.results import ResultSet
from routerlib.bench.roofline import measure_graph_floor
from routerlib.bench.timing import bench_cuda_graph, host_wall_us

CASES = (("qwen3 T=16384", 16384, 128, 8, dict(renormalize=True)),
         ("decode T=64", 64, 64, 8, {}),
         ("qwen3 T=65536", 65536, 128, 8, dict(renormalize=True)))


def _host_profile(fn: Callable[[], object], reps: int = 200, top: int = 14) -> list[str]:
    """cProfile of reps eager calls: the functions with the most own time (where the host's
    microseconds go), as text lines."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return [line for line in buf.getvalue().splitlines() if line.strip()][-top - 1:]


def device_times(fn: Callable[[], object], reps: int = 30) -> dict[str, float]:
    """Median device time (us) of each kernel launched by fn, over reps calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name].append(ev.device_time_total if hasattr(ev, "device_time_total")
                                else ev.cuda_time_total)
    return {name: statistics.median(v) for name, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/breakdown", help="folder for the result files")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("route_breakdown: needs a CUDA GPU", file=sys.stderr)
        return 2
    rs = ResultSet("route_breakdown")
    rs.add("graph floor", {}, "time_us", measure_graph_floor(), "us")
    detail = []
    for (name, T, E, K, kw), sync in ((c, s) for c in CASES for s in (True, False)):
        case = _case(name, T, E, K, kw, sync)
        detail.append(case)
        conf = {"case": name, "T": T, "E": E, "K": K, "one_launch": sync}
        for metric in ("eager_wall_us", "eager_no_launch_us", "graph_us", "empty_alloc_us"):
            if isinstance(case.get(metric), float):
                rs.add("triton", conf, metric.removesuffix("_us"), case[metric], "us")
        if isinstance(case.get("device_us"), dict):
            for kernel, us in case["device_us"].items():
                rs.add("triton", dict(conf, kernel=kernel), "device_time", us, "us")
    path = rs.write(args.out)
    with open(os.path.join(args.out, "route_breakdown_detail.json"), "w") as f:
        json.dump(detail, f, indent=1, default=str)
    print(f"wrote {path}")
    return 0


def _case(name: str, T: int, E: int, K: int, kw: dict, sync: bool) -> dict:
    from routerlib.config import RouterConfig
    from routerlib.kernels import route
    from routerlib.kernels.fast_route import kernels as route_kernels
    from routerlib.kernels.fast_route import launch as route_launch
    from routerlib.kernels.fast_route import launch_config

    cfg = RouterConfig(num_experts=E, top_k=K, check_finite=False, **kw)
    logits = torch.randn(T, E, device="cuda") * 2
    lc = launch_config(T, E, K).replace(sync=sync)
    case = {"case": name, "T": T, "E": E, "K": K, "one_launch": sync, "launch": repr(lc)}

    def call(lg=logits, c=cfg, lc=lc):
        return route(lg, c, launch=lc)

    with torch.no_grad():
        try:
            case["device_us"] = device_times(call)
        except Exception as e:  # noqa: BLE001 - the host side is still worth having
            case["device_us"] = f"{type(e).__name__}: {e}"[:300]
        case["eager_wall_us"] = host_wall_us(call)
        cls = type(route_kernels._select_rows_kernel)
        saved = cls.__getitem__
        try:  # the launches as no-ops (JIT and direct): what the Python path costs by itself
            cls.__getitem__ = lambda self, grid: (lambda *a, **k: None)
            with mock.patch.object(route_launch, "_launch", lambda *a, **k: None):
                case["eager_no_launch_us"] = host_wall_us(call)
        finally:
            cls.__getitem__ = saved
        try:
            case["graph_us"] = bench_cuda_graph(call).median_us
        except Exception as e:  # noqa: BLE001
            case["graph_us"] = f"{type(e).__name__}: {e}"[:300]
        case["host_profile"] = _host_profile(call)
        case["empty_alloc_us"] = host_wall_us(
            lambda t=T, k=K: torch.empty((t, k), dtype=torch.int32, device="cuda"))
    print(json.dumps(case, indent=1))
    return case


if __name__ == "__main__":
    sys.exit(main())
