"""Run every Triton kernel once, forward and backward, on mid-size irregular shapes, so that
compute-sanitizer (memcheck, racecheck) sees each of them. Exits non-zero on a wrong result."""

from __future__ import annotations

import os
import sys

# Under the sanitizer every launch is slow: pin the row-map configs instead of autotuning them.
os.environ.setdefault("ROUTERLIB_SCATTER_CONFIG", "default")
os.environ.setdefault("ROUTERLIB_GATHER_CONFIG", "default")

import torch  # noqa: E402

from routerlib import reference as ref  # noqa: E402
from routerlib.config import RouterConfig  # noqa: E402
from routerlib.kernels import combine, dispatch, route  # noqa: E402


def run(cfg: RouterConfig, T: int, D: int, dtype: torch.dtype) -> None:
    dev = "cuda"
    logits = torch.randn(T, cfg.num_experts, device=dev, dtype=dtype, requires_grad=True)
    bias = torch.randn(cfg.num_experts, device=dev) * 0.1 if cfg.expert_bias else None
    pri = torch.rand(T, cfg.slots_per_token, device=dev) if cfg.drop_policy == "random" else None
    sel, plan = route(logits, cfg, bias=bias, priority=pri)
    rsel, rplan = ref.select(logits.detach(), cfg, bias), None
    rplan = ref.build_plan(rsel, cfg, pri)
    assert torch.equal(sel.topk_ids, rsel.topk_ids), "topk ids differ"
    assert torch.equal(plan.slot_to_row, rplan.slot_to_row), "plan differs"
    x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
    rows = dispatch(x, plan)
    y = combine(rows * 1.5, plan, sel.topk_weights)
    loss = y.float().square().mean() + sel.prob_sum.sum() * 1e-3 + sel.zsq_sum * 1e-6
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and torch.isfinite(logits.grad).all()


def main() -> None:
    torch.manual_seed(0)
    cases = [
        (RouterConfig(num_experts=64, top_k=8, renormalize=True), 1000, 200),
        (RouterConfig(num_experts=130, top_k=4, capacity_factor=1.0, drop_policy="priority"),
         777, 96),
        (RouterConfig(num_experts=256, top_k=8, score_func="sigmoid", n_groups=8, topk_groups=4,
                      group_score="top2_sum", expert_bias=True, renormalize=True,
                      routed_scaling_factor=2.5, pad_to_multiple=16), 4099, 136),
        (RouterConfig(num_experts=8, top_k=2, softmax_after_topk=True, capacity_factor=1.25,
                      drop_policy="random"), 20000, 64),
    ]
    if "--small" in sys.argv:  # every kernel once, at sizes the sanitizer gets through quickly
        cases = [(RouterConfig(num_experts=13, top_k=3, capacity_factor=1.0,
                               drop_policy="priority"), 300, 72),
                 (RouterConfig(num_experts=16, top_k=4, score_func="sigmoid", n_groups=4,
                               topk_groups=2, group_score="top2_sum", expert_bias=True,
                               renormalize=True, pad_to_multiple=8), 257, 64)]
    for i, (cfg, T, D) in enumerate(cases):  # one dtype each: the sanitizer is slow
        run(cfg, T, D, torch.bfloat16 if i % 2 == 0 else torch.float32)
    # the row-wise route: one launch (T fits one tile), two (the place kernel scans the few tile
    # counts: T=64 and E=13), three (a scan launch: T=1000 E=128), capacity and padding; the
    # bit-transposed ranks with one-warp tiles (T=2000 E=128) and four-warp tiles (E=100)
    from routerlib.kernels.fast_route import launch_config, route_rows

    # each with the exact insertion and with packed keys (fp32: the exact finishing, and its
    # fallback on the rows of equal values; bf16: packed exactly)
    for packed, dtype in ((False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)):
        for T, cfg, split in (
                (64, RouterConfig(num_experts=64, top_k=8, capacity_factor=1.0), None),
                (1000, RouterConfig(num_experts=128, top_k=8, capacity_factor=1.0), None),
                (1000, RouterConfig(num_experts=13, top_k=3, pad_to_multiple=8,
                                    renormalize=True), None),
                (2000, RouterConfig(num_experts=128, top_k=8, capacity_factor=1.0), None),
                (2001, RouterConfig(num_experts=100, top_k=6, pad_to_multiple=8), (1, 4))):
            logits = torch.randn(T, cfg.num_experts, device="cuda", dtype=dtype)
            logits[::97] = 0.5  # rows of ties
            lc = launch_config(T, cfg.num_experts, cfg.top_k)
            if split is not None:
                lc = lc.replace(threads_per_token=split[0], num_warps=split[1], lane_ranks=True)
            lc = lc.replace(packed=packed, stages=lc.stages if packed else max(1, lc.stages))
            _, plan = route_rows(logits, cfg, None, lc)
            want = ref.build_plan(ref.select(logits, cfg), cfg)
            assert torch.equal(plan.row_to_slot, want.row_to_slot), "row-wise route differs"
    # the route with the dispatch in one launch (T <= 16), and the two ops with D split over
    # the grid (few tokens); capacity (empty rows zeroed) and padded layouts; then the combine
    # with the D split
    from routerlib.kernels import route_dispatch

    for T, cfg, D in ((12, RouterConfig(num_experts=64, top_k=8), 512),
                      (9, RouterConfig(num_experts=13, top_k=3, capacity_factor=1.0), 72),
                      (13, RouterConfig(num_experts=130, top_k=4, pad_to_multiple=8), 200),
                      (64, RouterConfig(num_experts=64, top_k=8), 4096)):
        logits = torch.randn(T, cfg.num_experts, device="cuda")
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        sel, plan, rows = route_dispatch(logits, x, cfg)
        want = ref.build_plan(ref.select(logits, cfg), cfg)
        assert torch.equal(plan.row_to_slot, want.row_to_slot), "route + dispatch plan differs"
        assert torch.equal(rows, ref.dispatch(x, want)), "route + dispatch rows differ"
        y = combine(rows, plan, sel.topk_weights)
        torch.testing.assert_close(y, ref.combine(rows, plan, sel.topk_weights), rtol=1e-2,
                                   atol=1e-2)
    print("sanitize_kernels: all kernels ran and matched the reference")


if __name__ == "__main__":
    main()
