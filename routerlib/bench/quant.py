"""Benchmark of the precision paths (python -m routerlib.bench.quant --out DIR [--tiny]).

Four parts, one ResultSet ("quant", rows of routerlib.bench.results):
  router   each gate precision (routerlib.quant.router) at T=16384 on a real-sized gate
           (D=4096 E=128 softmax top-8; D=7168 E=256 DeepSeek-V3's grouped sigmoid top-8):
           time of the gate GEMM and of gate + route (triton), and its agreement with the fp32
           router on three inputs: bf16 tokens/weights (serving), fp32 tokens/weights (the
           operands' rounding counts too), skewed bf16 tokens (hot experts)
  payload  dispatch at T=16384 D=4096 E=128 K=8: the bf16 copy vs quantize-in-dispatch to fp8 /
           int8 with per-token or per-128 scales (time, HBM bytes, GB/s, speed-up and byte ratio
           against bf16, fraction of the copy roof)
  layer    an MoE layer (D=4096 E=128 K=8 F=1024, T=4096) routed by each precision (output error
           against the fp32 router) and with each payload format (output error against the
           bf16 payload)
  experts  the fp8 fused experts (x quantized in 1 x 128 groups included) against the bf16 fused
           experts at Qwen3-30B-A3B and DeepSeek-V3 shapes, T=32768 (time, TFLOP/s, output error)
--tiny: CPU sizes (the tests; kernels under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

from routerlib import MoEConfig, MoELayer, Router, RouterConfig, ops
from routerlib.bench.configs import get_shape
from routerlib.bench.results import ResultSet
from routerlib.bench.roofline import measure_copy_bandwidth
from routerlib.bench.timing import bench
from routerlib.quant import (
    PRECISIONS,
    compare_routers,
    gate_inputs,
    moe_forward_quantized,
    payload_bytes,
    quantize_dispatch,
    set_router_precision,
)
from routerlib.quant.agreement import relative_error


def _router_cases(tiny: bool) -> list[tuple[str, int, int, RouterConfig]]:
    if tiny:
        return [("tiny", 128, 16, RouterConfig(num_experts=16, top_k=4, renormalize=True))]
    return [("d4096-e128", 4096, 128, RouterConfig(num_experts=128, top_k=8, renormalize=True)),
            ("deepseek-v3", 7168, 256, get_shape("deepseek").router_config())]


def _routers(D: int, cfg: RouterConfig, w: torch.Tensor, device) -> dict[str, Router]:
    base = Router(D, cfg, device=device, dtype=w.dtype)
    with torch.no_grad():
        base.gate.weight.copy_(w)
    out = {}
    for p in PRECISIONS:
        out[p] = copy.deepcopy(base).eval()
        set_router_precision(out[p], p)
    return out


def _time(fn, device: torch.device, tiny: bool, rep_ms: float = 100.0):
    """Median time of fn (routerlib.bench.timing.bench); --tiny: a few calls, no budgets."""
    if tiny:
        return bench(fn, warmup_ms=0.0, rep_ms=0.0, device=device, min_rep=2)
    return bench(fn, rep_ms=rep_ms, device=device)


def _backend(device: torch.device) -> str:
    """The kernels on a GPU or under TRITON_INTERPRET=1; the torch reference otherwise."""
    return "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" \
        else "torch"


def bench_router(rs: ResultSet, device: torch.device, tiny: bool, T: int) -> None:
    backend = "triton" if device.type == "cuda" else "torch"  # the interpreter adds nothing here
    for name, D, E, cfg in _router_cases(tiny):
        base = {"part": "router", "shape": name, "T": T, "D": D, "E": E, "K": cfg.top_k}
        for inputs, kind, dtype in (("bf16", "random", torch.bfloat16),
                                    ("fp32", "random", torch.float32),
                                    ("skewed_bf16", "skewed", torch.bfloat16)):
            x, w = gate_inputs(kind, T, D, E, seed=1, dtype=dtype, device=device)
            routers = _routers(D, cfg, w, device)
            for p, r in routers.items():
                c = {**base, "inputs": inputs}
                agr = compare_routers(routers["fp32"], r, x)
                for k, v in agr.summary().items():
                    if k != "tokens":
                        rs.add(p, c, k, v)
                if inputs != "bf16":
                    continue  # time the serving case only
                with torch.no_grad():
                    t_gate = _time(lambda r=r, x=x: r.gate(x), device, tiny, 50)
                    t_route = _time(lambda r=r, x=x, cfg=cfg: ops.route(
                        r.gate(x), cfg, r.expert_bias, None, backend, False), device, tiny, 50)
                rs.add(p, c, "gate_time_us", t_gate.median_us, "us")
                rs.add(p, c, "router_time_us", t_route.median_us, "us")
                rs.add(p, c, "gate_weight_bytes", r.gate.weight_bytes(), "B")
            del routers
        print(f"router {name}: done", flush=True)
    from routerlib.quant.router import FALLBACKS

    for (gemm, dev), why in FALLBACKS.items():
        print(f"router: {gemm} on {dev} fell back to its emulation: {why}", flush=True)


def bench_payload(rs: ResultSet, device: torch.device, tiny: bool) -> None:
    T, D, E, K = (16, 256, 8, 4) if tiny else (16384, 4096, 128, 8)
    cfg = RouterConfig(num_experts=E, top_k=K)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, E, device=device, generator=g)
    backend = _backend(device)
    _, plan = ops.route(logits, cfg, backend=backend)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16, generator=g)
    roof = measure_copy_bandwidth(device, 2**24 if tiny else None, rep_ms=20 if tiny else 100)
    base = {"part": "payload", "T": T, "D": D, "E": E, "K": K}
    rs.add("copy", base, "copy_roof_gbps", roof, "GB/s")
    bf16_us = None
    bf16_bytes = payload_bytes(T, D, K, None)["total"]
    cases = [("bf16", None, None)] + [(f, f, g) for f in ("fp8", "int8") for g in (None, 128)]
    with torch.no_grad():
        for variant, fmt, group in cases:
            if fmt is None:
                fn = lambda: ops.dispatch(x, plan, backend)
            else:
                fn = lambda fmt=fmt, group=group: quantize_dispatch(x, plan, fmt, group, backend)
            t = _time(fn, device, tiny)
            nbytes = payload_bytes(T, D, K, fmt, group)["total"]
            c = {**base, "group": group or "token"}
            name = variant if fmt is None else f"{fmt}"
            rs.add(name, c, "time_us", t.median_us, "us")
            rs.add(name, c, "bytes", nbytes, "B")
            rs.add(name, c, "gbps", nbytes / t.seconds / 1e9, "GB/s")
            rs.add(name, c, "frac_of_roof", nbytes / t.seconds / 1e9 / roof)
            if fmt is None:
                bf16_us = t.median_us
            else:
                rs.add(name, c, "speedup_vs_bf16", bf16_us / t.median_us, "x")
                rs.add(name, c, "bytes_ratio_vs_bf16", bf16_bytes / nbytes, "x")
    print("payload: done", flush=True)


def bench_layer(rs: ResultSet, device: torch.device, tiny: bool) -> None:
    T, D, E, K, F = (48, 128, 8, 2, 64) if tiny else (4096, 4096, 128, 8, 1024)
    cfg = RouterConfig(num_experts=E, top_k=K, renormalize=True)
    backend = "triton" if device.type == "cuda" else "torch"  # the payload part runs the kernel
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=D, ffn_size=F, router=cfg, backend=backend),
                     device=device, dtype=torch.bfloat16).eval()
    x, w = gate_inputs("random", T, D, E, seed=2, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        layer.router.gate.weight.copy_(w)
    base = {"part": "layer", "T": T, "D": D, "E": E, "K": K, "F": F}
    ref_router = copy.deepcopy(layer.router)
    set_router_precision(ref_router, "fp32")
    for p in PRECISIONS:
        r = copy.deepcopy(layer.router)
        set_router_precision(r, p)
        agr = compare_routers(ref_router, r, x, layer)
        rs.add(p, {**base, "what": "router"}, "output_error", agr.output_error)
    with torch.no_grad():
        routed = layer.router(x)
        y0 = moe_forward_quantized(layer, x, None, backend=backend, routed=routed)
        for fmt in ("fp8", "int8"):
            for group in (None, 128):
                y = moe_forward_quantized(layer, x, fmt, group, backend=backend,
                                          routed=routed)
                rs.add(fmt, {**base, "what": "payload", "group": group or "token"},
                       "output_error", relative_error(y, y0))
    print("layer: done", flush=True)


def bench_experts(rs: ResultSet, device: torch.device, tiny: bool) -> None:
    """fp8 fused experts (x's quantization included) against the bf16 fused experts, T=32768."""
    cases = ([("tiny", 16, 256, 128, 4, 2)] if tiny else
             [("qwen3-30b-a3b", 32768, 2048, 768, 128, 8),
              ("deepseek-v3", 32768, 7168, 2048, 256, 8)])
    for case in cases:
        _bench_experts_case(rs, device, tiny, *case)  # its tensors are freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"experts {case[0]}: done", flush=True)


def _bench_experts_case(rs: ResultSet, device: torch.device, tiny: bool, name: str, T: int,
                        D: int, F: int, E: int, K: int) -> None:
    from routerlib.kernels.experts import fused_experts
    from routerlib.kernels.experts_fp8 import Fp8ExpertWeights, fp8_experts

    cfg = RouterConfig(num_experts=E, top_k=K, renormalize=True)
    g = torch.Generator(device=device).manual_seed(0)
    sel, plan = ops.route(torch.randn(T, E, device=device, generator=g), cfg,
                          backend=_backend(device))
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16, generator=g)
    wgu = torch.randn(E, D, 2 * F, device=device, dtype=torch.bfloat16, generator=g)
    wgu.mul_(D ** -0.5)
    wd = torch.randn(E, F, D, device=device, dtype=torch.bfloat16, generator=g)
    wd.mul_(F ** -0.5)
    fw = Fp8ExpertWeights.from_weights(wgu, wd)
    w = sel.topk_weights
    c = {"part": "experts", "shape": name, "T": T, "D": D, "F": F, "E": E, "K": K}
    flops = 6 * T * K * D * F
    runs = {"bf16": lambda: fused_experts(x, plan, w, wgu, wd),
            "fp8": lambda: fp8_experts(x, plan, w, fw)}
    times = {}
    with torch.no_grad():
        rs.add("fp8", c, "output_error_vs_bf16", relative_error(runs["fp8"](), runs["bf16"]()))
        for variant, fn in runs.items():
            t = _time(fn, device, tiny, 200)
            times[variant] = t.median_us
            rs.add(variant, c, "time_us", t.median_us, "us")
            rs.add(variant, c, "tflops", flops / t.seconds / 1e12, "TFLOP/s")
    rs.add("bf16", c, "weight_bytes", (wgu.numel() + wd.numel()) * 2, "B")
    rs.add("fp8", c, "weight_bytes", fw.nbytes(), "B")
    rs.add("fp8", c, "speedup_vs_bf16", times["bf16"] / times["fp8"], "x")


PARTS = {"payload": bench_payload, "experts": bench_experts, "router": None, "layer": bench_layer}


def run(out: str | Path | None, tiny: bool = False,
        parts: tuple[str, ...] = ("payload", "experts", "router", "layer")) -> ResultSet:
    """The parts in order; the result file is rewritten after each (a time limit that stops a
    later part keeps the earlier rows)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rs = ResultSet("quant")
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"part {part!r}: choose from {sorted(PARTS)}")
        if part == "router":
            bench_router(rs, device, tiny, 256 if tiny else 16384)
        else:
            PARTS[part](rs, device, tiny)
        if out is not None:
            path = rs.write(out)
    if out is not None:
        print("wrote", path)
    return rs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build/quant", help="folder for quant.json / quant.csv")
    p.add_argument("--tiny", action="store_true", help="CPU sizes (tests)")
    p.add_argument("--parts", default="payload,experts,router,layer")
    a = p.parse_args(argv)
    run(a.out, a.tiny, tuple(s.strip() for s in a.parts.split(",") if s.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
