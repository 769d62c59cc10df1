"""Launch-config sweep of the Triton kernels on the issue's shapes (GPU only):

    python -m routerlib.bench.tune --out results/h100/tune

The fast route and dispatch / combine take their launch configuration as an argument
(fast_route.RouteLaunch; _rowmap's config=); the general top-K kernel through its pin
(ROUTERLIB_TOPK_CONFIG). The sweep checks each config's output against the default's, times it
inside a CUDA graph and writes one row per (kernel, shape, config) with
routerlib.bench.results.ResultSet (<out>/tune.json, .csv). The defaults in the kernel modules
come from this sweep.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from collections.abc import Callable

import pandas as pd
import torch

from routerlib.bench.results import ResultSet
from routerlib.bench.timing import bench_cuda_graph


def _time_graph(fn: Callable[[], object]) -> float:
    fn()  # compile this config outside the capture
    torch.cuda.synchronize()
    return bench_cuda_graph(fn, warmup_ms=10, rep_ms=40).median_us


def _time(fn: Callable[[], object], pin: str, value: str | None) -> float:
    old = os.environ.get(pin)
    try:
        if value is None:
            os.environ.pop(pin, None)
        else:
            os.environ[pin] = value
        fn()  # compile this config outside the capture
        torch.cuda.synchronize()
        return bench_cuda_graph(fn, warmup_ms=10, rep_ms=40).median_us
    finally:
        if old is None:
            os.environ.pop(pin, None)
        else:
            os.environ[pin] = old


def sweep_topk(rows: list[dict], quick: bool) -> None:
    from routerlib.config import RouterConfig
    from routerlib.kernels.topk import fused_topk

    shapes = [(16384, 128, 8), (64, 128, 8)]
    blocks = (2, 4, 8, 16, 32)
    warps = (2, 4, 8)
    pps = (4, 16, 64)
    if quick:
        shapes, blocks, warps, pps = shapes[:1], (4, 16), (4,), (4, 16)
    for T, E, K in shapes:
        cfg = RouterConfig(num_experts=E, top_k=K, renormalize=True, check_finite=False)
        logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
        ref = fused_topk(logits, cfg, None).topk_ids.clone()
        for bt, nw, pp in itertools.product(blocks, warps, pps):
            if bt * max(2, 1 << (E - 1).bit_length()) > 8192:
                continue  # register tile too large to be worth compiling
            value = f"{bt},{nw},{pp}"
            row = dict(kernel="topk", T=T, E=E, K=K, D=None, config=value)
            try:
                os.environ["ROUTERLIB_TOPK_CONFIG"] = value
                ok = torch.equal(fused_topk(logits, cfg, None).topk_ids, ref)
                os.environ.pop("ROUTERLIB_TOPK_CONFIG")
                row.update(ok=ok, us=_time(lambda lg=logits, c=cfg: fused_topk(lg, c, None),
                                           "ROUTERLIB_TOPK_CONFIG", value))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is a row
                os.environ.pop("ROUTERLIB_TOPK_CONFIG", None)
                row.update(ok=False, us=None, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
        row = dict(kernel="topk", T=T, E=E, K=K, D=None, config="default", ok=True)
        row["us"] = _time(lambda lg=logits, c=cfg: fused_topk(lg, c, None),
                          "ROUTERLIB_TOPK_CONFIG", None)
        rows.append(row)


def sweep_rowmap(rows: list[dict], quick: bool) -> None:
    """dispatch (scatter_rows) and combine (gather_reduce) at the prefill shape, every config
    of the grid passed explicitly, and the chosen one ("default")."""
    from routerlib import reference as ref
    from routerlib.config import RouterConfig
    from routerlib.kernels import _rowmap

    T, E, K = 16384, 128, 8
    cfg = RouterConfig(num_experts=E, top_k=K, renormalize=True, check_finite=False)
    sel = ref.select(torch.randn(T, E, device="cuda"), cfg)
    plan = ref.build_plan(sel, cfg)
    s2r, r2s, w = plan.slot_to_row, plan.row_to_slot, sel.topk_weights
    grid = list(itertools.product((1, 2, 4, 8), (1024, 2048), (4, 8)))
    if quick:
        grid = grid[:3]
    for D in (2048, 4096):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        rows_ref = ref.dispatch(x, plan)
        y_ref = ref.combine(rows_ref, plan, w)
        cases = (("dispatch", lambda c, x=x: _rowmap.scatter_rows(x, s2r, r2s, config=c)[0],
                  rows_ref),
                 ("combine", lambda c, r=rows_ref: _rowmap.gather_reduce(r, s2r, w, config=c),
                  y_ref))
        for name, run, expect in cases:
            base = dict(kernel=name, T=T, E=E, K=K, D=D)
            for bt, bd, nw in [*grid, None]:
                if bt is not None and (bd > 2 * D or bt * bd > 16384):
                    continue
                conf = None if bt is None else {"BLOCK_T": bt, "BLOCK_D": bd, "num_warps": nw}
                row = dict(base, config="default" if conf is None else
                           f"BLOCK_T={bt},BLOCK_D={bd},num_warps={nw}")
                try:
                    ok = bool(torch.allclose(run(conf).float(), expect.float(), atol=2e-2,
                                             rtol=2e-2))
                    row.update(ok=ok, us=_time_graph(lambda c=conf, r=run: r(c)))
                except Exception as e:  # noqa: BLE001 - a config that fails to compile is a row
                    row.update(ok=False, us=None, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)


def sweep_route(rows: list[dict], quick: bool, save: Callable[[], object] | None = None) -> None:
    """The fast route (kernels/fast_route/): thread groups per token x warps passed as launch
    configurations, the default, and the training path (top-K + plan) in the same run."""
    from routerlib import reference as ref
    from routerlib.config import RouterConfig
    from routerlib.kernels import route
    from routerlib.kernels.fast_route import launch_config
    from routerlib.kernels.plan import build_plan
    from routerlib.kernels.topk import fused_topk

    qwen = RouterConfig(128, 8, renormalize=True, check_finite=False)
    sig = RouterConfig(256, 8, score_func="sigmoid", expert_bias=True, renormalize=True,
                       routed_scaling_factor=2.5, check_finite=False)
    every = [(h, nw) for h in (1, 2, 4) for nw in (1, 2, 4, 8) if 32 // h * nw <= 128]
    # each split is its own compile (5-20 s on the GPU host): the full grid for the issue's
    # shape, the plausible ones elsewhere
    cases = [("qwen3", 16384, qwen, every),
             ("qwen3", 65536, qwen, [(1, 1), (1, 2), (1, 4), (2, 2), (4, 4)]),
             ("sigmoid-bias", 16384, sig, [(2, 2), (2, 4), (4, 4), (4, 8)]),
             ("decode", 64, RouterConfig(64, 8, check_finite=False),
              [(4, 1), (4, 8), (2, 4), (2, 8), (1, 2)]),
             ("decode", 256, qwen, [(4, 1), (4, 2), (4, 4), (2, 4), (1, 4)])]
    if quick:
        cases = [(n, T, c, s[:3]) for n, T, c, s in cases[:1]]
    for name, T, cfg, splits in cases:
        E, K = cfg.num_experts, cfg.top_k
        logits = torch.randn(T, E, device="cuda") * 2
        bias = torch.randn(E, device="cuda") * 0.05 if cfg.expert_bias else None
        want = ref.build_plan(ref.select(logits, cfg, bias), cfg).slot_to_row
        default = launch_config(T, E, K)
        base = dict(kernel="route", T=T, E=E, K=K, D=None, case=name)
        for split in [*splits, None]:
            if split is None:
                lc, label = default, "default"
            else:
                h, nw = split
                packed = h == 1
                lc = default.replace(threads_per_token=h, num_warps=nw, packed=packed,
                                     stages=0 if packed and nw >= 4 else 3,
                                     lane_ranks=h == 1 and E <= 128 and T > 32 * nw)
                label = f"{h},{nw}"
            row = dict(base, config=label)
            try:
                def fn(lg=logits, c=cfg, b=bias, lc=lc):
                    return route(lg, c, b, launch=lc)

                ok = torch.equal(fn()[1].slot_to_row, want)
                row.update(ok=ok, us=_time_graph(fn))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is a row
                row.update(ok=False, us=None, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)

        def general(lg=logits, c=cfg, b=bias):
            sel = fused_topk(lg, c, b)
            return sel, build_plan(sel.topk_ids, sel.topk_weights, c)

        ok = torch.equal(general()[1].slot_to_row, want)
        rows.append(dict(base, config="general path", ok=ok, us=_time_graph(general)))
        if save is not None:  # a time limit keeps the cases measured so far
            save()


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of the routerlib kernels
    in this process (from Triton's per-device caches; a spill means local-memory traffic)."""
    import triton

    from routerlib.kernels import _plan_kernels, _rowmap, _topk_kernels
    from routerlib.kernels.fast_route import kernels as route_kernels

    out = []
    for mod in (route_kernels, _topk_kernels, _plan_kernels, _rowmap):
        for name, fn in vars(mod).items():
            if not isinstance(fn, triton.runtime.jit.JITFunction) or not name.endswith("kernel"):
                continue
            caches = getattr(fn, "device_caches", {})
            for dev_cache in caches.values():
                for ck in dev_cache[0].values():
                    const = getattr(ck, "src", None)
                    const = getattr(const, "constants", {}) if const is not None else {}
                    out.append(dict(kernel=name, n_regs=getattr(ck, "n_regs", None),
                                    n_spills=getattr(ck, "n_spills", None),
                                    shared=getattr(ck.metadata, "shared", None),
                                    num_warps=getattr(ck.metadata, "num_warps", None),
                                    constants=str({k: v for k, v in const.items()})[:300]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/tune", help="folder: writes tune.json/.csv and "
                    "tune_resources.csv there")
    ap.add_argument("--kernels", default="route,topk,rowmap")
    ap.add_argument("--quick", action="store_true", help="a few configs only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune: needs a CUDA GPU (configs are timed in CUDA graphs)", file=sys.stderr)
        return 2
    rows: list[dict] = []
    os.makedirs(args.out, exist_ok=True)

    def save() -> pd.DataFrame:  # after every sweep: a time limit keeps what was measured
        rs = ResultSet("tune")
        for r in rows:
            conf = {k: v for k, v in r.items() if k not in ("config", "us")}
            rs.add(str(r["config"]), conf, "time_us", float("nan") if r["us"] is None
                   else r["us"], "us")
        rs.write(args.out)
        return pd.DataFrame(rows)

    for name, sweep in (("topk", sweep_topk), ("rowmap", sweep_rowmap),
                        ("route", functools.partial(sweep_route, save=save))):
        if name in args.kernels.split(","):
            sweep(rows, args.quick)
            df = save()
    res = pd.DataFrame(kernel_resources())
    res.to_csv(os.path.join(args.out, "tune_resources.csv"), index=False)
    if len(res):
        print(res[["kernel", "num_warps", "n_regs", "n_spills", "shared"]].to_string(index=False))
    good = df[df["ok"] & df["us"].notna()]
    best = good.loc[good.groupby(["kernel", "T", "E", "D"], dropna=False)["us"].idxmin()]
    dflt = {(r["kernel"], r["T"], r["E"], str(r["D"])): r["us"]
            for _, r in good[good["config"].isin(["default", "autotune"])].iterrows()}
    print("best config per kernel/shape (us in a CUDA graph) vs the default:")
    for _, r in best.iterrows():
        key = (r["kernel"], r["T"], r["E"], str(r["D"]))
        d = dflt.get(key, float("nan"))
        print(f"  {r['kernel']:9s} T={r['T']:<6} E={r['E']:<4} D={r['D']!s:<5} best {r['us']:8.2f}"
              f"  [{r['config']}]  default {d:8.2f}")
    bad = df[~df["ok"].astype(bool)]
    print(f"{len(df)} configs timed, {len(bad)} failed or mismatched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
