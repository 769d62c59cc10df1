"""A thin launch path for @triton.jit kernels called again and again with the same shapes.

`kernel[grid](...)` does per-call work in Python before the driver launch: it binds the
arguments, works out their specialization, builds a cache key string, reads runtime knobs and
checks globals. On the lent H100's host that came to ~30 us a launch
(results/h100/route_breakdown.json), more than the routing kernels run on the device.

`launch` keys the compiled kernel on what Triton specializes on (each tensor's dtype and whether
its address is 16-byte aligned; each int's int32/int64 range, == 1 and % 16 == 0; the constexpr
values; num_warps; the device) and, on a hit, calls the compiled kernel directly
(`CompiledKernel[grid](*args, stream=...)`). A miss, or an interpreter run (TRITON_INTERPRET=1),
goes through `kernel[grid]`, which compiles and returns the compiled kernel to keep.
ROUTERLIB_THIN_LAUNCH=0 turns the cache off (every launch through `kernel[grid]`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_cache: dict[tuple, object] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device(args: Sequence[object]) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _spec(a: object) -> object:
    """What Triton specializes an argument on (over-keying only costs a miss)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", -2**31 <= a < 2**31, a == 1, a % 16 == 0)
    if isinstance(a, float):
        return "f"
    return (type(a).__name__, a)  # None and anything else: by value


def launch(kernel, grid: tuple[int, ...], args: Sequence[object], consts: dict[str, object],
           num_warps: int) -> None:
    """kernel[grid](*args, **consts, num_warps=num_warps), by the compiled kernel when cached.

    args: the runtime arguments, in the kernel's order, before its constexprs; consts: every
    constexpr by name (all of them: their values are part of the key and of the call)."""
    if _interpreting() or os.environ.get("ROUTERLIB_THIN_LAUNCH", "1") == "0":
        kernel[grid](*args, **consts, num_warps=num_warps)
        return
    tail = tuple(consts[name] for name in kernel.arg_names[len(args):])  # in the kernel's order
    device = _device(args)
    key = (kernel, device, num_warps, tail, tuple(_spec(a) for a in args))
    compiled = _cache.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **consts, num_warps=num_warps)
        if compiled is not None:
            _cache[key] = compiled
        return
    compiled[grid](*args, *tail, stream=_stream(device))
