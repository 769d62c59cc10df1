"""The target benchmark (routerlib.bench.targets): its CPU quick run writes well-formed results,
its verification catches a wrong output, and its failures become rows instead of crashes.
The full-size run is GPU work (`python -m routerlib.bench.targets --out ...`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from routerlib.bench import targets
from routerlib.bench.timing import Timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _run_cli(tmp_path, *extra: str) -> dict:
    """Run the CLI in a subprocess (as the lead runs it) and load the JSON it wrote."""
    prefix = str(tmp_path / "t")
    proc = subprocess.run([sys.executable, "-m", "routerlib.bench.targets", "--quick",
                           "--device", "cpu", "--out", prefix, *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target" in proc.stdout and "wrote" in proc.stdout, proc.stdout[-2000:]
    with open(prefix + ".json") as f:
        doc = json.load(f)
    with open(prefix + ".csv") as f:
        doc["_csv"] = list(csv.DictReader(f))
    doc["_stdout"] = proc.stdout
    return doc


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> dict:
    return _run_cli(tmp_path_factory.mktemp("targets"), "--backends", "torch")


def test_quick_run_structure(torch_run):
    doc = torch_run
    assert set(doc) >= {"env", "roofs", "args", "rows", "targets"}
    env = doc["env"]  # the machine's (it may hold a GPU); the run itself was on the CPU
    assert env["torch"] == torch.__version__ and env["device"]
    assert doc["args"]["device_resolved"] == "cpu"
    roofs = doc["roofs"]
    assert roofs["device"] == "cpu"
    assert roofs["copy_gbps"] > 0 and roofs["matmul_tflops"] > 0 and roofs["launch_us"] > 0
    assert doc["args"]["backends_resolved"] == ["torch"] and doc["args"]["quick"] is True
    rows = doc["rows"]
    assert {r["section"] for r in rows} == {"route", "dispatch", "decode", "backward"}
    assert all(set(r) == set(targets.ROW_COLUMNS) for r in rows)
    assert {r["impl"] for r in rows} == {"torch"}
    # the CSV holds the same rows with the same columns
    assert len(doc["_csv"]) == len(rows) and list(doc["_csv"][0]) == targets.ROW_COLUMNS


def test_quick_run_rows_carry_numbers(torch_run):
    rows = torch_run["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    # every eager / forward / backward measure ran on CPU: 3 routes, 2 x (dispatch, combine),
    # decode, the index_select yardstick, forward + backward
    assert len(ok) == 3 + 4 + 1 + 1 + 2, [(r["case"], r["op"], r["mode"], r["error"])
                                           for r in rows]
    for r in ok:
        assert r["error"] is None
        assert r["median_us"] > 0 and r["p20_us"] <= r["median_us"] <= r["p80_us"], r
        assert r["n"] >= 2 and r["wall_us"] > 0
        if r["op"] == "index_select":  # a host-time yardstick: no bytes counted
            continue
        assert r["bytes"] > 0 and r["gbps"] > 0
        # frac_copy is gbps over the copy roof of the same run
        assert math.isclose(r["frac_copy"], r["gbps"] / torch_run["roofs"]["copy_gbps"],
                            rel_tol=1e-9)
        assert math.isclose(r["gbps"], r["bytes"] / r["median_us"] / 1e3, rel_tol=1e-9)
    # dispatch / combine bytes are the minimal bytes (bf16, s=2)
    for r in ok:
        if r["section"] == "dispatch":
            T, D, K = r["T"], r["D"], r["K"]
            want = (T * D * 2 + T * K * D * 2 if r["op"] == "dispatch"
                    else T * K * D * 2 + T * K * 4 + T * D * 2)
            assert r["bytes"] == want, r
    bwd = next(r for r in ok if r["mode"] == "backward")
    fwd = next(r for r in ok if r["mode"] == "forward")
    assert math.isclose(bwd["ratio"], bwd["median_us"] / fwd["median_us"], rel_tol=1e-9)


def test_quick_run_graph_rows_skipped_on_cpu(torch_run):
    graph = [r for r in torch_run["rows"] if r["mode"] == "graph"]
    assert len(graph) == 3 + 1  # the torch route of each case, the decode path
    for r in graph:
        assert r["status"] == "skipped" and "CUDA" in r["error"] and r["median_us"] is None


def test_quick_run_targets(torch_run):
    tg = torch_run["targets"]
    assert len(tg) == 8 + 3 + 1  # the issue's, DeepSeek-V3 against E=256, decode host time
    for t in tg:
        assert set(t) >= {"target", "goal", "measured", "verified", "pass", "why"}
        # triton did not run: nothing is claimed
        assert t["measured"] is None and t["pass"] is False and "not measured" in t["why"]
    # the targets table is the last thing printed (a remote run shows only the tail)
    tail = torch_run["_stdout"].strip().splitlines()[-len(tg) - 1:]
    assert sum("FAIL" in line for line in tail) == len(tg)


def test_budget_skips_and_sections(tmp_path):
    doc = _run_cli(tmp_path, "--backends", "torch", "--sections", "dispatch", "--budget-s", "0")
    rows = doc["rows"]
    assert rows and {r["section"] for r in rows} == {"dispatch"}
    assert all(r["status"] == "skipped" and "budget" in r["error"] for r in rows)


def test_backends_resolution():
    cpu = torch.device("cpu")
    assert targets.resolve_backends("torch,peers", cpu, True) == ("torch", "torchtitan",
                                                                   "deepspeed")
    assert targets.resolve_backends("all", cpu, False) == targets.IMPLS
    assert targets.resolve_backends("auto", torch.device("cuda"), False) == targets.IMPLS
    assert "triton" not in targets.resolve_backends("auto", cpu, False)
    with pytest.raises(ValueError, match="'nope'"):
        targets.resolve_backends("torch,nope", cpu, True)


# ---------------------------------------------------------------- verification and errors


def test_compare_rules():
    a = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    targets.compare(a, a.clone(), "ids", None)
    with pytest.raises(AssertionError, match=r"ids: 1 entries differ, first at \(1, 0\)"):
        targets.compare(a, torch.tensor([[1, 2], [5, 4]], dtype=torch.int32), "ids", None)
    x = torch.tensor([1.0, 2.0])
    targets.compare(x + 1e-6, x, "w", 1e-5)
    with pytest.raises(AssertionError, match="w: max rel err"):
        targets.compare(x + 1e-3, x, "w", 1e-5)
    with pytest.raises(AssertionError, match="NaN"):
        targets.compare(torch.tensor([float("nan"), 2.0]), x, "w", 1e-2)
    with pytest.raises(AssertionError, match="shape"):
        targets.compare(x[:1], x, "w", 1e-2)


def _runner(**kw) -> targets.Runner:
    import time

    args = dict(device=torch.device("cpu"), quick=True, impls=("torch",), warmup_ms=0.1,
                rep_ms=1.0, deadline=time.perf_counter() + 60)
    args.update(kw)
    return targets.Runner(**args)


def test_measure_verifies_and_records_errors():
    r = _runner()
    x = torch.randn(4, 3)
    check = targets.expect((torch.tensor([1, 2], dtype=torch.int32), x), ["ids", "y"],
                           [None, 1e-5])
    good = r.measure("s", "c", "op", "torch", "eager", shape={"T": 4}, nbytes=96,
                     build=lambda: (lambda: (torch.tensor([1, 2], dtype=torch.int32),
                                             x.clone())), check=check)
    assert good["status"] == "ok" and good["verified"] is True and good["median_us"] > 0
    bad = r.measure("s", "c", "op", "torch", "eager", shape={"T": 4},
                    build=lambda: (lambda: (torch.tensor([1, 3], dtype=torch.int32), x)),
                    check=check)
    # a wrong output is still timed, but flagged
    assert bad["status"] == "ok" and bad["verified"] is False
    assert "ids: 1 entries differ" in bad["verify_error"]

    def broken():
        raise ImportError("no module named kernels_in_progress")

    err = r.measure("s", "c", "op", "torch", "eager", shape={"T": 4}, build=broken)
    assert err["status"] == "error" and "ImportError: no module named kernels_in_progress" \
        in err["error"] and err.get("median_us") is None

    def raises_when_called():
        raise RuntimeError("kernel failed\nsecond line")

    err2 = r.measure("s", "c", "op", "torch", "eager", shape={"T": 4},
                     build=lambda: raises_when_called, check=check)
    assert err2["status"] == "error" and err2["error"] == "RuntimeError: kernel failed"
    assert r.rows == [good, bad, err, err2]


def test_targets_evaluation():
    cases = targets.make_cases(quick=False)
    tgs = targets.targets_for(cases)
    rows = [
        {"section": "route", "case": "qwen3", "op": "route", "impl": "triton", "mode": "graph",
         "status": "ok", "median_us": 9.0, "verified": True},
        # eager judged on the larger of do_bench's median and the back-to-back wall time
        {"section": "route", "case": "qwen3", "op": "route", "impl": "triton", "mode": "eager",
         "status": "ok", "median_us": 30.0, "wall_us": 45.0, "verified": True},
        {"section": "dispatch", "case": "D=2048", "op": "dispatch", "impl": "triton",
         "mode": "eager", "status": "ok", "median_us": 1.0, "frac_copy": 0.9,
         "verified": False, "verify_error": "rows: 3 entries differ"},
        {"section": "dispatch", "case": "D=4096", "op": "combine", "impl": "triton",
         "mode": "eager", "status": "ok", "median_us": 1.0, "frac_copy": 0.9, "verified": True},
        {"section": "backward", "case": "qwen3", "op": "route+dispatch+combine",
         "impl": "triton", "mode": "backward", "status": "error", "error": "boom"},
    ]
    out = {t["target"]: t for t in targets.evaluate_targets(rows, cases, quick=False)}
    assert len(out) == len(tgs) + len(targets.ratio_targets_for(cases)) == 8 + 3 + 3
    g = out["route graph qwen3"]
    assert g["measured"] == 9.0 and g["pass"] is True
    e = out["route eager qwen3"]
    assert e["measured"] == 45.0 and e["pass"] is False and "misses" in e["why"]
    d = out["dispatch D=2048 frac of copy BW"]
    assert d["measured"] == 0.9 and d["pass"] is False and "differs" in d["why"]
    assert out["combine D=4096 frac of copy BW"]["pass"] is True
    b = out["backward/forward ratio qwen3 T=16384"]
    assert b["measured"] is None and b["pass"] is False and b["why"] == "boom"
    assert out["decode path graph T=64 D=4096"]["why"].startswith("not measured")


def test_ratio_targets_evaluation():
    """DeepSeek-V3 routing against the ungrouped E=256 route, and the eager decode path's host
    time against one index_select: ratios of rows of the same run."""
    cases = targets.make_cases(quick=False)

    def row(section, case, op, impl, mode, **kw):
        return {"section": section, "case": case, "op": op, "impl": impl, "mode": mode,
                "status": "ok", "verified": True, **kw}

    rows = [row("route", "deepseek-v3", "route", "triton", "graph", median_us=30.0),
            row("route", "e256", "route", "triton", "graph", median_us=25.0),
            row("route", "deepseek-v3-T64", "route", "triton", "eager", median_us=20.0,
                wall_us=60.0),
            row("route", "e256-T64", "route", "triton", "eager", median_us=20.0, wall_us=40.0),
            row("decode", "host T=1", "path_no_expert", "triton", "eager", median_us=9.0,
                wall_us=100.0),
            row("decode", "host T=1", "index_select", "torch", "eager", median_us=3.0,
                wall_us=30.0)]
    out = {t["target"]: t for t in targets.evaluate_ratio_targets(rows, cases, quick=False)}
    g = out["deepseek-v3 / e256 route graph T=16384"]
    assert g["measured"] == pytest.approx(1.2) and g["pass"] is True
    e = out["deepseek-v3 / e256 route eager T=64"]
    assert e["measured"] == pytest.approx(1.5) and e["pass"] is False and "misses" in e["why"]
    assert out["deepseek-v3 / e256 route graph T=64"]["why"].startswith("not measured")
    h = out["decode path eager host T=1 / index_select"]
    assert h["measured"] == pytest.approx(100 / 30) and h["pass"] is True


def test_make_cases_shapes():
    full = targets.make_cases(quick=False)
    q, k4, ds, flat, ds64, flat64 = full.route
    assert (q.T, q.E, q.K, q.cfg.score_func, q.cfg.renormalize, q.cfg.dropless) == \
        (16384, 128, 8, "softmax", True, True)
    assert (k4.T, k4.E, k4.K) == (8192, 128, 4)
    assert (ds.T, ds.E, ds.K, ds.cfg.score_func, ds.cfg.n_groups, ds.cfg.expert_bias) == \
        (16384, 256, 8, "sigmoid", 8, True)
    assert flat.cfg == dataclasses.replace(ds.cfg, n_groups=1, topk_groups=1) and flat.T == 16384
    assert (ds64.T, ds64.cfg, flat64.T, flat64.cfg) == (64, ds.cfg, 64, flat.cfg)
    assert full.decode_host_T == (1, 16, 64)
    assert (full.rows_T, full.rows_D, full.rows_cfg.num_experts, full.rows_cfg.top_k) == \
        (16384, (2048, 4096), 128, 8)
    assert (full.decode_T, full.decode_D, full.decode_cfg.num_experts,
            full.decode_cfg.top_k) == (64, 4096, 64, 8)
    assert (full.bwd_T, full.bwd_D) == (16384, 2048)
    # benchmarks never time the finite check unless asked to
    assert not any(c.cfg.check_finite for c in full.route)


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need TRITON_INTERPRET=1")
def test_quick_run_triton_interpreter_verified(tmp_path):
    """Under the interpreter, every triton row that ran matches the reference."""
    doc = _run_cli(tmp_path, "--backends", "triton,torch", "--sections", "route,decode")
    tri = [r for r in doc["rows"] if r["impl"] == "triton" and r["status"] == "ok"]
    # 3 routes x (eager, eager_check_finite; graph skipped on the CPU), the decode path and
    # its host-time row
    assert len(tri) == 3 * 2 + 1 + 1, [(r["case"], r["mode"], r["error"]) for r in doc["rows"]
                                   if r["impl"] == "triton"]
    assert all(r["verified"] is True for r in tri), [r["verify_error"] for r in tri]


@pytest.mark.gpu
def test_gpu_quick_run(tmp_path):
    """On a GPU: the quick run captures the triton paths in graphs and verifies them."""
    prefix = str(tmp_path / "g")
    proc = subprocess.run([sys.executable, "-m", "routerlib.bench.targets", "--quick",
                           "--backends", "triton,torch", "--out", prefix],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(prefix + ".json") as f:
        rows = json.load(f)["rows"]
    graph = [r for r in rows if r["impl"] == "triton" and r["mode"] == "graph"]
    assert graph and all(r["status"] == "ok" and r["verified"] is True for r in graph), graph
    torch_graph = [r for r in rows if r["impl"] == "torch" and r["mode"] == "graph"]
    assert all(r["status"] == "error" and "host sync" in r["error"] for r in torch_graph)


def test_timing_is_a_real_timing():
    # guard against a refactor that stops routing through routerlib.bench.timing
    r = _runner()
    t = r._bench(lambda: torch.ones(8).sum())
    assert isinstance(t, Timing) and t.median_us > 0 and t.n >= 2
