"""The MoE forward split into stages that can be timed one by one on the same inputs.

    gate      logits = x @ W_g                                   x [T, D] -> [T, E]
    route     routerlib.ops.route: scores + top-K + plan          logits [T, E] -> Selection, Plan
    dispatch  gather tokens into expert-major rows                x [T, D] -> rows [R, D]
    experts   layer.experts.forward_batched (SwiGLU grouped GEMM)  rows [R, D] -> [R, D]
    combine   weighted K-way sum back to tokens                   [R, D] -> y [T, D]
    layer     the whole MoELayer forward                          x [T, D] -> y [T, D]
    backward  backward of route + dispatch + combine (experts as the identity): grads of a
              random dy into the logits and x (the weights' grads flow into the logits)

Each stage is a closure of no argument over tensors built once, so that `bench`, `bench_cuda_graph`
and the profiler time exactly the same work. The route stage reads the logits of the `inputs`
generator (uniform, zipf, hot, recorded), not the gate's output, so the load skew is controlled;
dispatch, experts and combine read the plan that the reference computes from those logits. The
layer stage computes its own logits from x; for skewed inputs the gate gets the generator's
per-expert bias so that its load is skewed the same way.

Backends: "torch" (the reference through routerlib.ops), "triton" (the kernels; may not import
yet: the stage is then reported unavailable with the error text), "compile" (torch.compile of the
torch route / dispatch / combine and of the layer). gate and experts run the same torch code on
every backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from routerlib import ops
from routerlib.bench.configs import ModelShape
from routerlib.bench.inputs import expert_bias, make_logits, make_tokens, parse_inputs
from routerlib.bench.roofline import StageCost, stage_cost
from routerlib.config import RouterConfig
from routerlib.layer import MoELayer
from routerlib.metrics import RoutingStats

STAGE_NAMES = ("gate", "route", "dispatch", "experts", "combine", "layer", "backward")
BACKENDS = ("torch", "triton", "compile")
# stages whose code does not depend on the routing backend
BACKEND_INDEPENDENT = ("gate", "experts")


def _error_text(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raiser(e: BaseException) -> Callable[[], Callable[[], object]]:
    def build():
        raise e
    return build


@dataclass
class StageSet:
    """Stage closures over shared inputs. fns: stage -> closure; errors: stage -> why it is
    unavailable (import failure, not implemented, out of memory, ...)."""

    shape: ModelShape
    T: int
    backend: str
    dtype: torch.dtype
    device: torch.device
    inputs: str
    cfg: RouterConfig
    fns: dict[str, Callable[[], object]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    stats: RoutingStats | None = None
    setup_s: dict[str, float] = field(default_factory=dict)  # build + first call (compilation)
    tensors: dict[str, object] = field(default_factory=dict)

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def cost(self, stage: str) -> StageCost:
        s = self.shape
        return stage_cost(stage, self.T, s.D, s.E, s.K, s.F, self.dtype_bytes)

    def names(self) -> list[str]:
        """Requested stages in pipeline order, available or not."""
        return [n for n in STAGE_NAMES if n in self.fns or n in self.errors]


def _route_outputs(sel, plan) -> tuple[torch.Tensor, ...]:
    """Flatten route's dataclasses to tensors (what a compiled function returns cleanly)."""
    return (sel.topk_ids, sel.topk_weights, plan.expert_counts, plan.kept_counts,
            plan.expert_offsets, plan.slot_to_row, plan.row_to_slot)


def _routing_fns(cfg: RouterConfig, backend: str, bias, priority):
    """(route(logits) -> (topk_weights, plan-like), dispatch(x, plan), combine(out, plan, w))."""
    if backend in ("torch", "triton"):
        def route(logits):
            return ops.route(logits, cfg, bias, priority, backend)

        def dispatch(x, plan):
            return ops.dispatch(x, plan, backend)

        def combine(out, plan, w):
            return ops.combine(out, plan, w, backend)

        return route, dispatch, combine
    if backend != "compile":
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")

    # compiled reference; the plan travels as tensors, rebuilt into a RoutingPlan outside
    from routerlib import reference as ref
    from routerlib.types import RoutingPlan, Selection

    def _route(logits):
        return _route_outputs(*ops.route(logits, cfg, bias, priority, "torch"))

    route_c = torch.compile(_route, dynamic=False)
    dispatch_c = torch.compile(ref.dispatch, dynamic=False)
    combine_c = torch.compile(ref.combine, dynamic=False)

    def route(logits):
        ids, w, counts, kept, offs, s2r, r2s = route_c(logits)
        plan = RoutingPlan(counts, kept, offs, s2r, r2s, cfg.capacity(logits.shape[0]),
                           r2s.shape[0])
        return Selection(topk_ids=ids, topk_weights=w), plan

    return route, dispatch_c, combine_c


def _skew_gate(layer: MoELayer, bias: torch.Tensor) -> None:
    """Give the layer's bias-free gate the inputs' per-expert logit offset (skewed load)."""
    old = layer.router.gate
    gate = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device,
                     dtype=old.weight.dtype)
    with torch.no_grad():
        gate.weight.copy_(old.weight)
        gate.bias.copy_(bias.to(gate.bias))
    layer.router.gate = gate


def make_stage_fns(shape: ModelShape, T: int, backend: str = "torch",
                   dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                   inputs: str = "uniform", seed: int = 0, stages: tuple[str, ...] | None = None,
                   allow_compile: bool = True, check: bool = True) -> StageSet:
    """Build the stage closures of one (shape, T, backend) on one set of seeded inputs.

    stages: a subset of STAGE_NAMES (default: all). The experts' weights (E*3*D*F elements) are
    only allocated when "experts" or "layer" is asked for.
    check: call every closure once now (warm-up, compilation, autotuning) and move the stages that
    raise to `errors` instead of `fns`, so that a sweep reports them and carries on.
    Out-of-memory while building the shared inputs is raised (the caller records the shape).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
    stages = tuple(STAGE_NAMES if stages is None else stages)
    for s in stages:
        if s not in STAGE_NAMES:
            raise ValueError(f"stage={s!r}: must be one of {STAGE_NAMES}")
    if T < 1:
        raise ValueError(f"T={T}: must be >= 1")
    device = torch.device(device)
    spec = parse_inputs(inputs)
    cfg = shape.router_config()
    D, E = shape.D, shape.E
    out = StageSet(shape=shape, T=T, backend=backend, dtype=dtype, device=device,
                   inputs=spec.label, cfg=cfg)
    if backend == "compile":
        if not allow_compile:
            out.errors.update({s: "compile backend disabled (allow_compile=False)"
                               for s in stages})
            return out
        torch._dynamo.reset()  # fresh caches: each shape compiles once, no recompile limit hit

    # shared inputs, computed once with the reference (the contract every backend agrees on)
    x = make_tokens(T, D, dtype, device, seed)  # [T, D]
    logits = make_logits(spec, T, E, torch.float32, device, seed)  # [T, E] fp32
    bias = torch.zeros(E, device=device) if cfg.expert_bias else None
    priority = None
    if cfg.drop_policy == "random":  # build_plan wants the keys even when dropless
        g = torch.Generator(device=device).manual_seed(seed + 3)
        priority = torch.rand(T, cfg.slots_per_token, generator=g, device=device)
    with torch.no_grad():
        sel, plan = ops.route(logits, cfg, bias, priority, "torch")
        rows = ops.dispatch(x, plan, "torch")  # [R, D]
    out.stats = RoutingStats.from_plan(plan)
    out.tensors.update(x=x, logits=logits, plan=plan, selection=sel, rows=rows)

    layer = None
    if "experts" in stages or "layer" in stages:
        torch.manual_seed(seed)
        layer = MoELayer(shape.moe_config("torch" if backend == "compile" else backend),
                         device=device, dtype=dtype).eval()
        if cfg.expert_bias:
            layer.router.expert_bias.copy_(bias)
        if spec.kind in ("zipf", "hot"):
            _skew_gate(layer, expert_bias(spec, E, seed))
        out.tensors["layer"] = layer
    w_gate = torch.randn(E, D, device=device, dtype=dtype) / D**0.5  # [E, D] like nn.Linear

    def no_grad(f):
        def g():
            with torch.no_grad():
                return f()
        return g

    builders: dict[str, Callable[[], Callable[[], object]]] = {}
    builders["gate"] = lambda: no_grad(lambda: torch.nn.functional.linear(x, w_gate))
    builders["experts"] = lambda: no_grad(lambda: layer.experts.forward_batched(rows, plan))

    def routing_builders():
        route, dispatch, combine = _routing_fns(cfg, backend, bias, priority)
        # combine reads dispatch's rows as the expert output: same shape and dtype, no experts
        builders["route"] = lambda: no_grad(lambda: route(logits))
        builders["dispatch"] = lambda: no_grad(lambda: dispatch(x, plan))
        builders["combine"] = lambda: no_grad(lambda: combine(rows, plan, sel.topk_weights))

        def backward():
            lg = logits.detach().requires_grad_(True)
            xg = x.detach().requires_grad_(True)
            sel_g, plan_g = route(lg)
            y = combine(dispatch(xg, plan_g), plan_g, sel_g.topk_weights)  # [T, D]
            dy = make_tokens(T, D, dtype, device, seed + 1)
            return lambda: torch.autograd.grad(y, (lg, xg), dy, retain_graph=True)

        builders["backward"] = backward

        def layer_fn():
            f = torch.compile(layer, dynamic=False) if backend == "compile" else layer
            return no_grad(lambda: f(x))

        builders["layer"] = layer_fn

    try:
        routing_builders()
    except Exception as e:  # noqa: BLE001 (report, do not crash the sweep)
        for s in ("route", "dispatch", "combine", "backward", "layer"):
            builders[s] = _raiser(e)

    for s in stages:
        t0 = time.perf_counter()
        try:
            fn = builders[s]()
            if check:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            out.fns[s] = fn
            out.setup_s[s] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            if device.type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            out.errors[s] = _error_text(e)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out
