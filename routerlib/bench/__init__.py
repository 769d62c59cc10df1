"""Benchmarks: configurations, seeded inputs, timing, roofline, per-stage closures, profiler,
environment capture and the sweep CLI (`python -m routerlib.bench --help`).

Importing this package imports neither triton nor the kernels: the triton backend is resolved
when a stage is built, so a sweep reports a missing kernel as an unavailable stage.
"""

from routerlib.bench.configs import (
    SHAPES,
    STANDARD,
    TOKEN_PRESETS,
    ModelShape,
    get_shape,
    parse_shapes,
    parse_tokens,
)
from routerlib.bench.inputs import InputSpec, expert_bias, make_logits, make_tokens, parse_inputs
from routerlib.bench.roofline import (
    Achieved,
    Roofs,
    StageCost,
    achieved,
    measure_copy_bandwidth,
    measure_launch_latency,
    measure_matmul_tflops,
    measure_roofs,
    stage_cost,
)
from routerlib.bench.stages import STAGE_NAMES, StageSet, make_stage_fns
from routerlib.bench.timing import Timing, bench, bench_cuda_graph

__all__ = [
    "SHAPES", "STAGE_NAMES", "STANDARD", "TOKEN_PRESETS", "Achieved", "InputSpec", "ModelShape",
    "Roofs", "StageCost", "StageSet", "Timing", "achieved", "bench", "bench_cuda_graph",
    "env_info", "expert_bias", "get_shape", "make_logits", "make_stage_fns", "make_tokens",
    "measure_copy_bandwidth", "measure_launch_latency", "measure_matmul_tflops", "measure_roofs",
    "parse_inputs", "parse_shapes", "parse_tokens", "stage_cost",
]


def __getattr__(name: str):
    # lazy, so that `python -m routerlib.bench.envinfo` does not find itself imported already
    if name == "env_info":
        from routerlib.bench.envinfo import env_info

        return env_info
    raise AttributeError(f"module 'routerlib.bench' has no attribute {name!r}")
