"""Backend switch: every routing op runs either the PyTorch reference ("torch") or the Triton
kernels ("triton"); both compute the same function, the reference being the contract."""

from __future__ import annotations

import os

import torch

from routerlib import reference as ref
from routerlib.config import Backend, RouterConfig
from routerlib.types import RoutingPlan, Selection

_triton = None  # routerlib.kernels, imported on the first triton call (it needs triton)


def _kernels():
    """routerlib.kernels. A module global instead of an import statement in every call: ~0.7 us
    less host time a call (an eager route takes ~40)."""
    global _triton
    if _triton is None:
        import routerlib.kernels as kernels

        _triton = kernels
    return _triton


def _check_backend(backend: str) -> None:
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend={backend!r}: must be 'torch' or 'triton'")


def _check_cfg(cfg: object) -> None:
    if not isinstance(cfg, RouterConfig):
        hint = " (build one with RouterConfig(**d))" if isinstance(cfg, dict) else ""
        raise TypeError(f"cfg must be a routerlib.RouterConfig, got {type(cfg).__name__}{hint}")


def _check_triton_device(t: torch.Tensor, name: str) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if isinstance(t, torch.Tensor) and not t.is_cuda:
        if t.device.type == "meta":
            raise ValueError(f"{name} are on the meta device (shapes only, no values): the "
                             "kernels need real values on 'cuda' (or 'cpu' with "
                             "TRITON_INTERPRET=1)")
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"backend='triton' runs Triton kernels on a CUDA GPU, but {name} are on "
                f"{t.device}{'' if torch.cuda.is_available() else ' and no GPU is visible'}: move "
                "them to 'cuda', use backend='torch', or set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels on the CPU (slow; for tests)")


def route(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
          priority: torch.Tensor | None = None, backend: Backend = "torch",
          need_stats: bool | None = None) -> tuple[Selection, RoutingPlan]:
    """Scores, selection and plan for [T, E] logits. priority: [T, S] random keys for
    drop_policy='random'. need_stats (triton): whether the loss sums (Selection.prob_sum,
    zsq_sum) are needed; None: when autograd records. The torch reference always computes them."""
    _check_backend(backend)
    _check_cfg(cfg)
    if backend == "triton":
        _check_triton_device(logits, "logits")
        return _kernels().route(logits, cfg, bias=bias, priority=priority, need_stats=need_stats)
    sel = ref.select(logits, cfg, bias)
    return sel, ref.build_plan(sel, cfg, priority)


def route_dispatch(logits: torch.Tensor, x: torch.Tensor, cfg: RouterConfig,
                   bias: torch.Tensor | None = None, priority: torch.Tensor | None = None,
                   backend: Backend = "torch", need_stats: bool | None = None
                   ) -> tuple[Selection, RoutingPlan, torch.Tensor]:
    """route then dispatch: (selection, plan, rows [R, D]). The triton backend runs both in one
    launch at decode sizes (kernels.route_dispatch)."""
    _check_backend(backend)
    _check_cfg(cfg)
    if backend == "triton":
        _check_triton_device(logits, "logits")
        return _kernels().route_dispatch(logits, x, cfg, bias=bias, priority=priority,
                                     need_stats=need_stats)
    sel, plan = route(logits, cfg, bias, priority, backend)
    return sel, plan, ref.dispatch(x, plan)


def dispatch(x: torch.Tensor, plan: RoutingPlan, backend: Backend = "torch") -> torch.Tensor:
    _check_backend(backend)
    if backend == "triton":
        _check_triton_device(x, "x")
        return _kernels().dispatch(x, plan)
    return ref.dispatch(x, plan)


def combine(expert_out: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor,
            backend: Backend = "torch") -> torch.Tensor:
    _check_backend(backend)
    if backend == "triton":
        _check_triton_device(expert_out, "expert_out")
        return _kernels().combine(expert_out, plan, weights)
    return ref.combine(expert_out, plan, weights)
