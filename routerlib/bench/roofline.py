"""Roofline: measured ceilings of this device and the bytes/FLOPs model of each MoE stage.

The model counts the minimum HBM traffic of each stage (DESIGN.md, "The physics"), with
s = bytes per activation element (bf16: 2), 4-byte fp32 logits/weights and int32 ids:

    stage     bytes                                          FLOPs
    gate      T*D*s + D*E*s + T*E*4                          2*T*D*E
    route     T*E*4 + T*K*(4+4+4)                            0 (counted as memory bound)
    dispatch  T*D*s + T*K*D*s                                0
    experts   min(E, T*K)*3*D*F*s + 2*T*K*D*s                2*T*K*D*F*3 (SwiGLU)
    combine   T*K*D*s + T*K*4 + T*D*s                        2*T*K*D
    layer     gate + route + expert weights + T*D*s          gate + experts + combine
              (the fused ideal: gather inside the first GEMM, weighted scatter in the last
              one's epilogue, so the expert-major rows never touch HBM)
    backward  2*T*D*s + 3*T*K*D*s + 2*T*K*4 + 2*T*E*4        4*T*K*D
              (routing path only: combine backward reads dy and the rows, writes d(rows) and
              d(weights); dispatch backward sums d(rows) into dx; route backward turns
              d(weights) into d(logits))

Example (DESIGN.md): T=16384, D=4096, E=64, K=8, bf16: dispatch 1.21 GB, ~400 us at 3 TB/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from routerlib.bench.timing import bench, bench_cuda_graph

STAGES = ("gate", "route", "dispatch", "experts", "combine", "layer", "backward")


@dataclass(frozen=True)
class StageCost:
    bytes: float
    flops: float


@dataclass(frozen=True)
class Roofs:
    """Measured ceilings: copy bandwidth (read+write, GB/s), matmul TFLOP/s in `dtype`, the host
    cost of one tiny kernel launch (us), and (CUDA) the time of a CUDA graph holding one tiny
    kernel, timed as every graph figure is (us): the floor of any "in a CUDA graph" number."""

    copy_gbps: float
    matmul_tflops: float
    launch_us: float
    device: str
    dtype: str
    graph_us: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Achieved:
    """What a measured time means against the roofs.

    gbps / tflops: achieved rates from the cost model; frac_bw, frac_flops: those rates over the
    measured roofs; floor_us: the roofline floor max(bytes/BW, FLOPs/peak); frac_roof: floor_us
    over the measured time (1 = at the roof)."""

    gbps: float
    tflops: float
    frac_bw: float
    frac_flops: float
    frac_roof: float
    floor_us: float


def stage_cost(stage: str, T: int, D: int, E: int, K: int, F: int, dtype_bytes: int = 2
               ) -> StageCost:
    """Minimum bytes and FLOPs of one stage (see the module docstring for the formulas)."""
    s = dtype_bytes
    gate = StageCost(T * D * s + D * E * s + T * E * 4, 2 * T * D * E)
    route = StageCost(T * E * 4 + T * K * 12, 0)
    weights = min(E, T * K) * 3 * D * F * s
    experts = StageCost(weights + 2 * T * K * D * s, 2 * T * K * D * F * 3)
    combine = StageCost(T * K * D * s + T * K * 4 + T * D * s, 2 * T * K * D)
    if stage == "gate":
        return gate
    if stage == "route":
        return route
    if stage == "dispatch":
        return StageCost(T * D * s + T * K * D * s, 0)
    if stage == "experts":
        return experts
    if stage == "combine":
        return combine
    if stage == "layer":
        return StageCost(gate.bytes + route.bytes + weights + T * D * s,
                         gate.flops + experts.flops + combine.flops)
    if stage == "backward":
        return StageCost(2 * T * D * s + 3 * T * K * D * s + 2 * T * K * 4 + 2 * T * E * 4,
                         4 * T * K * D)
    raise ValueError(f"stage={stage!r}: must be one of {STAGES}")


def achieved(cost: StageCost, seconds: float, roofs: Roofs | None) -> Achieved:
    """Rates of a stage that took `seconds`, and their ratio to the roofs (NaN without roofs)."""
    if not seconds > 0:
        raise ValueError(f"seconds={seconds!r}: must be > 0")
    gbps = cost.bytes / seconds / 1e9
    tflops = cost.flops / seconds / 1e12
    if roofs is None:
        nan = math.nan
        return Achieved(gbps, tflops, nan, nan, nan, nan)
    floor_s = max(cost.bytes / (roofs.copy_gbps * 1e9), cost.flops / (roofs.matmul_tflops * 1e12))
    return Achieved(gbps=gbps, tflops=tflops, frac_bw=gbps / roofs.copy_gbps,
                    frac_flops=tflops / roofs.matmul_tflops, frac_roof=floor_s / seconds,
                    floor_us=floor_s * 1e6)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device | str, nbytes: int | None = None,
                           rep_ms: float = 100.0) -> float:
    """GB/s of a device-to-device copy of random data, counting bytes read plus written.
    nbytes per buffer: 1 GiB on GPU (far beyond L2), 64 MiB on CPU."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.rand(nbytes // 4, device=device)  # random: no compression or zero shortcuts
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), rep_ms=rep_ms, device=device)
    return 2 * src.numel() * 4 / t.seconds / 1e9


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype | None = None,
                          n: int | None = None, rep_ms: float = 100.0) -> float:
    """TFLOP/s of an n^3 matmul on random data: bf16 8192^3 on GPU, fp32 512^3 on CPU."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    n = n or (8192 if gpu else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = bench(lambda: a @ b, rep_ms=rep_ms, device=device)
    return 2 * n**3 / t.seconds / 1e12


def measure_launch_latency(device: torch.device | str, n: int = 2000) -> float:
    """Host microseconds per launch of a one-element kernel, back to back (CPU: per tiny op)."""
    device = torch.device(device)
    x = torch.zeros(1, device=device)
    for _ in range(50):
        x.add_(1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    _sync(device)
    return (time.perf_counter() - t0) / n * 1e6


def measure_graph_floor(rep_ms: float = 100.0) -> float:
    """Median us of replaying a CUDA graph of one one-element kernel, timed by bench_cuda_graph
    (do_bench: CUDA events around each replay, L2 flushed before it), as every graph figure is."""
    x = torch.zeros(1, device="cuda")
    return bench_cuda_graph(lambda: x.add_(1), rep_ms=rep_ms).median_us


def measure_roofs(device: torch.device | str, dtype: torch.dtype | None = None,
                  quick: bool = False) -> Roofs:
    """All the roofs (the graph floor on CUDA only). quick: smaller buffers and shorter runs
    (CPU tests)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    if not gpu and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # CPU half matmul is emulated: not a meaningful ceiling
    rep = 20.0 if quick else 100.0
    nbytes = (2**24 if quick else None) if not gpu else (2**28 if quick else None)
    n = (256 if quick else None) if not gpu else (4096 if quick else None)
    return Roofs(copy_gbps=measure_copy_bandwidth(device, nbytes, rep_ms=rep),
                 matmul_tflops=measure_matmul_tflops(device, dtype, n, rep_ms=rep),
                 launch_us=measure_launch_latency(device, 200 if quick else 2000),
                 device=str(device), dtype=str(dtype).replace("torch.", ""),
                 graph_us=measure_graph_floor(rep) if gpu else None)
