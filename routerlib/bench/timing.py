"""Timing: medians of repeated calls, the same API on CUDA and CPU.

CUDA: `triton.testing.do_bench` (CUDA events around each call, the L2 cache flushed before each,
warm-up and repetition counts chosen from time budgets in ms). CPU: a perf_counter loop with the
same time budgets. Neither reads a value back from the device inside the timed region: the
functions passed in must not either (no .item(), .tolist(), printing of tensors).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """median, 20th and 80th percentile of one call in microseconds, over n timed calls.

    On CUDA, n is do_bench's repetition count as it computes it (rep_ms / estimated time)."""

    median_us: float
    p20_us: float
    p80_us: float
    n: int

    @property
    def seconds(self) -> float:
        return self.median_us * 1e-6


def _is_cuda(device: torch.device | str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _bench_cuda(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    n = max(1, int(rep_ms / max(med, 1e-6)))  # do_bench's own n_repeat, from its estimate
    return Timing(median_us=med * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3, n=n)


def _bench_cpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float, min_rep: int,
               max_rep: int) -> Timing:
    t_end = time.perf_counter() + warmup_ms * 1e-3
    fn()  # at least one warm-up call (first-call costs: allocation, lazy init, compilation)
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms * 1e-3
    while len(times) < max_rep and (len(times) < min_rep or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = np.quantile(np.asarray(times), [0.5, 0.2, 0.8]) * 1e6
    return Timing(median_us=float(q[0]), p20_us=float(q[1]), p80_us=float(q[2]), n=len(times))


def bench(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0,
          device: torch.device | str | None = None, min_rep: int = 3, max_rep: int = 10_000
          ) -> Timing:
    """Median time of fn() on device (CUDA: do_bench with L2 flush; CPU: perf_counter loop).

    warmup_ms / rep_ms: time budgets for warm-up and timed calls (as do_bench's warmup / rep).
    min_rep, max_rep: bounds on the timed calls of the CPU loop."""
    if _is_cuda(device):
        return _bench_cuda(fn, warmup_ms, rep_ms)
    return _bench_cpu(fn, warmup_ms, rep_ms, min_rep, max_rep)


def host_wall_us(fn: Callable[[], object], reps: int = 200) -> float:
    """Median per-call host wall time (us) of back-to-back CUDA calls, synchronised every 20:
    what an eager caller sees when the host, not the device, sets the pace."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps // 20):
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 20 * 1e6)
    return statistics.median(times)


def cuda_state_ok(device: torch.device | str = "cuda") -> bool:
    """Whether the default CUDA generator and stream still work (a capture that fails inside
    cudaStreamEndCapture can leave the generator marked as capturing: every later random draw
    then raises 'Offset increment outside graph capture')."""
    try:
        torch.randn(1, device=device)
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001 (RuntimeError or torch.AcceleratorError)
        return False


def _recover_after_failed_capture() -> bool:
    """Try to bring the CUDA state back after a failed capture: a trivial capture that succeeds
    runs the generators' capture epilogue. Returns cuda_state_ok() afterwards."""
    if cuda_state_ok():
        return True
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            torch.randn(1, device="cuda")
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass
    return cuda_state_ok()


def host_sync_error(fn: Callable[[], object]) -> str | None:
    """Run fn once with CUDA sync debugging set to 'error': the text of the error if fn
    synchronises with the host (.item(), a bincount's size, a nonzero, a D2H copy), else None.
    A function that syncs cannot be captured in a CUDA graph; trying would poison the capture."""
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prototype feature" warning
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return str(e).split("\n")[0]
    finally:
        torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize()


def prepare_capture(fn: Callable[[], object], warmup: int) -> None:
    """Get fn ready for CUDA-graph capture: warm it up on a side stream, as capture requires
    (lazy init, autotuning, cuBLAS workspaces), then refuse it if it syncs with the host."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    why = host_sync_error(fn)
    if why is not None:
        raise RuntimeError(f"not capturable, host sync: {why}")


def bench_cuda_graph(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0,
                     calls_per_graph: int = 1) -> Timing:
    """Capture fn() in a CUDA graph and time its replays (CUDA only).

    This removes the host's launch cost: what remains is device time plus one graph launch.
    calls_per_graph > 1 captures fn that many times in one graph and reports the time per call
    (amortises the graph launch for tiny decode shapes). Raises RuntimeError if fn cannot be
    captured: it is first run under sync debugging, so a function that syncs with the host is
    refused before any capture starts; if a capture still fails, the CUDA state is repaired
    when possible (the error then says whether it was)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_cuda_graph needs CUDA")
    if calls_per_graph < 1:
        raise ValueError(f"calls_per_graph={calls_per_graph}: must be >= 1")
    prepare_capture(fn, warmup=3)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                fn()
    except Exception as e:  # RuntimeError or torch.AcceleratorError
        del graph
        state = "CUDA state recovered" if _recover_after_failed_capture() else "CUDA STATE BROKEN"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f"capture failed ({state}): {first}") from e
    torch.cuda.synchronize()
    t = _bench_cuda(graph.replay, warmup_ms, rep_ms)
    c = calls_per_graph
    return Timing(t.median_us / c, t.p20_us / c, t.p80_us / c, t.n)
