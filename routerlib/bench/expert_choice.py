"""Expert-choice routing: the Triton kernels against the PyTorch reference (and torch.compile of
it where it compiles within a time limit).

    python -m routerlib.bench.expert_choice --out results/h200      # GPU: the full grid
    python -m routerlib.bench.expert_choice --tokens 256 --experts 8 --cf 1 --out /tmp/ec  # CPU

Cases: T in {16384, 65536} x E in {64, 128, 256} x capacity_factor in {1.0, 2.0}, K = 1 (so
C = capacity_factor * T / E: EC-CF1 / EC-CF2 of Zhou et al. 2022), fp32 logits. Rows (one
schema, routerlib.bench.results): metric "time_us" (median) per variant and pass:
    triton        kernels.route (eager), pass "fwd"; and pass "fwd+bwd" (scores' gradient)
    triton_graph  the same forward replayed in a CUDA graph (device time + one graph launch)
    torch         reference.select + reference.build_plan, "fwd" and "fwd+bwd"
    compile       torch.compile of the reference forward (and metric "compile_s"), at the cases
                  of --compile-cases, after the others, while a compile takes under
                  --compile-limit seconds
The minimum bytes of the forward (read T*E*4 of logits, write scores, expert_rank and
slot_to_row: 3*T*E*4) are in each row's config ("min_mb").
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from routerlib import reference as ref
from routerlib.bench.inputs import make_logits
from routerlib.bench.results import ResultSet, card_dir
from routerlib.bench.timing import bench, bench_cuda_graph
from routerlib.config import RouterConfig


def _cfg(E: int, cf: float) -> RouterConfig:
    return RouterConfig(num_experts=E, top_k=1, routing="expert_choice", capacity_factor=cf,
                        check_finite=False)


def _fwd_bwd(route: Callable, logits: torch.Tensor, grad: torch.Tensor) -> Callable[[], object]:
    """One forward + backward of the scores (the combine weights' path into the logits)."""
    x = logits.clone().requires_grad_(True)

    def run():
        sel, _ = route(x)
        torch.autograd.backward(sel.topk_weights, grad)
        x.grad = None

    return run


def _parse_list(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v]


def _case(T: int, E: int, cf: float, device: str):
    """(cfg, logits, scores' upstream gradient, the rows' config) of one case."""
    cfg = _cfg(E, cf)
    logits = make_logits("uniform", T, E, device=device, seed=T + E)
    grad = torch.randn(T, E, device=device)
    case = dict(T=T, E=E, K=1, C=cfg.capacity(T), capacity_factor=cf, dtype="fp32",
                min_mb=round(4 * T * E * 4 / 1e6, 3))
    return cfg, logits, grad, case


def _reference(cfg: RouterConfig) -> Callable:
    def torch_ref(x):
        sel = ref.select(x, cfg)
        return sel, ref.build_plan(sel, cfg)

    return torch_ref


def _bench_case(rs: ResultSet, T: int, E: int, cf: float, device: str, rep_ms: float,
                log) -> None:
    """Time one case's triton, triton_graph and torch variants into rs."""
    from routerlib.kernels import route as triton_route

    cfg, logits, grad, case = _case(T, E, cf, device)
    name = f"T={T} E={E} cf={cf}"

    def tri(x):
        return triton_route(x, cfg)

    torch_ref = _reference(cfg)
    fns = {("triton", "fwd"): lambda: tri(logits),
           ("triton", "fwd+bwd"): _fwd_bwd(tri, logits, grad),
           ("torch", "fwd"): lambda: torch_ref(logits),
           ("torch", "fwd+bwd"): _fwd_bwd(torch_ref, logits, grad)}
    for (variant, pas), fn in fns.items():
        t = bench(fn, warmup_ms=10, rep_ms=rep_ms, device=device)
        rs.add(variant, {**case, "pass": pas}, "time_us", t.median_us, "us")
        log(f"{name} {variant} {pas}: {t.median_us:.1f} us")
    if torch.device(device).type == "cuda":
        try:
            t = bench_cuda_graph(lambda: tri(logits), warmup_ms=10, rep_ms=rep_ms)
            rs.add("triton_graph", {**case, "pass": "fwd"}, "time_us", t.median_us, "us")
            log(f"{name} triton_graph fwd: {t.median_us:.1f} us")
        except RuntimeError as e:
            log(f"{name} triton_graph: {e}")


def _bench_compile(rs: ResultSet, T: int, E: int, cf: float, device: str,
                   compile_limit_s: float, rep_ms: float, log) -> bool:
    """torch.compile of the reference forward: its compile time, and its time if it compiled
    within the limit. Returns whether compiling may go on."""
    cfg, logits, _, case = _case(T, E, cf, device)
    name = f"T={T} E={E} cf={cf}"
    torch._dynamo.reset()
    compiled = torch.compile(_reference(cfg))
    t0 = time.perf_counter()
    try:
        compiled(logits)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 (a compile failure is a result)
        log(f"{name} compile failed: {type(e).__name__}: {e}")
        return False
    compile_s = time.perf_counter() - t0
    rs.add("compile", {**case, "pass": "fwd"}, "compile_s", compile_s, "s")
    if compile_s > compile_limit_s:
        log(f"{name} compile took {compile_s:.0f} s > {compile_limit_s:.0f} s: not timed")
        return False
    t = bench(lambda: compiled(logits), warmup_ms=10, rep_ms=rep_ms, device=device)
    rs.add("compile", {**case, "pass": "fwd"}, "time_us", t.median_us, "us")
    log(f"{name} compile fwd: {t.median_us:.1f} us (compiled in {compile_s:.1f} s)")
    return True


def run(tokens: list[int], experts: list[int], cfs: list[float], device: str,
        compile_cases: list[tuple[int, int, float]], compile_limit_s: float, rep_ms: float,
        out: str | None = None, log=print) -> ResultSet:
    """Every case's triton and torch variants, then torch.compile at compile_cases (T, E, cf)
    while compiles stay under the limit. With out, the results file is rewritten after each
    case (a run cut short by a timeout keeps what it measured)."""
    rs = ResultSet("expert_choice")
    for T in tokens:
        for E in experts:
            for cf in cfs:
                _bench_case(rs, T, E, cf, device, rep_ms, log)
                if out is not None:
                    rs.write(out)
    for T, E, cf in compile_cases:
        ok = _bench_compile(rs, T, E, cf, device, compile_limit_s, rep_ms, log)
        if out is not None:
            rs.write(out)
        if not ok:
            break
    return rs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="16384,65536")
    p.add_argument("--experts", default="64,128,256")
    p.add_argument("--cf", default="1.0,2.0", help="capacity factors")
    p.add_argument("--compile-cases", default="16384x128x1.0",
                   help="TxExcf cases that also time torch.compile of the reference, after the "
                   "others ('' for none)")
    p.add_argument("--compile-limit", type=float, default=60.0,
                   help="seconds: a slower compile stops the compile variant")
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder of expert_choice.json/.csv "
                   "(default results/<card>/ on a GPU, build/bench on a CPU)")
    a = p.parse_args(argv)
    compile_cases = []
    for c in a.compile_cases.split(","):
        if c:
            T, E, cf = c.split("x")
            compile_cases.append((int(T), int(E), float(cf)))
    out = a.out
    if out is None:
        out = (f"results/{card_dir(torch.cuda.get_device_name())}"
               if torch.device(a.device).type == "cuda" else "build/bench")
    rs = run(_parse_list(a.tokens, int), _parse_list(a.experts, int), _parse_list(a.cf, float),
             a.device, compile_cases, a.compile_limit, a.rep_ms, out)
    print(f"wrote {rs.write(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
