"""The target benchmark: routerlib's Triton kernels against the issue's targets, beside the
baselines (PyTorch reference, torch.compile of it, peers), in one run on one device.

    python -m routerlib.bench.targets --out results/targets_h100      # ~3.5 min on an H100
    python -m routerlib.bench.targets --quick --out /tmp/t            # tiny shapes (CPU test)

Sections (full shapes; --quick swaps in tiny ones with the same structure):
    route     scores + top-K + plan, fp32 logits [T, E]:
                qwen3     T=16384 E=128 K=8 softmax + renormalise, dropless
                qwen3-k4  T=8192  E=128 K=4 (same rules)
                deepseek  T=16384 E=256 K=8 sigmoid + bias, best 4 of 8 groups (top-2 sum), x2.5
                e256      the same without the group limit (the ungrouped route it is held to)
                deepseek-v3 / e256 at T=64 (decode), triton eager and graph only
              triton eager (check_finite off, and on to show its cost), triton in a CUDA graph,
              torch eager, torch in a graph (it syncs: the error is the result), torch.compile of
              the reference, peers (torchtitan, deepspeed) eager and in a graph.
    dispatch  x [T, D] -> rows [T*K, D], T=16384, D in {2048, 4096}, E=128, K=8, bf16, dropless;
    combine   rows [T*K, D] -> y [T, D] (weights fp32): triton, torch, compile, peers.
              bytes: dispatch T*D*s + T*K*D*s; combine T*K*D*s + T*K*4 + T*D*s (s = 2).
    decode    T=64 D=4096 E=64 K=8 (OLMoE rules): route + dispatch (ops.route_dispatch: one launch
              on triton up to 16 tokens) + (rows * 0.5, the stand-in for the experts) + combine
              from the logits: triton in a graph, triton and torch eager; and the stages the
              issue names alone (score, top-K, plan, dispatch, combine: path_no_expert, triton
              in a graph), the row its target is judged on. The eager host wall time of that
              path at T in {1, 16, 64} beside one torch index_select of the same T rows.
    backward  qwen3 T=16384 D=2048: route + dispatch + combine with the experts as the identity;
              forward time, backward time (autograd.grad of y into logits, x and the top-K
              weights, retain_graph), ratio backward / forward: triton and torch.

Every triton (and compile) measurement is first checked against the reference on the same
inputs (ids and plan exactly, floats with a tolerance; a graph by replaying it into poisoned
outputs): the row's "verified" is True / False, with the mismatch in "verify_error". Times are
medians of routerlib.bench.timing (CUDA: do_bench with the L2 flushed). Eager rows also carry
wall_us, the host wall time per call of back-to-back calls: do_bench enqueues each call behind an
L2 flush, which hides the host's launch cost, so the eager target is judged on the larger of the
two. GB/s count the minimal bytes above; frac_copy divides them by the copy bandwidth measured at
the start of the same run.

Anything that fails (kernel missing, peer not installed, capture refused, out of memory) gives a
row with status "error" and the text; what the time budget or the device rules out gives status
"skipped". Measurements run in three phases so that the targets come first: triton and torch,
then the peers, then torch.compile (whose compilations cost the most wall time).

Output: PREFIX.json {"env", "roofs", "args", "rows", "targets"} and PREFIX.csv (the rows).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from routerlib import ops
from routerlib.bench.configs import DEEPSEEK_V3, OLMOE, QWEN3_30B_A3B
from routerlib.bench.envinfo import env_info
from routerlib.bench.inputs import make_logits, make_tokens
from routerlib.bench.results import ResultSet
from routerlib.bench.roofline import Roofs, measure_roofs, stage_cost
from routerlib.bench.timing import (
    Timing,
    _recover_after_failed_capture,
    bench,
    bench_cuda_graph,
    prepare_capture,
)
from routerlib.config import RouterConfig
from routerlib.types import RoutingPlan, Selection

SECTIONS = ("route", "dispatch", "decode", "backward")  # "dispatch" also times combine
IMPLS = ("triton", "torch", "compile", "torchtitan", "deepspeed")
PEERS = ("torchtitan", "deepspeed")
MODES = ("eager", "eager_check_finite", "graph", "forward", "backward")
OPS = ("route", "dispatch", "combine", "path", "route+dispatch+combine")

ROW_COLUMNS = [
    "section", "case", "op", "impl", "mode", "T", "D", "E", "K", "dtype", "status",
    "median_us", "p20_us", "p80_us", "n", "wall_us", "bytes", "gbps", "frac_copy", "ratio",
    "verified", "verify_error", "error", "note",
]

EXPERT_SCALE = 0.5  # decode: expert output = dispatched rows * this constant


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RouteCase:
    """One routing shape: key names it in rows and targets; cfg carries the scoring rules."""

    key: str
    T: int
    cfg: RouterConfig
    peer_score: str = "softmax"  # what torchtitan's router is told (it has no group limit)
    triton_only: bool = False  # a ratio target's case: triton eager and graph rows only

    @property
    def E(self) -> int:
        return self.cfg.num_experts

    @property
    def K(self) -> int:
        return self.cfg.top_k


@dataclass(frozen=True)
class Cases:
    route: tuple[RouteCase, ...]
    rows_T: int  # dispatch / combine
    rows_D: tuple[int, ...]
    rows_cfg: RouterConfig
    decode_T: int
    decode_D: int
    decode_cfg: RouterConfig
    decode_host_T: tuple[int, ...]  # the eager host-time rows of the decode path
    bwd_T: int
    bwd_D: int
    bwd_cfg: RouterConfig


def make_cases(quick: bool) -> Cases:
    """The full shapes of the issue, or tiny ones with the same rules (quick)."""
    qwen = QWEN3_30B_A3B.router_config  # softmax + renormalise, dropless, check_finite off
    deepseek = DEEPSEEK_V3.router_config  # sigmoid + bias, 4 of 8 groups by top-2 sum, x2.5
    olmoe = OLMOE.router_config  # softmax, no renormalisation
    ungrouped = dict(n_groups=1, topk_groups=1)  # DeepSeek-V3's scoring without the groups
    if quick:  # the ratio targets' extra cases are left out: their rows say "not measured"
        return Cases(
            route=(RouteCase("qwen3", 48, qwen(num_experts=16, top_k=4)),
                   RouteCase("qwen3-k4", 24, qwen(num_experts=16, top_k=2)),
                   RouteCase("deepseek-v3", 48, deepseek(num_experts=32, top_k=4), "sigmoid")),
            rows_T=40, rows_D=(32, 64), rows_cfg=qwen(num_experts=8, top_k=2),
            decode_T=8, decode_D=32, decode_cfg=olmoe(num_experts=8, top_k=2),
            decode_host_T=(2,), bwd_T=32, bwd_D=32, bwd_cfg=qwen(num_experts=16, top_k=4))
    return Cases(
        route=(RouteCase("qwen3", 16384, qwen()),
               RouteCase("qwen3-k4", 8192, qwen(top_k=4)),
               RouteCase("deepseek-v3", 16384, deepseek(), "sigmoid"),
               RouteCase("e256", 16384, deepseek(**ungrouped), "sigmoid", True),
               RouteCase("deepseek-v3-T64", 64, deepseek(), "sigmoid", True),
               RouteCase("e256-T64", 64, deepseek(**ungrouped), "sigmoid", True)),
        rows_T=16384, rows_D=(2048, 4096), rows_cfg=qwen(),
        decode_T=64, decode_D=4096, decode_cfg=olmoe(), decode_host_T=(1, 16, 64),
        bwd_T=16384, bwd_D=2048, bwd_cfg=qwen())


# ---------------------------------------------------------------------------------------------
# Comparison (no test helpers in the package: the same rules, raising AssertionError)
# ---------------------------------------------------------------------------------------------

def _tensors(out: object) -> list[torch.Tensor]:
    """Flatten an output (tensor, tuple/list of them, Selection, RoutingPlan) to its tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Selection):
        return [out.topk_ids, out.topk_weights]
    if isinstance(out, RoutingPlan):
        return [out.expert_counts, out.kept_counts, out.expert_offsets, out.slot_to_row,
                out.row_to_slot]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def compare(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float | None) -> None:
    """Integers exactly; floats |a - e| <= tol * (1 + |e|). Raises naming the worst entry."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not expected.is_floating_point():
        a, e = actual.cpu().long(), expected.cpu().long()
        diff = (a != e).nonzero()
        if diff.numel():
            idx = tuple(int(i) for i in diff[0])
            raise AssertionError(f"{name}: {diff.shape[0]} entries differ, first at {idx}: "
                                 f"{a[idx].item()} != {e[idx].item()}")
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        raise AssertionError(f"{name}: NaN in the output (an entry left unwritten?)")
    err = (a - e).abs() / (1 + e.abs())
    if err.numel() and err.max() > (tol or 0.0):
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        raise AssertionError(f"{name}: max rel err {err.max():.2e} > {tol:.0e} at {idx}: "
                             f"{a[idx].item()!r} vs {e[idx].item()!r}")


Checker = Callable[[object], None]


def expect(expected: object, names: Iterable[str], tols: Iterable[float | None]) -> Checker:
    """A checker of an output against the expected one (same structure); tols per tensor
    (None for integer tensors)."""
    exp = _tensors(expected)
    names, tols = list(names), list(tols)
    assert len(names) == len(exp) == len(tols), (len(names), len(exp), len(tols))

    def check(out: object) -> None:
        got = _tensors(out)
        if len(got) != len(exp):
            raise AssertionError(f"{len(got)} outputs, expected {len(exp)}")
        for a, e, n, t in zip(got, exp, names, tols):
            compare(a, e, n, t)

    return check


ROUTE_NAMES = ("topk_ids", "topk_weights", "expert_counts", "kept_counts", "expert_offsets",
               "slot_to_row", "row_to_slot")
ROUTE_TOLS = (None, 1e-5, None, None, None, None, None)


def _route_flat(sel: Selection, plan: RoutingPlan) -> tuple[torch.Tensor, ...]:
    return (sel.topk_ids, sel.topk_weights, *_tensors(plan))


# ---------------------------------------------------------------------------------------------
# The runner: one row per measurement, errors recorded, never raised
# ---------------------------------------------------------------------------------------------

def _error_text(e: BaseException, limit: int = 300) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _poison(ts: list[torch.Tensor]) -> None:
    for t in ts:
        t.fill_(float("nan") if t.is_floating_point() else -7777)


@dataclass
class Runner:
    device: torch.device
    quick: bool
    impls: tuple[str, ...]
    warmup_ms: float
    rep_ms: float
    deadline: float  # time.perf_counter() after which measurements are skipped
    roofs: Roofs | None = None
    rows: list[dict] = field(default_factory=list)
    graph_off: str | None = None  # set when a failed capture left CUDA broken

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def wants(self, impl: str) -> bool:
        return impl in self.impls

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _bench(self, fn: Callable[[], object]) -> Timing:
        if self.cuda:
            return bench(fn, self.warmup_ms, self.rep_ms, self.device)
        return bench(fn, self.warmup_ms, self.rep_ms, self.device, min_rep=2,
                     max_rep=5 if self.quick else 1000)

    def _wall_us(self, fn: Callable[[], object], median_us: float) -> float:
        """Host wall time per call of back-to-back calls (synchronised once at the end)."""
        n = int(min(2000, max(5, self.rep_ms * 1e3 / max(median_us, 1.0))))
        if not self.cuda:
            n = min(n, 5 if self.quick else 20)
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    def _graph_check(self, fn: Callable[[], object], check: Checker) -> None:
        """Capture fn, poison its outputs, replay, check them: the graph computes, not only the
        capture-time run."""
        prepare_capture(fn, warmup=2)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                out = fn()
        except Exception as e:
            del g
            state = ("CUDA state recovered" if _recover_after_failed_capture()
                     else "CUDA STATE BROKEN")
            raise RuntimeError(f"capture failed ({state}): {_error_text(e)}") from e
        _poison(_tensors(out))
        g.replay()
        torch.cuda.synchronize()
        try:
            check(out)
        finally:
            del g, out

    def measure(self, section: str, case: str, op: str, impl: str, mode: str, *,
                shape: dict, build: Callable[[], Callable[[], object]],
                check: Checker | None = None, nbytes: float | None = None,
                note: str = "") -> dict:
        """Build fn (build() may raise: import error, missing kernel), verify it once if a
        checker is given, time it (mode "graph": in a CUDA graph), and append the row."""
        row: dict = {"section": section, "case": case, "op": op, "impl": impl, "mode": mode,
                     **shape, "bytes": nbytes, "note": note or None}
        self.rows.append(row)
        graph = mode == "graph"
        if time.perf_counter() > self.deadline:
            row.update(status="skipped", error="skipped: time budget (--budget-s) spent")
            return row
        if graph and not self.cuda:
            row.update(status="skipped", error="skipped: CUDA graphs need a CUDA device")
            return row
        if graph and self.graph_off:
            row.update(status="skipped", error=self.graph_off)
            return row
        try:
            t_build = time.perf_counter()
            fn = build()
            if check is not None:
                try:
                    if graph:
                        self._graph_check(fn, check)
                    else:
                        check(fn())
                    row["verified"] = True
                except AssertionError as e:
                    row.update(verified=False, verify_error=_error_text(e))
            elif impl == "compile":
                fn()
            if impl == "compile":
                row["note"] = "; ".join(filter(None, [
                    note, f"compile + first call {time.perf_counter() - t_build:.1f} s"]))
            t = bench_cuda_graph(fn, self.warmup_ms, self.rep_ms) if graph else self._bench(fn)
            row.update(status="ok", median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us,
                       n=t.n)
            if not graph:
                row["wall_us"] = self._wall_us(fn, t.median_us)
            if nbytes:
                row["gbps"] = nbytes / t.seconds / 1e9
                if self.roofs is not None:
                    row["frac_copy"] = row["gbps"] / self.roofs.copy_gbps
        except Exception as e:  # noqa: BLE001 (record it, carry on)
            msg = ("OOM: " if _is_oom(e) else "") + _error_text(e)
            row.update(status="error", error=msg)
            if "CUDA STATE BROKEN" in msg:
                self.graph_off = f"skipped: graphs off after an unrecoverable capture ({msg})"
            self.free()
        return row


def _no_grad(f: Callable[[], object]) -> Callable[[], object]:
    def g():
        with torch.no_grad():
            return f()
    return g


def _const(fn: Callable[[], object]) -> Callable[[], Callable[[], object]]:
    return lambda: fn


def _compiled(f: Callable, **kw) -> Callable:
    torch._dynamo.reset()  # fresh caches: each case compiles once, no recompile limit reached
    return torch.compile(f, **kw)


def _peer_fns(name: str, logits: torch.Tensor, x: torch.Tensor, top_k: int, score: str
              ) -> dict[str, Callable[[], object]]:
    from routerlib.bench import peers

    if name == "torchtitan":
        return peers.torchtitan_fns(logits, x, top_k, score_func=score, route_norm=True)
    return peers.deepspeed_fns(logits, x, top_k)


def _lazy_peer(name: str, make: Callable[[], dict], key: str
               ) -> Callable[[], Callable[[], object]]:
    """A build() that builds the peer's closures once (shared by its rows) and picks one."""
    cache: dict = {}

    def build():
        if "fns" not in cache:
            try:
                cache["fns"] = make()
            except Exception as e:  # noqa: BLE001 (import error: every row says so)
                cache["fns"] = e
        if isinstance(cache["fns"], BaseException):
            raise cache["fns"]
        return cache["fns"][key]

    return build


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _bias(cfg: RouterConfig, device: torch.device, seed: int) -> torch.Tensor | None:
    """A small seeded expert bias (non-zero) when the config selects with one."""
    if not cfg.expert_bias:
        return None
    g = torch.Generator(device="cpu").manual_seed(seed + 11)
    return (0.01 * torch.randn(cfg.num_experts, generator=g)).to(device)


def run_route(r: Runner, cases: Cases, seed: int) -> None:
    for c in cases.route:
        _route_case(r, c, seed)
        r.free()


def _route_case(r: Runner, c: RouteCase, seed: int) -> None:
    T, E, K = c.T, c.E, c.K
    shape = {"T": T, "D": None, "E": E, "K": K, "dtype": "float32"}
    logits = make_logits("uniform", T, E, torch.float32, r.device, seed)  # [T, E]
    bias = _bias(c.cfg, r.device, seed)
    nbytes = stage_cost("route", T, 1, E, K, 1).bytes
    cfg = c.cfg  # check_finite=False (the configs' benchmark default)
    cfg_cf = dataclasses.replace(cfg, check_finite=True)

    def route_fn(backend: str, cfg_: RouterConfig = cfg):
        return _no_grad(lambda: _route_flat(*ops.route(logits, cfg_, bias, None, backend)))

    check = None
    if r.wants("triton") or r.wants("compile"):
        expected = route_fn("torch")()
        check = expect(expected, ROUTE_NAMES, ROUTE_TOLS)
    m = lambda impl, mode, build, **kw: r.measure(  # noqa: E731
        "route", c.key, "route", impl, mode, shape=shape, build=build, nbytes=nbytes, **kw)
    if r.wants("triton"):
        m("triton", "eager", _const(route_fn("triton")), check=check)
        if not c.triton_only:
            m("triton", "eager_check_finite", _const(route_fn("triton", cfg_cf)), check=check,
              note="check_finite=True: a device-side check, read at a later call")
        m("triton", "graph", _const(route_fn("triton")), check=check)
    if c.triton_only:
        return
    if r.wants("torch"):
        m("torch", "eager", _const(route_fn("torch")))
        m("torch", "graph", _const(route_fn("torch")),
          note="the reference syncs (bincount, nonzero): capture is expected to fail")
    for peer in PEERS:
        if not r.wants(peer):
            continue
        x_small = make_tokens(T, 64, torch.bfloat16, r.device, seed)  # their build needs x
        note = ("softmax top-K with capacity 1.25 and drops (its topkgating)"
                if peer == "deepspeed" else
                f"{c.peer_score}, route_norm, histc counts + argsort; no group limit")
        build = _lazy_peer(peer, lambda p=peer, x=x_small: _peer_fns(
            p, logits, x, K, c.peer_score), "route")
        m(peer, "eager", build, note=note)
        m(peer, "graph", build, note=note)
    if r.wants("compile"):
        def build_compile():
            f = _compiled(lambda lg: _route_flat(*ops.route(lg, cfg, bias, None, "torch")),
                          dynamic=False)
            return _no_grad(lambda: f(logits))
        m("compile", "eager", build_compile, check=check, note="torch.compile(reference)")


def _plan_for(T: int, cfg: RouterConfig, device: torch.device, seed: int
              ) -> tuple[torch.Tensor, Selection, RoutingPlan]:
    logits = make_logits("uniform", T, cfg.num_experts, torch.float32, device, seed)
    with torch.no_grad():
        sel, plan = ops.route(logits, cfg, None, None, "torch")
    return logits, sel, plan


def run_dispatch_combine(r: Runner, cases: Cases, seed: int) -> None:
    logits, sel, plan = _plan_for(cases.rows_T, cases.rows_cfg, r.device, seed)
    for D in cases.rows_D:
        _rows_case(r, cases.rows_cfg, D, logits, sel.topk_weights, plan, seed)
        r.free()


def _rows_case(r: Runner, cfg: RouterConfig, D: int, logits: torch.Tensor, w: torch.Tensor,
               plan: RoutingPlan, seed: int) -> None:
    """Dispatch and combine of one hidden size D on the reference's plan; w [T, K] fp32."""
    T, K = plan.slot_to_row.shape
    E = cfg.num_experts
    dt = torch.bfloat16
    s = torch.empty((), dtype=dt).element_size()
    key = f"D={D}"
    shape = {"T": T, "D": D, "E": E, "K": K, "dtype": "bfloat16"}
    bytes_d = T * D * s + T * K * D * s
    bytes_c = T * K * D * s + T * K * 4 + T * D * s
    try:
        x = make_tokens(T, D, dt, r.device, seed)  # [T, D]
        with torch.no_grad():
            rows = ops.dispatch(x, plan, "torch")  # [T*K, D] (dropless, no padding)
            y_ref = ops.combine(rows, plan, w, "torch")  # [T, D]
    except Exception as e:  # noqa: BLE001 (OOM on a small card)
        for op in ("dispatch", "combine"):
            r.rows.append({"section": "dispatch", "case": key, "op": op, "impl": "*",
                           "mode": "eager", **shape, "status": "error",
                           "error": "inputs: " + _error_text(e)})
        return
    chk_d = expect(rows, ["rows"], [0.0])  # a copy: bit for bit
    chk_c = expect(y_ref, ["y"], [1e-2])  # bf16 output, fp32 sums in another order

    def md(impl, mode, build, **kw):
        return r.measure("dispatch", key, "dispatch", impl, mode, shape=shape, build=build,
                         nbytes=bytes_d, **kw)

    def mc(impl, mode, build, **kw):
        return r.measure("dispatch", key, "combine", impl, mode, shape=shape, build=build,
                         nbytes=bytes_c, **kw)

    def disp(backend):
        return _no_grad(lambda: ops.dispatch(x, plan, backend))

    def comb(backend):
        return _no_grad(lambda: ops.combine(rows, plan, w, backend))

    if r.wants("triton"):
        md("triton", "eager", _const(disp("triton")), check=chk_d)
        md("triton", "graph", _const(disp("triton")), check=chk_d)
        mc("triton", "eager", _const(comb("triton")), check=chk_c)
        mc("triton", "graph", _const(comb("triton")), check=chk_c)
    if r.wants("torch"):
        md("torch", "eager", _const(disp("torch")))
        mc("torch", "eager", _const(comb("torch")))
    for peer in PEERS:
        if not r.wants(peer):
            continue
        note = ("its own routing of the same logits: softmax top-K, argsort reorder"
                if peer == "torchtitan" else
                "capacity 1.25 with drops: an [E, C, D] buffer, not the dropless rows")
        make = lambda p=peer: _peer_fns(p, logits, x, K, "softmax")  # noqa: E731
        md(peer, "eager", _lazy_peer(peer, make, "dispatch"), note=note)
        mc(peer, "eager", _lazy_peer(peer, make, "combine"), note=note)
    if r.wants("compile"):
        from routerlib import reference as ref

        def build_d():
            f = _compiled(ref.dispatch, dynamic=False)
            return _no_grad(lambda: f(x, plan))

        def build_c():
            f = _compiled(ref.combine, dynamic=False)
            return _no_grad(lambda: f(rows, plan, w))

        md("compile", "eager", build_d, check=chk_d, note="torch.compile(reference)")
        mc("compile", "eager", build_c, check=chk_c, note="torch.compile(reference)")


def run_decode(r: Runner, cases: Cases, seed: int) -> None:
    cfg, T, D = cases.decode_cfg, cases.decode_T, cases.decode_D
    E, K = cfg.num_experts, cfg.top_k
    dt = torch.bfloat16
    s = torch.empty((), dtype=dt).element_size()
    shape = {"T": T, "D": D, "E": E, "K": K, "dtype": "bfloat16"}
    logits = make_logits("uniform", T, E, torch.float32, r.device, seed)  # [T, E]
    x = make_tokens(T, D, dt, r.device, seed)  # [T, D]
    nbytes = (stage_cost("route", T, D, E, K, 1, s).bytes
              + stage_cost("dispatch", T, D, E, K, 1, s).bytes
              + stage_cost("combine", T, D, E, K, 1, s).bytes)

    def path(backend: str, expert: bool = True):
        def f():
            sel, plan, rows = ops.route_dispatch(logits, x, cfg, None, None, backend)
            out = rows * EXPERT_SCALE if expert else rows  # [R, D] the experts' stand-in
            y = ops.combine(out, plan, sel.topk_weights, backend)  # [T, D]
            return sel.topk_ids, y
        return _no_grad(f)

    check = check_bare = None
    if r.wants("triton"):
        check = expect(path("torch")(), ["topk_ids", "y"], [None, 1e-2])
        check_bare = expect(path("torch", False)(), ["topk_ids", "y"], [None, 1e-2])
    note = "logits -> route+dispatch -> rows*0.5 -> combine"
    m = lambda impl, mode, **kw: r.measure(  # noqa: E731
        "decode", f"T={T}", "path", impl, mode, shape=shape, build=_const(path(impl)),
        nbytes=nbytes, note=note, **kw)
    if r.wants("triton"):
        m("triton", "graph", check=check)
        m("triton", "eager", check=check)
        # the stages the issue names (score, top-K, plan, dispatch, combine) and nothing
        # between: combine reads the dispatched rows. The decode target is judged on this row;
        # the path rows above keep the stand-in expert (one more kernel) beside it
        r.measure("decode", f"T={T}", "path_no_expert", "triton", "graph", shape=shape,
                  build=_const(path("triton", False)), nbytes=nbytes, check=check_bare,
                  note="logits -> route+dispatch -> combine (no expert between)")
    if r.wants("torch"):
        m("torch", "eager")
        m("torch", "graph")
    for t in cases.decode_host_T:  # the eager host cost of the path against one index_select
        _decode_host(r, cfg, t, D, seed)


def _decode_host(r: Runner, cfg: RouterConfig, T: int, D: int, seed: int) -> None:
    """Eager rows (wall_us: host wall time a call) of route + dispatch + combine and of one
    torch.index_select of T rows of x, at decode size T."""
    E, K = cfg.num_experts, cfg.top_k
    dt = torch.bfloat16
    shape = {"T": T, "D": D, "E": E, "K": K, "dtype": "bfloat16"}
    logits = make_logits("uniform", T, E, torch.float32, r.device, seed)  # [T, E]
    x = make_tokens(T, D, dt, r.device, seed)  # [T, D]
    idx = torch.arange(T, device=r.device).flip(0)  # [T]

    def path(backend: str):
        def f():
            sel, plan, rows = ops.route_dispatch(logits, x, cfg, None, None, backend)
            return sel.topk_ids, ops.combine(rows, plan, sel.topk_weights, backend)
        return _no_grad(f)

    if r.wants("triton"):
        r.measure("decode", f"host T={T}", "path_no_expert", "triton", "eager", shape=shape,
                  build=_const(path("triton")),
                  check=expect(path("torch")(), ["topk_ids", "y"], [None, 1e-2]),
                  note="route+dispatch -> combine, eager: judged on wall_us")
    if r.wants("torch"):
        r.measure("decode", f"host T={T}", "index_select", "torch", "eager", shape=shape,
                  build=_const(_no_grad(lambda: torch.index_select(x, 0, idx))),
                  note="one torch.index_select of T rows: the host-time yardstick")


def run_backward(r: Runner, cases: Cases, seed: int) -> None:
    cfg, T, D = cases.bwd_cfg, cases.bwd_T, cases.bwd_D
    E, K = cfg.num_experts, cfg.top_k
    dt = torch.bfloat16
    s = torch.empty((), dtype=dt).element_size()
    shape = {"T": T, "D": D, "E": E, "K": K, "dtype": "bfloat16"}
    logits = make_logits("uniform", T, E, torch.float32, r.device, seed)  # [T, E]
    x = make_tokens(T, D, dt, r.device, seed)  # [T, D]
    dy = make_tokens(T, D, dt, r.device, seed + 1)  # [T, D]
    fwd_bytes = (stage_cost("route", T, D, E, K, 1, s).bytes
                 + stage_cost("dispatch", T, D, E, K, 1, s).bytes
                 + stage_cost("combine", T, D, E, K, 1, s).bytes)
    bwd_bytes = stage_cost("backward", T, D, E, K, 1, s).bytes

    def forward(backend: str):
        def f():
            lg = logits.detach().requires_grad_(True)
            xg = x.detach().requires_grad_(True)
            sel, plan = ops.route(lg, cfg, None, None, backend)
            w = sel.topk_weights  # [T, K] its grad flows on into lg
            y = ops.combine(ops.dispatch(xg, plan, backend), plan, w, backend)  # [T, D]
            return lg, xg, w, y
        return f

    def backward(backend: str):
        def build():
            lg, xg, w, y = forward(backend)()
            return lambda: torch.autograd.grad(y, (lg, xg, w), dy, retain_graph=True)
        return build

    chk_f = chk_b = None
    if r.wants("triton"):
        lg, xg, w, y = forward("torch")()
        grads = torch.autograd.grad(y, (lg, xg, w), dy)
        chk_f = expect((w.detach(), y.detach()), ["topk_weights", "y"], [1e-5, 1e-2])
        chk_b = expect(grads, ["grad_logits", "grad_x", "grad_weights"], [1e-3, 2e-2, 1e-3])
        del lg, xg, w, y, grads
    for impl in ("triton", "torch"):
        if not r.wants(impl):
            continue
        fwd = r.measure("backward", "qwen3", "route+dispatch+combine", impl, "forward",
                        shape=shape, build=_const(forward(impl)), nbytes=fwd_bytes,
                        check=(lambda out: chk_f((out[2], out[3]))) if impl == "triton" and chk_f
                        else None, note="autograd on: tensors saved for the backward")
        bwd = r.measure("backward", "qwen3", "route+dispatch+combine", impl, "backward",
                        shape=shape, build=backward(impl), nbytes=bwd_bytes,
                        check=chk_b if impl == "triton" else None,
                        note="autograd.grad(y, (logits, x, topk_weights), dy, retain_graph)")
        if fwd.get("median_us") and bwd.get("median_us"):
            bwd["ratio"] = bwd["median_us"] / fwd["median_us"]


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    name: str
    section: str
    case: str
    op: str
    mode: str
    metric: str  # "us" (eager: max of median and wall), "graph_us", "frac_copy", "ratio"
    op_cmp: str  # "<=" or ">="
    goal: float


def targets_for(cases: Cases) -> tuple[Target, ...]:
    """The issue's targets, on the case keys of these shapes (quick runs have their own)."""
    route = cases.route[0].key  # qwen3: T=16384 E=128 K=8
    d_lo, d_hi = (f"D={d}" for d in (cases.rows_D[0], cases.rows_D[-1]))
    dec = f"T={cases.decode_T}"
    return (
        Target(f"route graph {route}", "route", route, "route", "graph", "graph_us", "<=",
               10.0),
        Target(f"route eager {route}", "route", route, "route", "eager", "us", "<=", 40.0),
        Target(f"dispatch {d_lo} frac of copy BW", "dispatch", d_lo, "dispatch", "eager",
               "frac_copy", ">=", 0.85),
        Target(f"dispatch {d_hi} frac of copy BW", "dispatch", d_hi, "dispatch", "eager",
               "frac_copy", ">=", 0.85),
        Target(f"combine {d_lo} frac of copy BW", "dispatch", d_lo, "combine", "eager",
               "frac_copy", ">=", 0.85),
        Target(f"combine {d_hi} frac of copy BW", "dispatch", d_hi, "combine", "eager",
               "frac_copy", ">=", 0.85),
        Target(f"decode path graph {dec} D={cases.decode_D}", "decode", dec, "path_no_expert",
               "graph", "graph_us", "<=", 15.0),
        Target(f"backward/forward ratio qwen3 T={cases.bwd_T}", "backward", "qwen3",
               "route+dispatch+combine", "backward", "ratio", "<=", 2.0),
    )


@dataclass(frozen=True)
class RatioTarget:
    """measure(row a) / measure(row b) against a goal: rows named (section, case, op, impl,
    mode); measure "us" (eager: the larger of median and wall), "wall_us" or "graph_us"."""

    name: str
    a: tuple[str, str, str, str, str]
    b: tuple[str, str, str, str, str]
    metric: str
    goal: float


def ratio_targets_for(cases: Cases) -> tuple[RatioTarget, ...]:
    ds, flat = "deepseek-v3", "e256"
    out = [RatioTarget(f"{ds} / {flat} route graph T={cases.route[2].T}",
                       ("route", ds, "route", "triton", "graph"),
                       ("route", flat, "route", "triton", "graph"), "graph_us", 1.5)]
    for mode, metric in (("graph", "graph_us"), ("eager", "us")):
        out.append(RatioTarget(f"{ds} / {flat} route {mode} T=64",
                               ("route", f"{ds}-T64", "route", "triton", mode),
                               ("route", f"{flat}-T64", "route", "triton", mode), metric, 1.3))
    for t in cases.decode_host_T:
        out.append(RatioTarget(f"decode path eager host T={t} / index_select",
                               ("decode", f"host T={t}", "path_no_expert", "triton", "eager"),
                               ("decode", f"host T={t}", "index_select", "torch", "eager"),
                               "wall_us", 4.0))
    return tuple(out)


def _find(rows: list[dict], key: tuple[str, str, str, str, str]) -> dict | None:
    return next((r for r in rows if (r["section"], r["case"], r["op"], r["impl"], r["mode"])
                 == key), None)


def _measure_of(row: dict | None, metric: str) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    if metric == "us":
        return max(row["median_us"], row.get("wall_us") or 0.0)
    return row.get("wall_us") if metric == "wall_us" else row.get("median_us")


def evaluate_ratio_targets(rows: list[dict], cases: Cases, quick: bool) -> list[dict]:
    out = []
    for tg in ratio_targets_for(cases):
        ra, rb = _find(rows, tg.a), _find(rows, tg.b)
        a, b = _measure_of(ra, tg.metric), _measure_of(rb, tg.metric)
        measured = a / b if a is not None and b else None
        verified = None if ra is None else ra.get("verified")
        met = measured is not None and measured <= tg.goal
        why = None
        if measured is None:
            why = "not measured: " + "; ".join(filter(None, [
                (ra or {}).get("error"), (rb or {}).get("error")]))[:200]
        elif verified is False:
            why = "output differs from the reference"
        elif not met:
            why = f"misses the goal <= {tg.goal:g} ({a:.1f} / {b:.1f} us)"
        out.append({"target": tg.name, "metric": f"ratio of {tg.metric}", "cmp": "<=",
                    "goal": tg.goal, "measured": measured, "verified": verified,
                    "pass": bool(met and verified is not False), "why": why,
                    "shape": "quick" if quick else "full"})
    return out


def evaluate_targets(rows: list[dict], cases: Cases, quick: bool) -> list[dict]:
    """One entry per target: the triton row's measure, pass = meets the goal and verified."""
    out = []
    for tg in targets_for(cases):
        row = next((r for r in rows if r["section"] == tg.section and r["case"] == tg.case
                    and r["op"] == tg.op and r["impl"] == "triton" and r["mode"] == tg.mode),
                   None)
        measured = None
        if row is not None and row.get("status") == "ok":
            if tg.metric == "us":  # eager: do_bench hides launch cost behind the L2 flush
                measured = max(row["median_us"], row.get("wall_us") or 0.0)
            elif tg.metric == "graph_us":
                measured = row["median_us"]
            else:
                measured = row.get(tg.metric)
        verified = None if row is None else row.get("verified")
        met = measured is not None and (measured <= tg.goal if tg.op_cmp == "<="
                                        else measured >= tg.goal)
        why = None
        if row is None:
            why = "not measured (triton not among --backends?)"
        elif measured is None:
            why = row.get("error") or "no number"
        elif verified is False:
            why = "output differs from the reference: " + (row.get("verify_error") or "")
        elif not met:
            why = f"misses the goal {tg.op_cmp} {tg.goal:g}"
        out.append({"target": tg.name, "metric": tg.metric, "cmp": tg.op_cmp, "goal": tg.goal,
                    "measured": measured, "verified": verified,
                    "pass": bool(met and verified is not False), "why": why,
                    "shape": "quick" if quick else "full"})
    return out + evaluate_ratio_targets(rows, cases, quick)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m routerlib.bench.targets",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results prefix: writes PREFIX.json, PREFIX.csv")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and short timing budgets (CPU tests, smoke runs)")
    p.add_argument("--backends", default="auto",
                   help="comma list among triton, torch, compile, torchtitan, deepspeed, 'peers' "
                        "(both), or 'auto': all on CUDA; on CPU torch, plus triton under "
                        "TRITON_INTERPRET=1 with --quick")
    p.add_argument("--sections", default="all",
                   help=f"comma list among {', '.join(SECTIONS)} (dispatch includes combine), "
                        "or 'all'")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--warmup", type=float, default=None, help="warm-up ms per measurement")
    p.add_argument("--rep", type=float, default=None, help="timing ms per measurement")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="wall seconds for the measurements; later ones are recorded as skipped "
                        "(default 270: the whole run stays near 5 min)")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_backends(spec: str, device: torch.device, quick: bool) -> tuple[str, ...]:
    if spec == "auto":
        if device.type == "cuda":
            return IMPLS
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        return ("triton", "torch") if interp and quick else ("torch",)
    out: list[str] = []
    for b in (x.strip() for x in spec.split(",")):
        if not b:
            continue
        names = PEERS if b == "peers" else (IMPLS if b == "all" else (b,))
        for n in names:
            if n not in IMPLS:
                raise ValueError(f"--backends: {n!r} is not one of {IMPLS} (or peers, all)")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError(f"--backends={spec!r}: empty")
    return tuple(out)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_results(result: dict, prefix: str) -> list[str]:
    """PREFIX.json (env, roofs, args, rows, targets) and PREFIX.csv (rows)."""
    d = os.path.dirname(prefix)
    if d:
        os.makedirs(d, exist_ok=True)
    rows = [{c: _clean(r.get(c)) for c in ROW_COLUMNS} for r in result["rows"]]
    paths = [prefix + ".json", prefix + ".csv"]
    with open(paths[0], "w") as f:
        json.dump({**result, "rows": rows}, f, indent=1, allow_nan=False, default=str)
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    # the same rows in the one schema of routerlib.bench.results, in the folder PREFIX/
    rs = ResultSet("targets")
    rs.meta = json.loads(json.dumps({k: result[k] for k in ("targets", "roofs", "args")
                                     if k in result}, default=str),
                         parse_constant=lambda _: None)  # NaN/inf -> null
    for r in rows:
        if r.get("status") != "ok":
            continue
        conf = {k: r[k] for k in ("section", "case", "op", "mode", "T", "D", "E", "K", "dtype",
                                  "verified")}
        for metric, unit in (("median_us", "us"), ("wall_us", "us"), ("gbps", "GB/s"),
                             ("frac_copy", ""), ("ratio", "")):
            if r.get(metric) is not None:
                rs.add(r["impl"], conf, metric, r[metric], unit)
    paths.append(str(rs.write(prefix)))
    return paths


def _fmt(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def summary(result: dict) -> str:
    """The rows (short) then the targets table: the end of the output is what a remote run
    returns, so the targets come last."""
    lines = ["section  case         op        impl        mode                 median_us  "
             "wall_us   GB/s  frac  ver  error"]
    for r in result["rows"]:
        err = (r.get("error") or "")[:60]
        lines.append(f"{r['section']:<8} {r['case']:<12} {r['op'][:9]:<9} {r['impl']:<11} "
                     f"{r['mode']:<19} {_fmt(r.get('median_us')):>10} "
                     f"{_fmt(r.get('wall_us')):>8} {_fmt(r.get('gbps'), 0):>6} "
                     f"{_fmt(r.get('frac_copy'), 2):>5} {_fmt(r.get('verified')):>4}  {err}")
    roofs = result.get("roofs")
    if roofs:
        lines.append(f"roofs: copy {roofs['copy_gbps']:.0f} GB/s, matmul "
                     f"{roofs['matmul_tflops']:.1f} TFLOP/s ({roofs['dtype']}), launch "
                     f"{roofs['launch_us']:.1f} us, one-kernel CUDA graph "
                     f"{roofs.get('graph_us') or float('nan'):.1f} us; device "
                     f"{result['env']['device']}")
    lines.append(f"{'target':<47} goal       measured  verified  pass")
    for t in result["targets"]:
        unit = {"us": " us", "graph_us": " us", "frac_copy": ""}.get(t["metric"], "x")
        goal = f"{t['cmp']} {t['goal']:g}{unit}"
        meas = "-" if t["measured"] is None else f"{t['measured']:.3g}{unit}"
        lines.append(f"{t['target']:<47} {goal:<10} {meas:>10}  {_fmt(t['verified']):>8}  "
                     f"{'PASS' if t['pass'] else 'FAIL'}"
                     + (f"  ({t['why'][:70]})" if t["why"] and not t["pass"] else ""))
    return "\n".join(lines)


_SECTION_FNS = {"route": run_route, "dispatch": run_dispatch_combine, "decode": run_decode,
                "backward": run_backward}


def _sort_rows(rows: list[dict], sections: tuple[str, ...], cases_order: list[str]) -> None:
    """Back to reading order (the phases ran impls in another order)."""
    def key(r):
        return (sections.index(r["section"]),
                cases_order.index(r["case"]) if r["case"] in cases_order else 99,
                OPS.index(r["op"]) if r["op"] in OPS else 99,
                IMPLS.index(r["impl"]) if r["impl"] in IMPLS else 99,
                MODES.index(r["mode"]) if r["mode"] in MODES else 99)
    rows.sort(key=key)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    impls = resolve_backends(args.backends, device, args.quick)
    sections = SECTIONS if args.sections == "all" else tuple(
        s.strip() for s in args.sections.split(",") if s.strip())
    for s in sections:
        if s not in SECTIONS:
            raise ValueError(f"--sections: {s!r} is not one of {SECTIONS}")
    if args.quick:
        warmup, rep = (5.0, 20.0) if cuda else (1.0, 5.0)
    else:
        warmup, rep = (25.0, 100.0) if cuda else (10.0, 50.0)
    warmup = args.warmup if args.warmup is not None else warmup
    rep = args.rep if args.rep is not None else rep
    t0 = time.perf_counter()
    env = env_info()
    roofs = None
    try:
        roofs = measure_roofs(device, torch.bfloat16, quick=args.quick)
    except Exception as e:  # noqa: BLE001
        print(f"roofs not measured: {_error_text(e)}", file=sys.stderr)
    runner = Runner(device=device, quick=args.quick, impls=impls, warmup_ms=warmup, rep_ms=rep,
                    deadline=t0 + args.budget_s, roofs=roofs)
    cases = make_cases(args.quick)
    torch.manual_seed(args.seed)
    # phases: the targets' rows first, the costly compilations last
    phases = [p for p in (tuple(i for i in ("triton", "torch") if i in impls),
                          tuple(i for i in PEERS if i in impls),
                          ("compile",) if "compile" in impls else ()) if p]
    for phase in phases:
        runner.impls = phase
        for s in sections:
            print(f"[{time.perf_counter() - t0:6.1f} s] {s}: {', '.join(phase)}",
                  file=sys.stderr, flush=True)
            try:
                _SECTION_FNS[s](runner, cases, args.seed)
                runner.free()
            except Exception as e:  # noqa: BLE001 (a bug in a section: record, go on)
                runner.rows.append({"section": s, "case": "*", "op": "*", "impl": ",".join(phase),
                                    "mode": "*", "status": "error",
                                    "error": "section failed: " + _error_text(e)})
                runner.free()
    cases_order = ([c.key for c in cases.route] + [f"D={d}" for d in cases.rows_D]
                   + [f"T={cases.decode_T}"] + [f"host T={t}" for t in cases.decode_host_T]
                   + ["qwen3"])
    _sort_rows(runner.rows, sections, cases_order)
    return {"env": env, "roofs": roofs.as_dict() if roofs else None,
            "args": {**vars(args), "backends_resolved": list(impls), "device_resolved":
                     str(device), "warmup_ms": warmup, "rep_ms": rep,
                     "wall_s": time.perf_counter() - t0},
            "rows": runner.rows, "targets": evaluate_targets(runner.rows, cases, args.quick)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_results(result, args.out)
    print(summary(result))
    print(f"wrote {', '.join(paths)} in {result['args']['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
