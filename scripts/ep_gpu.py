"""Expert parallelism on GPUs with NCCL, any GPU count (1 included):

    torchrun --nproc_per_node=$(nvidia-smi -L | wc -l) scripts/ep_gpu.py --out build/gpu/ep

1. correctness: EPMoELayer against the single-GPU MoELayer (forward, gradients, dedup counts)
   on small configurations (routerlib.parallel.checks, the same checks as the gloo tests);
2. all-to-all bandwidth: routerlib's dispatch + combine (packed rows, dedup) against a plain
   NCCL all_to_all_single of the same bytes with the same splits, and against a bf16
   all-to-all sending K copies, in the same run;
3. layer time (forward, and forward + backward) and tokens/s, with and without overlap
   (num_chunks 1 / 4), native bf16 and fp8 payload, Qwen3-30B-A3B and DeepSeek-V3 shapes.
Rows go to <out>/ep_w<W>.json (ep_w<W>_strong.json with --global-tokens), routerlib.bench.results
rows written by rank 0 after each stage. --backend triton runs the route kernels and the fused
experts (their compile and autotuning take the first calls).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from routerlib import MoEConfig, RouterConfig
from routerlib.bench.results import ResultSet
from routerlib.parallel import EPConfig, EPMoELayer, wire
from routerlib.parallel.checks import Case, compare_with_reference, tolerance

# CUDA + NCCL; without a GPU the script runs on gloo ranks on the CPU (to check the script
# itself at small --tokens; its times say nothing about GPUs)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEV == "cuda":
        sync()


SHAPES = {  # name: (D, F, router)
    "qwen3-30b-a3b": (2048, 768, RouterConfig(num_experts=128, top_k=8, renormalize=True)),
    "deepseek-v3": (7168, 2048, RouterConfig(num_experts=256, top_k=8, score_func="sigmoid",
                                             n_groups=8, topk_groups=4,
                                             group_score="top2_sum", renormalize=True,
                                             routed_scaling_factor=2.5)),
}


def correctness_cases(world: int) -> list[Case]:
    def moe(E, K, **kw):
        shared = kw.pop("shared", 0)
        return MoEConfig(hidden_size=256, ffn_size=128, shared_expert_size=shared,
                         router=RouterConfig(num_experts=E, top_k=K, **kw))

    toks = tuple(64 + 37 * r for r in range(world))
    return [
        Case("fp32", moe(8 * world, 4), toks),
        Case("bf16_chunks_shared", moe(8 * world, 4, shared=128), toks,
             ep=EPConfig(num_chunks=3), dtype="bfloat16"),
        Case("bf16_fp8", moe(8 * world, 4), toks, ep=EPConfig(payload="fp8"),
             dtype="bfloat16"),
        Case("fp32_capacity_empty", moe(8 * world, 2, capacity_factor=1.0),
             (0,) + toks[1:] if world > 1 else toks),
    ]


def timed(fn, reps: int, group=None) -> float:
    """Median over reps of the slowest rank's wall time (us) of fn, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        sync()
        t = torch.tensor([time.perf_counter() - t0], device=DEV)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times.append(t.item() * 1e6)
    return statistics.median(times)


def bench_shape(name: str, tokens: int, backend: str, reps: int, rs: ResultSet, rank: int,
                world: int) -> None:
    D, F, router = SHAPES[name]
    cfg = MoEConfig(hidden_size=D, ffn_size=F, router=router, backend=backend)
    torch.manual_seed(0)
    x = torch.randn(tokens, D, device=DEV, dtype=torch.bfloat16)
    base = {"shape": name, "world": world, "T_per_rank": tokens, "D": D, "E": router.num_experts,
            "K": router.top_k, "backend": backend}
    for payload in ("native", "fp8"):
        for chunks in (1, 4):
            layer = EPMoELayer(cfg, EPConfig(payload=payload, num_chunks=chunks),
                               device=DEV, dtype=torch.bfloat16)
            bench_layer(layer, x, reps, rs, {**base, "payload": payload, "chunks": chunks},
                        rank, world)
            del layer
            if DEV == "cuda":
                torch.cuda.empty_cache()


def bench_layer(layer: EPMoELayer, x: torch.Tensor, reps: int, rs: ResultSet, c: dict,
                rank: int, world: int) -> None:
    tokens = x.shape[0]
    with torch.no_grad():
        t_fwd = timed(lambda: layer(x), reps)
    rs.add("ep", c, "fwd_time_us", t_fwd, "us")
    rs.add("ep", c, "fwd_tokens_per_s", tokens * world / t_fwd * 1e6, "tokens/s")
    xg = x.clone().requires_grad_(True)

    def step():
        y, _ = layer(xg)
        y.float().square().mean().backward()

    t_step = timed(step, reps)
    rs.add("ep", c, "fwd_bwd_time_us", t_step, "us")
    rs.add("ep", c, "fwd_bwd_tokens_per_s", tokens * world / t_step * 1e6, "tokens/s")
    if c["chunks"] == 1:
        bench_wire(layer, x, reps, rs, c, rank, world)


def bench_wire(layer: EPMoELayer, x: torch.Tensor, reps: int, rs: ResultSet, c: dict, rank: int,
               world: int) -> None:
    """routerlib's dispatch + combine against plain all_to_all_single of the same bytes."""
    with torch.no_grad():
        out = layer.router(x)
        ch = layer.plan_chunks(x, out)[0]
    D, payload = x.shape[1], layer.ep.payload
    partial = torch.randn(sum(ch.exchange.recv_splits), D, device=DEV, dtype=x.dtype)

    def ours():
        p = wire.start_dispatch(ch.x, ch.ids, ch.w, payload, ch.exchange, async_op=False)
        wire.unpack(p.out, D, ch.ids.shape[1], x.dtype, payload)
        wire.start_combine(partial, ch.exchange, async_op=False)

    rb = wire.row_bytes(D, ch.ids.shape[1], x.element_size(), payload)
    send = torch.randint(0, 255, (sum(ch.exchange.send_splits), rb), device=DEV,
                         dtype=torch.uint8)
    back = torch.randn(sum(ch.exchange.recv_splits), D, device=DEV, dtype=x.dtype)

    def plain():  # the same bytes, the same splits, no packing
        ch.exchange.run(send)
        ch.exchange.reverse().run(back)

    stats = layer.last_stats
    slots_to = stats.slots_to
    recv_slots = torch.tensor(slots_to, device=DEV)
    dist.all_to_all_single(recv_slots, recv_slots.clone())
    k_copies = wire.Exchange(slots_to, recv_slots.tolist(), None)
    kx = torch.randn(sum(slots_to), D, device=DEV, dtype=torch.bfloat16)
    kb = torch.randn(sum(k_copies.recv_splits), D, device=DEV, dtype=torch.bfloat16)

    def baseline():  # bf16, K copies each way
        k_copies.run(kx)
        k_copies.reverse().run(kb)

    remote = torch.tensor([stats.remote(stats.dispatch_bytes_to)
                           + stats.remote(stats.combine_bytes_to),
                           stats.remote(stats.baseline_bytes_to) * 2], device=DEV,
                          dtype=torch.float64)
    dist.all_reduce(remote, op=dist.ReduceOp.MAX)
    for variant, fn, nbytes in (("routerlib", ours, remote[0].item()),
                                ("nccl_same_bytes", plain, remote[0].item()),
                                ("nccl_k_copies_bf16", baseline, remote[1].item())):
        t = timed(fn, reps)
        rs.add(variant, c, "a2a_time_us", t, "us")
        rs.add(variant, c, "a2a_remote_bytes_max_rank", nbytes, "B")
        rs.add(variant, c, "a2a_busbw_gbps", nbytes / t / 1e3 if world > 1 else 0.0, "GB/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/gpu/ep")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank (weak scaling)")
    ap.add_argument("--global-tokens", type=int, default=0,
                    help="tokens over all ranks, split evenly (strong scaling; overrides --tokens)")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v3")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if DEV == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = args.global_tokens // world if args.global_tokens else args.tokens
    rs = ResultSet(f"ep_w{world}" + ("_strong" if args.global_tokens else ""))

    cases = correctness_cases(world)
    res = compare_with_reference(rank, world, cases, device=DEV)
    for case, r in zip(cases, res):
        ok = all(v <= tolerance(case) for v in r["errors"].values())
        ok = ok and r["rows_to"] == r["expected_rows_to"]
        flag = torch.tensor([float(ok)], device=DEV)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        c = {"case": case.name, "world": world, "dtype": case.dtype,
             "payload": case.ep.payload}
        rs.add("ep_vs_single_gpu", c, "pass", flag.item())
        for k, v in r["errors"].items():
            e = torch.tensor([v], device=DEV)
            dist.all_reduce(e, op=dist.ReduceOp.MAX)
            rs.add("ep_vs_single_gpu", {**c, "quantity": k}, "max_rel_err", e.item())
        if rank == 0:
            print(f"correctness {case.name}: {'ok' if flag.item() else 'FAILED'}", flush=True)

    if rank == 0:
        rs.write(args.out)  # each stage's rows land on disk at once: a timeout keeps them
    for name in args.shapes.split(","):
        bench_shape(name, tokens, args.backend, args.reps, rs, rank, world)
        if rank == 0:
            print(f"benchmarked {name}", flush=True)
            rs.write(args.out)
    if rank == 0:
        for r in rs.rows:
            if r.metric in ("fwd_time_us", "a2a_time_us", "a2a_busbw_gbps"):
                print(r.variant, r.config.get("shape"), r.config.get("payload"),
                      r.config.get("chunks"), r.metric, round(r.value, 1))
        print("wrote", rs.write(args.out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
