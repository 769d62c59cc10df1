"""Helpers every kernel module shares: sizes, the interpreter and dependent-launch checks, and
the jitted pieces (dependent-launch prologue, sortable keys, correctly rounded division)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INT32_MIN = tl.constexpr(-(2**31))


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_pdl_devices: dict[int, bool] = {}


def pdl_supported(dev: torch.device) -> bool:
    """Whether kernels on dev can be programmatic dependent launches: an sm_90+ GPU and a Triton
    with griddepcontrol (tl.extra.cuda.gdc_wait); never under the interpreter."""
    if dev.type != "cuda" or interpreting():
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    got = _pdl_devices.get(idx)
    if got is None:
        cuda_lang = getattr(tl.extra, "cuda", None)
        got = _pdl_devices[idx] = (hasattr(cuda_lang, "gdc_wait")
                                   and hasattr(cuda_lang, "gdc_launch_dependents")
                                   and torch.cuda.get_device_capability(idx) >= (9, 0))
    return got


# Programmatic dependent launch (sm_90): a kernel launched with the PDL attribute starts while
# the previous kernel still runs (after that one called gdc_launch_dependents); it first waits
# (griddepcontrol.wait) until the previous kernel has finished and its writes are visible, so
# nothing is read or written early. In a CUDA graph this hides most of a kernel boundary.


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A dependent launch's first step: wait for the previous grid, let the next one start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def sortable(k):
    """fp32 -> int32 whose signed order is the float order (-0 == +0, NaN above +inf, as in
    torch.sort)."""
    bits = k.to(tl.int32, bitcast=True)
    # negative floats (sign bit set: INT32_MIN + magnitude) to -magnitude: their order reversed,
    # and -0.0 lands on +0.0's 0 (two integer ops where a zero test and an xor took four)
    bits = tl.where(bits < 0, -2147483648 - bits, bits)
    return tl.where(k != k, 0x7FC00000, bits)  # NaN beats +inf (0x7F800000); low bits 0


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded, as torch divides. Triton's fp32 `/` is an approximate division
    on NVIDIA GPUs (div.full.f32, up to 2 ulp): w / w gave weights of 0.99999994 where the
    reference has exactly 1.0, and priority dropping then broke the ties differently."""
    return tl.math.div_rn(a, b)
