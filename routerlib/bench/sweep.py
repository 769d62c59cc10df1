"""The benchmark sweep behind `python -m routerlib.bench`: configs x backends x T x inputs x stages.

Every row carries where it was measured (env_info), what was measured (config, shape, backend,
inputs, dtype, T, stage, mode) and what it means (median / p20 / p80 us, GB/s, TFLOP/s, fractions of
the roofs measured at the start of the run, the roofline floor). A stage that cannot run (Triton
kernel not importable, not implemented, out of memory, not capturable in a CUDA graph) gives a row
with its error text instead of stopping the sweep.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from routerlib.bench.configs import SHAPES, STANDARD, TOKEN_PRESETS, parse_shapes, parse_tokens
from routerlib.bench.convert import add_sweep_rows
from routerlib.bench.envinfo import env_info
from routerlib.bench.inputs import parse_inputs
from routerlib.bench.results import ResultSet
from routerlib.bench.results import wide as results_wide
from routerlib.bench.roofline import Roofs, achieved, measure_roofs
from routerlib.bench.stages import BACKEND_INDEPENDENT, BACKENDS, STAGE_NAMES, make_stage_fns
from routerlib.bench.timing import bench, bench_cuda_graph

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}

ROW_COLUMNS = [
    "config", "D", "E", "K", "F", "backend", "inputs", "dtype", "T", "stage", "mode",
    "median_us", "p20_us", "p80_us", "n", "tokens_per_s", "bytes", "flops", "gbps", "tflops",
    "frac_bw",
    "frac_flops", "frac_roof", "floor_us", "roof_copy_gbps", "roof_matmul_tflops",
    "imbalance", "drop_rate", "setup_s", "error",
]

DESCRIPTION = """\
Benchmark routerlib's MoE stages over model configurations, token counts, backends and inputs.

For every (config, backend, T, inputs) the stages below are built once on the same seeded inputs
and each is timed on its own (CUDA: triton.testing.do_bench medians with the L2 flushed; CPU: a
perf_counter loop). Times are set against roofs measured at the start of the run (device copy
bandwidth, matmul TFLOP/s, launch latency) through the bytes/FLOPs model of each stage
(routerlib.bench.roofline), giving GB/s, TFLOP/s, the fraction of the roof and the floor in us.

Stages: gate (x @ W_g), route (scores + top-K + plan), dispatch (gather into expert-major rows),
experts (SwiGLU grouped GEMM), combine (weighted K-way sum), layer (whole MoELayer forward),
backward (backward of route + dispatch + combine).
Backends: torch (the PyTorch reference), triton (the Triton kernels), compile (torch.compile of
the reference). gate and experts are the same code on every backend and are timed under torch
only when torch is in the list.

Output: <out>.json in the one row schema of routerlib.bench.results (variant = backend, config =
the case, one row per metric: time_us with p20/p80, gbps, tflops, frac_roof, floor_us, ...; env,
roofs and arguments in the header) and <out>.csv, one wide line per case: env fields (device,
versions, git commit, host, date) + config + D/E/K/F + backend + inputs + dtype + T + stage +
mode (eager | graph) + median_us, p20_us, p80_us, n + tokens_per_s + bytes, flops, gbps, tflops
+ frac_bw, frac_flops, frac_roof (of the measured roofs) + floor_us + imbalance, drop_rate of the
routed load + setup_s (build and first call: the compilation time under compile) + error (empty
if the stage ran). With --profile the profile rows go to the JSON (mode=profile) and to
<out>_profile.csv. A/B comparisons are variants of one run (--variant, --rounds), not separate
scripts. Unavailable stages and shapes that do not fit in memory give rows with an error instead
of stopping the sweep.
"""

EPILOG = f"""\
configs:  {', '.join(SHAPES)} ('all' = {', '.join(STANDARD)}).
tokens presets: {'; '.join(f'{k}={",".join(map(str, v))}' for k, v in TOKEN_PRESETS.items())}.

examples:
  python -m routerlib.bench --configs all --tokens decode,prefill --out results/h100
  python -m routerlib.bench --configs qwen3 --tokens 16384 --stages route,dispatch,combine \\
      --backends torch,triton --inputs uniform,zipf:1.2 --cuda-graph --profile
  python -m routerlib.bench --configs tiny --tokens cpu_small --out /tmp/tiny   # CPU smoke run
  python -m routerlib.bench --configs qwen3 --tokens 64,16384 --stages route --backends triton \\
      --cuda-graph --variant old:PYTHONPATH=build/old --variant new --rounds 3 --out ab/route
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m routerlib.bench", description=DESCRIPTION,
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None,
                   help="comma list of config names (or aliases mixtral, olmoe, qwen3, deepseek, "
                        "switch, tiny), or 'all' (default: all on CUDA, tiny on CPU)")
    p.add_argument("--tokens", default=None,
                   help="comma list of token counts T and/or presets decode, prefill, cpu_small, "
                        "all (default: decode,prefill on CUDA, cpu_small on CPU)")
    p.add_argument("--stages", default="all",
                   help=f"comma list of stages among {', '.join(STAGE_NAMES)}, or 'all' "
                        "(default: all)")
    p.add_argument("--backends", default="auto",
                   help="comma list among torch, triton, compile, or 'all' (default 'auto': all "
                        "three on CUDA, torch,triton on CPU where compilation is slow)")
    p.add_argument("--inputs", default="uniform",
                   help="comma list of router inputs: uniform, zipf[:s], hot[:n[:delta]], "
                        "recorded:PATH.pt (default: uniform)")
    p.add_argument("--dtype", default="auto",
                   help="activation dtype bf16, fp16 or fp32 (default 'auto': bf16 on CUDA, "
                        "fp32 on CPU)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    p.add_argument("--capacity-factor", default=None,
                   help="override every config's capacity factor (a float, or 'none' for "
                        "dropless)")
    p.add_argument("--warmup", type=float, default=25.0,
                   help="warm-up budget per stage in ms (default 25)")
    p.add_argument("--rep", type=float, default=100.0,
                   help="timing budget per stage in ms (default 100)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each stage captured in a CUDA graph (rows with mode=graph; "
                        "stages that sync with the host report the capture error)")
    p.add_argument("--profile", action="store_true",
                   help="also run the torch.profiler breakdown per stage (device time, kernel "
                        "count, peak memory) into <out>_profile.csv and the JSON")
    p.add_argument("--profile-iters", type=int, default=5, help="profiled calls per stage")
    p.add_argument("--roofs", choices=("measure", "quick", "none"), default="measure",
                   help="measure the roofs (default), measure them quickly (small sizes), or "
                        "skip them (fractions become empty)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument("--out", default="results/bench",
                   help="results file prefix: writes <out>.csv and <out>.json "
                        "(default: results/bench)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VAL,...]",
                   help="an A/B run: repeat for each variant; every variant runs the same sweep "
                        "in its own process with these environment variables (e.g. "
                        "old:PYTHONPATH=build/old), the order alternating between rounds; rows "
                        "are labelled backend[NAME]")
    p.add_argument("--rounds", type=int, default=1, help="rounds of an A/B run (default 1)")
    return p


@dataclass
class SweepPlan:
    """The parsed arguments."""

    shapes: list
    tokens: list[int]
    stages: tuple[str, ...]
    backends: tuple[str, ...]
    inputs: list[str]
    dtype: torch.dtype
    device: torch.device


def resolve(args: argparse.Namespace) -> SweepPlan:
    """Validate the arguments (errors name the option and the value)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    shapes = parse_shapes(args.configs or ("all" if cuda else "tiny"))
    if args.capacity_factor is not None:
        cf = None if args.capacity_factor.lower() == "none" else float(args.capacity_factor)
        shapes = [s.replace(capacity_factor=cf) for s in shapes]
    tokens = parse_tokens(args.tokens or ("decode,prefill" if cuda else "cpu_small"))
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if stages == ("all",):
        stages = STAGE_NAMES
    for s in stages:
        if s not in STAGE_NAMES:
            raise ValueError(f"--stages: {s!r} is not one of {STAGE_NAMES}")
    if args.backends == "auto":
        backends = BACKENDS if cuda else ("torch", "triton")
    elif args.backends == "all":
        backends = BACKENDS
    else:
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"--backends: {b!r} is not one of {BACKENDS}")
    inputs = [parse_inputs(i).label for i in args.inputs.split(",") if i.strip()]
    if args.dtype == "auto":
        dtype = torch.bfloat16 if cuda else torch.float32
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise ValueError(f"--dtype={args.dtype!r}: must be one of {sorted(DTYPES)} or auto")
    return SweepPlan(shapes, tokens, stages, backends, inputs, dtype, device)


def _clean(v):
    """JSON-safe scalar: NaN -> None, numpy scalars -> Python."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_sweep(args: argparse.Namespace, checkpoint: Callable[[dict], None] | None = None
              ) -> dict:
    """Run the sweep; returns {"env", "roofs", "args", "rows", "profile"} (rows: dicts).
    checkpoint(result) is called after every case with the rows so far (main writes the files
    then, so a sweep stopped by a time limit still leaves its results)."""
    from tqdm.auto import tqdm

    plan = resolve(args)
    dev, cuda = plan.device, plan.device.type == "cuda"
    env = env_info()
    roofs: Roofs | None = None
    if args.roofs != "none":
        roofs = measure_roofs(dev, plan.dtype, quick=args.roofs == "quick")
    dtype_name = str(plan.dtype).replace("torch.", "")
    rows: list[dict] = []
    graph_off: str | None = None  # set if a failed capture left CUDA in a broken state
    prof_rows: list[dict] = []
    result = {"env": env, "roofs": roofs.as_dict() if roofs else None, "args": dict(vars(args)),
              "rows": rows, "profile": prof_rows}
    # backend-major with torch.compile last: its compilations are by far the slowest part, so a
    # sweep cut short by a time limit still holds every eager backend's rows (checkpoints)
    backends = sorted(plan.backends, key=lambda b: b == "compile")
    combos = [(s, b, T, i) for b in backends for s in plan.shapes for T in plan.tokens
              for i in plan.inputs]
    bar = tqdm(combos, disable=args.no_progress, desc="bench", unit="case", file=sys.stderr)
    for shape, backend, T, inp in bar:
        bar.set_postfix_str(f"{shape.name} {backend} T={T} {inp}")
        stages = tuple(s for s in plan.stages if not (
            backend != "torch" and "torch" in plan.backends and s in BACKEND_INDEPENDENT))
        if not stages:
            continue
        base = {**env, "config": shape.name, "D": shape.D, "E": shape.E, "K": shape.K,
                "F": shape.F, "backend": backend, "inputs": inp, "dtype": dtype_name, "T": T,
                "roof_copy_gbps": roofs.copy_gbps if roofs else None,
                "roof_matmul_tflops": roofs.matmul_tflops if roofs else None}
        try:
            ss = make_stage_fns(shape, T, backend, plan.dtype, dev, inp, args.seed, stages)
        except Exception as e:  # noqa: BLE001 (OOM or a broken shape: record it, carry on)
            err = ("OOM: " if _is_oom(e) else "") + f"{type(e).__name__}: {e}"[:400]
            rows.extend({**base, "stage": s, "mode": "eager", "error": err} for s in stages)
            _free(dev)
            if checkpoint is not None:
                checkpoint(result)
            continue
        stats = {"imbalance": ss.stats.imbalance, "drop_rate": ss.stats.drop_rate}
        # all eager rows first: a failed capture then cannot spoil an eager measurement
        modes = ["eager"] + (["graph"] if args.cuda_graph and cuda else [])
        for mode in modes:
            for stage in ss.names():
                cost = ss.cost(stage)
                row = {**base, **stats, "stage": stage, "mode": mode, "bytes": cost.bytes,
                       "flops": cost.flops, "setup_s": ss.setup_s.get(stage),
                       "error": ss.errors.get(stage)}
                if stage in ss.fns and mode == "graph" and stage == "backward":
                    row["error"] = ("not captured: autograd runs the backward on the forward's "
                                    "stream, outside the capture")
                elif stage in ss.fns and mode == "graph" and graph_off:
                    row["error"] = graph_off
                elif stage in ss.fns:
                    try:
                        fn = ss.fns[stage]
                        t = (bench(fn, args.warmup, args.rep, dev) if mode == "eager" else
                             bench_cuda_graph(fn, args.warmup, args.rep))
                        a = achieved(cost, t.seconds, roofs)
                        row.update(median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us,
                                   n=t.n, tokens_per_s=T / t.seconds, gbps=a.gbps,
                                   tflops=a.tflops, frac_bw=a.frac_bw,
                                   frac_flops=a.frac_flops, frac_roof=a.frac_roof,
                                   floor_us=a.floor_us)
                    except Exception as e:  # noqa: BLE001
                        msg = f"{type(e).__name__}: {e}"[:400].replace("\n", " ")
                        row["error"] = ("OOM: " if _is_oom(e) else "") + msg
                        if "CUDA STATE BROKEN" in msg:
                            graph_off = f"graph mode off after an unrecoverable capture: {msg}"
                        _free(dev)
                rows.append(row)
        if args.profile and ss.fns:
            from routerlib.bench.profile import profile_stages

            try:
                df = profile_stages(shape, T, stage_set=ss, iters=args.profile_iters)
                df.insert(3, "inputs", inp)
                prof_rows.extend(df.to_dict("records"))
            except Exception as e:  # noqa: BLE001
                prof_rows.append({"config": shape.name, "T": T, "backend": backend,
                                  "inputs": inp, "error": f"{type(e).__name__}: {e}"[:400]})
        del ss
        _free(dev)
        if checkpoint is not None:
            checkpoint(result)
    bar.close()
    return result


def rows_frame(result: dict) -> pd.DataFrame:
    """The rows as a DataFrame with env columns first, then ROW_COLUMNS in order."""
    df = pd.DataFrame(result["rows"])
    env_cols = list(result["env"])
    for c in env_cols + ROW_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[env_cols + ROW_COLUMNS]


def to_result_set(result: dict, bench: str) -> ResultSet:
    """The sweep's rows in the one row schema (routerlib.bench.results): time_us with its
    spread, then gbps, tflops, frac_roof, floor_us, the load's imbalance and drop rate; profile
    rows as mode=profile; roofs and arguments in meta."""
    rs = ResultSet(bench, env=result["env"], meta={"roofs": result["roofs"],
                                                   "args": result["args"]})
    rows = [{k: _clean(v) for k, v in r.items()} for r in result["rows"]]
    profile = [{k: _clean(v) for k, v in r.items()} for r in result["profile"]]
    add_sweep_rows(rs, rows, profile)
    return rs


def write_results(result: dict, prefix: str) -> list[str]:
    """Write <prefix>.json (the one row schema), <prefix>.csv (one wide line per case, for
    reading) and, with --profile, <prefix>_profile.csv; returns the paths."""
    d = os.path.dirname(prefix)
    if d:
        os.makedirs(d, exist_ok=True)
    paths = [prefix + ".csv", prefix + ".json"]
    rows_frame(result).to_csv(paths[0], index=False)
    rs = to_result_set(result, os.path.basename(prefix))
    written = rs.write(d or ".", csv_too=False)
    if str(written) != paths[1]:
        os.replace(written, paths[1])
    if result["profile"]:
        paths.append(prefix + "_profile.csv")
        pd.DataFrame(result["profile"]).to_csv(paths[2], index=False)
    return paths


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'old:PYTHONPATH=build/old,ROUTERLIB_X=1' -> ('old', {...}); 'new' -> ('new', {})."""
    name, _, envs = spec.partition(":")
    if not name or not name.replace("-", "_").isidentifier():
        raise ValueError(f"--variant {spec!r}: the name must be a word, e.g. old:PYTHONPATH=dir")
    env = {}
    for kv in filter(None, envs.split(",")):
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise ValueError(f"--variant {spec!r}: {kv!r} is not KEY=VALUE")
        env[k] = v
    return name, env


def run_variants(argv: list[str], args: argparse.Namespace) -> int:
    """An A/B run: the same sweep once per variant and round, each in its own process with the
    variant's environment (e.g. PYTHONPATH of another tree), the order alternating between
    rounds; rows are labelled '<backend>[<variant>]' with config['round']."""
    import subprocess
    import tempfile

    variants = [parse_variant(v) for v in args.variant]
    child_argv = []
    skip = False
    for a in argv:  # the arguments without --variant / --rounds / --out
        if skip:
            skip = False
            continue
        if a in ("--variant", "--rounds", "--out"):
            skip = True
            continue
        if a.startswith(("--variant=", "--rounds=", "--out=")):
            continue
        child_argv.append(a)
    merged = ResultSet(os.path.basename(args.out), env=env_info(),
                       meta={"variants": {n: e for n, e in variants}, "rounds": args.rounds,
                             "argv": child_argv, "runs": []})
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for name, env in order:
                prefix = os.path.join(tmp, f"{name}_{rnd}")
                cmd = [sys.executable, "-m", "routerlib.bench", *child_argv, "--out", prefix]
                r = subprocess.run(cmd, env={**os.environ, **env})
                if r.returncode != 0:
                    print(f"variant {name} round {rnd}: exit {r.returncode}", file=sys.stderr)
                    return r.returncode
                child = ResultSet.read(prefix + ".json")
                merged.meta["runs"].append({"variant": name, "round": rnd, "env": child.env,
                                            "roofs": child.meta.get("roofs")})
                for row in child.rows:
                    row.variant = f"{row.variant}[{name}]"
                    row.config["round"] = rnd
                    merged.rows.append(row)
    d = os.path.dirname(args.out) or "."
    path = merged.write(d)
    df = results_wide(path)
    t = df[df["time_us"].notna() & (df["mode"] != "profile")]
    if len(t):
        table = t.pivot_table(index=["config", "T", "stage", "mode"], columns="variant",
                              values="time_us", aggfunc="median")
        with pd.option_context("display.width", 200, "display.max_rows", 500):
            print("median us per call over rounds\n", table.round(2).to_string())
    print(f"wrote {path} and its .csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        resolve(args)
        for v in args.variant:
            parse_variant(v)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.variant:
        return run_variants(argv, args)
    t0 = time.perf_counter()
    result = run_sweep(args, checkpoint=lambda r: write_results(r, args.out))
    paths = write_results(result, args.out)
    df = rows_frame(result)
    ok = df[df.error.isna()]
    if len(ok):
        table = ok.pivot_table(index=["config", "T", "stage"], columns=["backend", "mode"],
                               values="median_us", aggfunc="first")
        with pd.option_context("display.width", 200, "display.max_rows", 500):
            print("median us per call\n", table.round(1).to_string())
    bad = df[df.error.notna()]
    if len(bad):
        print(f"{len(bad)} rows unavailable, e.g. {bad.iloc[0].stage} on {bad.iloc[0].backend}: "
              f"{bad.iloc[0].error}")
    if result["roofs"]:
        r = result["roofs"]
        print(f"roofs: copy {r['copy_gbps']:.0f} GB/s, matmul {r['matmul_tflops']:.2f} TFLOP/s "
              f"({r['dtype']}), launch {r['launch_us']:.1f} us")
    print(f"wrote {', '.join(paths)} in {time.perf_counter() - t0:.1f} s")
    return 0
