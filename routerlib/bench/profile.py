"""Per-stage profile of the MoE forward: device time, kernel launches and peak memory per stage.

Each stage runs `iters` times under its own torch.profiler session, inside a
record_function("routerlib::<stage>") range, so a trace shows the stages by name and no kernel can
be attributed to the wrong stage. On CUDA a stage's time is the summed duration of its device
events (kernels, memcpy, memset) per call; on CPU it is the CPU time of its range per call and the
"kernels" are the leaf aten ops it ran.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings

import pandas as pd
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from routerlib.bench.configs import ModelShape
from routerlib.bench.stages import StageSet, make_stage_fns

PIPELINE = ("gate", "route", "dispatch", "experts", "combine")  # the parts of one forward


def _device_time_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 around the profiler's start and stop only: kineto writes a
    "profiler_start" / "profiler_stop" line to it from C++ on each, which no log level turns
    off. The profiled work itself runs with stderr open."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profile_one(fn, label: str, device: torch.device, iters: int,
                 trace_path: str | None) -> dict:
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # warm (caches, lazy init) outside the profile
    peak = extra = None
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Profiler clears events at the end ..."
        prof = profile(activities=activities)
        with _quiet_stderr():
            prof.start()
        try:
            for _ in range(iters):
                with record_function(label):
                    fn()
            if cuda:
                torch.cuda.synchronize(device)
        finally:
            with _quiet_stderr():
                prof.stop()
        events = prof.events()
    if cuda:
        peak_b = torch.cuda.max_memory_allocated(device)
        peak, extra = peak_b / 2**20, (peak_b - base) / 2**20
    if trace_path:
        prof.export_chrome_trace(trace_path)
    if cuda:
        # the record_function range also shows on the device timeline as a user annotation
        # spanning the kernels: counting it would double the time
        dev = [e for e in events if e.device_type == DeviceType.CUDA and e.name != label
               and not getattr(e, "is_user_annotation", False)]
        time_us = sum(_device_time_us(e) for e in dev) / iters
        n_kernels = len(dev) / iters
    else:
        ranges = [e for e in events if e.name == label]
        time_us = sum(e.cpu_time_total for e in ranges) / iters
        leaves = [e for e in events if e.name.startswith("aten::") and not e.cpu_children]
        n_kernels = len(leaves) / iters
    return {"time_us": time_us, "time_kind": "device" if cuda else "cpu",
            "n_kernels": n_kernels, "peak_mem_mb": peak, "extra_mem_mb": extra}


def profile_stages(shape: ModelShape, T: int, backend: str = "torch",
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   inputs: str = "uniform", seed: int = 0, stages: tuple[str, ...] | None = None,
                   iters: int = 5, stage_set: StageSet | None = None,
                   trace_dir: str | None = None) -> pd.DataFrame:
    """One row per requested stage: stage, time_us (per call), time_kind ("device" on CUDA,
    "cpu" on CPU), share, n_kernels (per call), peak_mem_mb and extra_mem_mb (CUDA: the peak
    allocated during the stage, absolute and above what was allocated before; None on CPU), error.

    share is the stage's time over the sum of the pipeline stages present (gate, route, dispatch,
    experts, combine), so the pipeline shares add to 1, "layer" shows how the whole compares to
    the sum of its parts, and "backward" its cost relative to the forward.
    Pass stage_set to reuse closures already built (the benchmark's own)."""
    if stage_set is None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        stage_set = make_stage_fns(shape, T, backend, dtype, device, inputs, seed, stages)
    ss = stage_set
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
    rows = []
    for name in ss.names():
        row = {"config": ss.shape.name, "T": ss.T, "backend": ss.backend, "stage": name,
               "time_us": math.nan, "time_kind": None, "n_kernels": math.nan,
               "peak_mem_mb": None, "extra_mem_mb": None, "error": ss.errors.get(name)}
        if name in ss.fns:
            trace = os.path.join(trace_dir, f"{ss.shape.name}_T{ss.T}_{ss.backend}_{name}.json"
                                 ) if trace_dir else None
            try:
                row.update(_profile_one(ss.fns[name], f"routerlib::{name}", ss.device, iters,
                                        trace))
            except Exception as e:  # noqa: BLE001 (one failing stage must not hide the others)
                row["error"] = f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
    df = pd.DataFrame(rows)
    parts = df[df.stage.isin(PIPELINE)].time_us.sum()
    total = parts if parts > 0 else df.time_us.sum()
    df.insert(df.columns.get_loc("time_kind") + 1, "share",
              df.time_us / total if total > 0 else math.nan)
    return df


def bottleneck(df: pd.DataFrame) -> str | None:
    """The stage that dominates: the slowest pipeline stage (gate .. combine) when any was
    measured, else the slowest stage of any kind; None if nothing was measured."""
    ok = df[df.time_us.notna()]
    if ok.empty:
        return None
    parts = ok[ok.stage.isin(PIPELINE)]
    pick = parts if not parts.empty else ok
    return str(pick.loc[pick.time_us.idxmax(), "stage"])
