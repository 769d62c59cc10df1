"""Benchmark tooling: configs, inputs, timing, roofline model, stage closures, profiler, env info,
the CLI sweep and the benchmark plots. CPU sizes; the CUDA paths are in the gpu-marked tests."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch
from helpers import assert_close, assert_equal_int
from matplotlib.figure import Figure

from routerlib import ops
from routerlib.bench import checks, configs, convert, inputs, results, roofline, sweep, timing
from routerlib.bench.configs import TINY, get_shape
from routerlib.bench.envinfo import env_info
from routerlib.bench.profile import bottleneck, profile_stages
from routerlib.bench.stages import STAGE_NAMES, make_stage_fns
from routerlib.metrics import RoutingStats

# ---------------------------------------------------------------- configs


def test_standard_shapes():
    s = get_shape("deepseek")
    assert (s.D, s.E, s.K, s.F) == (7168, 256, 8, 2048)
    r = s.router_config()
    assert (r.score_func, r.n_groups, r.topk_groups, r.group_score) == ("sigmoid", 8, 4,
                                                                         "top2_sum")
    assert r.expert_bias and r.renormalize and r.routed_scaling_factor == 2.5
    assert not r.check_finite  # a host sync: benchmarks must not time it
    assert (get_shape("mixtral").D, get_shape("mixtral").router_config().softmax_after_topk) \
        == (4096, True)
    assert get_shape("olmoe").router_config().renormalize is False
    assert get_shape("qwen3").router_config().renormalize is True
    sw = get_shape("switch")
    assert (sw.K, sw.router_config().capacity(1024)) == (1, math.ceil(1.25 * 1024 / 128))
    assert [x.name for x in configs.parse_shapes("all")] == list(configs.STANDARD)
    assert "tiny" not in configs.STANDARD and (TINY.D, TINY.E, TINY.K, TINY.F) == (64, 8, 2, 128)
    m = get_shape("qwen3").moe_config("triton")
    assert (m.backend, m.hidden_size, m.ffn_size, m.router.num_experts) == ("triton", 2048, 768,
                                                                           128)
    with pytest.raises(ValueError, match="config='nope'"):
        get_shape("nope")
    with pytest.raises(ValueError, match="top_k"):
        TINY.replace(top_k=9)


def test_token_presets():
    assert configs.parse_tokens("decode") == [1, 8, 64, 256]
    assert configs.parse_tokens("prefill") == [4096, 16384, 65536]
    assert configs.parse_tokens("cpu_small,7") == list(configs.TOKEN_PRESETS["cpu_small"]) + [7]
    with pytest.raises(ValueError, match="'x'"):
        configs.parse_tokens("16,x")
    with pytest.raises(ValueError, match=">= 1"):
        configs.parse_tokens("0")


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("spec", ["uniform", "zipf", "zipf:0.7", "hot:3:2.0"])
def test_logits_seeded_nonzero(spec):
    a = inputs.make_logits(spec, 257, 16, torch.float32, "cpu", seed=5)
    b = inputs.make_logits(spec, 257, 16, torch.float32, "cpu", seed=5)
    c = inputs.make_logits(spec, 257, 16, torch.float32, "cpu", seed=6)
    assert a.shape == (257, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != 0).all() and torch.isfinite(a).all()
    bf = inputs.make_logits(spec, 8, 16, torch.bfloat16, "cpu", seed=5)
    assert bf.dtype == torch.bfloat16


def test_tokens_seeded_nonzero():
    x = inputs.make_tokens(33, 24, torch.bfloat16, "cpu", seed=1)
    assert x.shape == (33, 24) and x.dtype == torch.bfloat16
    assert torch.equal(x, inputs.make_tokens(33, 24, torch.bfloat16, "cpu", seed=1))
    assert (x != 0).all()
    assert 0.8 < x.float().std() < 1.2


def _top1_stats(spec: str, E: int = 16, T: int = 4096) -> RoutingStats:
    ids = inputs.make_logits(spec, T, E, seed=0).argmax(dim=1, keepdim=True).int()
    return RoutingStats.from_topk(ids, E)


def test_zipf_and_hot_are_skewed():
    uni, zipf, hot = _top1_stats("uniform"), _top1_stats("zipf:1.2"), _top1_stats("hot:2:3")
    assert uni.imbalance < 1.3  # 4096 tokens over 16 experts: near uniform
    assert zipf.imbalance > 3.0 and zipf.entropy < uni.entropy - 0.1
    # the load follows the Zipf ranks: the expert with the largest bias gets the most tokens
    bias = inputs.expert_bias("zipf:1.2", 16)
    assert int(bias.argmax()) == int(zipf.load.argmax())
    assert sorted(bias.tolist(), reverse=True)[:3] == pytest.approx(
        [0.0, -1.2 * math.log(2), -1.2 * math.log(3)])
    hot_ids = torch.nonzero(inputs.expert_bias("hot:2:3", 16)).flatten()
    assert hot.load[hot_ids].sum() > 0.6 * hot.num_slots  # 2 of 16 experts take most tokens
    assert (inputs.expert_bias("zipf:0", 16) == 0).all()


def test_recorded_inputs(tmp_path):
    ids = torch.tensor([[3, 1], [0, 2], [2, 3]])  # [T'=3, K=2]
    p = tmp_path / "ids.pt"
    torch.save({"topk_ids": ids}, p)
    logits = inputs.make_logits(f"recorded:{p}", 7, 4, seed=0)  # rows cycled to T=7
    assert logits.shape == (7, 4) and (logits != 0).all()
    top = torch.topk(logits, 2).indices
    assert torch.equal(top, ids[torch.arange(7) % 3])  # chosen experts lead, in order
    q = tmp_path / "logits.pt"
    raw = torch.randn(5, 4)
    torch.save(raw, q)
    assert torch.equal(inputs.make_logits(f"recorded:{q}", 5, 4), raw)
    with pytest.raises(ValueError, match="E=6"):
        inputs.make_logits(f"recorded:{q}", 5, 6)


def test_parse_inputs_errors():
    assert inputs.parse_inputs("hot:4").n_hot == 4
    assert inputs.parse_inputs("zipf:1.5").label == "zipf:1.5"
    for bad in ("gauss", "zipf:x", "recorded:", "zipf:-1"):
        with pytest.raises(ValueError):
            inputs.parse_inputs(bad)


# ---------------------------------------------------------------- timing, roofline


def test_bench_cpu_measures_time():
    t = timing.bench(lambda: time.sleep(0.002), warmup_ms=1, rep_ms=10, device="cpu")
    assert t.n >= 3
    assert 2000 <= t.median_us < 200_000
    assert t.p20_us <= t.median_us <= t.p80_us
    calls = []
    timing.bench(lambda: calls.append(1), warmup_ms=0, rep_ms=1, device="cpu", max_rep=5)
    assert 1 + 5 <= len(calls) <= 1 + 5 + 1000  # warm-up call(s) + capped timed calls
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            timing.bench_cuda_graph(lambda: None)


def test_stage_cost_matches_design_example():
    # DESIGN.md: T=16384, d=4096, E=64, k=8, bf16
    c = lambda st: roofline.stage_cost(st, 16384, 4096, 64, 8, 1408, 2)
    assert c("dispatch").bytes == 16384 * 4096 * 2 * (1 + 8)
    assert c("dispatch").bytes / 1e9 == pytest.approx(1.2, abs=0.02)  # "1.2 GB"
    assert c("combine").bytes / 1e9 == pytest.approx(1.2, abs=0.02)
    assert c("gate").bytes / 1e6 == pytest.approx(139, abs=1)  # "134 MB" of x + W_g + logits
    assert c("route").bytes / 1e6 == pytest.approx(5.8, abs=0.05)  # "~5.8 MB"
    assert c("experts").flops == 2 * 16384 * 8 * 4096 * 1408 * 3
    assert c("gate").flops == 2 * 16384 * 4096 * 64
    roofs = roofline.Roofs(copy_gbps=3000.0, matmul_tflops=790.0, launch_us=3.0, device="x",
                           dtype="bfloat16")
    a = roofline.achieved(c("dispatch"), 800e-6, roofs)
    assert a.floor_us == pytest.approx(402.7, abs=0.5)  # "~400 us at 3 TB/s"
    assert a.frac_roof == pytest.approx(402.7 / 800, abs=1e-3)
    assert a.gbps == pytest.approx(c("dispatch").bytes / 800e-6 / 1e9)
    assert a.frac_bw == pytest.approx(a.gbps / 3000)
    # experts at large T are compute bound: the floor is the FLOP time
    e = roofline.achieved(c("experts"), 1e-3, roofs)
    assert e.floor_us == pytest.approx(c("experts").flops / 790e12 * 1e6)
    assert math.isnan(roofline.achieved(c("route"), 1e-5, None).frac_roof)
    with pytest.raises(ValueError, match="stage="):
        roofline.stage_cost("sort", 1, 1, 1, 1, 1)


def test_measure_roofs_cpu():
    r = roofline.measure_roofs("cpu", quick=True)
    assert r.copy_gbps > 0.01 and r.matmul_tflops > 1e-5 and 0 < r.launch_us < 10_000
    assert r.dtype == "float32"


# ---------------------------------------------------------------- stages


@pytest.mark.parametrize("shape,spec", [
    (TINY, "uniform"),  # dropless, softmax + renormalise
    (TINY.replace(capacity_factor=1.0, drop_policy="random"), "zipf:1.5"),  # drops, random keys
    (TINY.replace(score_func="sigmoid", n_groups=4, topk_groups=2, group_score="top2_sum",
                  expert_bias=True, routed_scaling_factor=2.5), "hot"),  # DeepSeek-style rules
])
def test_every_stage_runs_on_cpu(shape, spec):
    T = 24
    ss = make_stage_fns(shape, T, "torch", torch.float32, "cpu", spec, seed=3)
    assert ss.errors == {} and set(ss.fns) == set(STAGE_NAMES)
    assert ss.names() == list(STAGE_NAMES)
    x, logits, plan = ss.tensors["x"], ss.tensors["logits"], ss.tensors["plan"]
    assert ss.fns["gate"]().shape == (T, shape.E)
    sel, p = ss.fns["route"]()
    ref_sel, ref_plan = ops.route(logits, shape.router_config(),
                                  torch.zeros(shape.E) if shape.expert_bias else None,
                                  torch.rand(T, shape.K) if shape.drop_policy == "random"
                                  else None)
    if shape.drop_policy != "random":  # random keys differ from this test's
        assert_equal_int(p.slot_to_row, ref_plan.slot_to_row, "slot_to_row")
    rows = ss.fns["dispatch"]()
    assert rows.shape == (plan.num_rows, shape.D)
    assert_close(rows, ops.dispatch(x, plan), name="rows")
    assert ss.fns["experts"]().shape == rows.shape
    y = ss.fns["combine"]()
    assert_close(y, ops.combine(rows, plan, ss.tensors["selection"].topk_weights), name="y")
    y_layer, out = ss.fns["layer"]()
    assert y_layer.shape == (T, shape.D) and torch.isfinite(y_layer).all()
    g_logits, g_x = ss.fns["backward"]()
    assert g_logits.shape == logits.shape and g_x.shape == x.shape
    assert g_x.abs().sum() > 0 and g_logits.abs().sum() > 0
    assert ss.stats.num_slots == T * shape.K
    assert ss.cost("dispatch").bytes == T * shape.D * 4 * (1 + shape.K)


def test_skewed_inputs_reach_the_layer():
    ss = make_stage_fns(TINY, 512, "torch", torch.float32, "cpu", "hot:1:6", stages=("layer",))
    _, out = ss.fns["layer"]()
    layer_stats = RoutingStats.from_plan(out)
    assert layer_stats.imbalance > 2.5  # one hot expert in 8 takes most of the traffic
    assert ss.stats.imbalance > 2.5


def test_stage_subset_and_unavailable_backends():
    ss = make_stage_fns(TINY, 8, "torch", torch.float32, "cpu", stages=("route", "combine"))
    assert set(ss.fns) == {"route", "combine"} and "layer" not in ss.tensors
    off = make_stage_fns(TINY, 8, "compile", torch.float32, "cpu", allow_compile=False,
                         stages=("route",))
    assert off.fns == {} and "disabled" in off.errors["route"]
    # triton: each stage either runs or reports why not; building never raises
    tr = make_stage_fns(TINY, 8, "triton", torch.float32, "cpu",
                        stages=("route", "dispatch", "combine"))
    assert set(tr.fns) | set(tr.errors) == {"route", "dispatch", "combine"}
    assert not set(tr.fns) & set(tr.errors)
    assert all(isinstance(e, str) and e for e in tr.errors.values())
    with pytest.raises(ValueError, match="backend='jax'"):
        make_stage_fns(TINY, 8, "jax")
    with pytest.raises(ValueError, match="stage='sort'"):
        make_stage_fns(TINY, 8, stages=("sort",))


@pytest.mark.slow
def test_compile_backend_cpu():
    ss = make_stage_fns(TINY, 16, "compile", torch.float32, "cpu",
                        stages=("dispatch", "combine"))
    assert ss.errors == {}
    assert_close(ss.fns["dispatch"](), ops.dispatch(ss.tensors["x"], ss.tensors["plan"]))


# ---------------------------------------------------------------- profile, env


def test_profile_stages_cpu():
    df = profile_stages(TINY, 16, "torch", torch.float32, "cpu", iters=2,
                        stages=("gate", "route", "dispatch", "combine"))
    assert df.stage.tolist() == ["gate", "route", "dispatch", "combine"]
    assert (df.time_us > 0).all() and (df.n_kernels >= 1).all()
    assert df.share.sum() == pytest.approx(1.0)
    assert df.peak_mem_mb.isna().all()  # CPU: no allocator statistics
    assert df.error.isna().all()
    assert bottleneck(df) == df.loc[df.time_us.idxmax(), "stage"]
    fake = pd.DataFrame({"stage": ["route", "combine", "layer"], "time_us": [5.0, 9.0, 30.0]})
    assert bottleneck(fake) == "combine"  # the whole layer is not a stage of itself
    assert bottleneck(fake.assign(time_us=math.nan)) is None


def test_env_info():
    e = env_info()
    for k in ("device", "device_count", "torch", "triton", "python", "cuda", "git_commit",
              "git_dirty", "hostname", "date"):
        assert k in e
    assert e["torch"] == torch.__version__
    assert e["date"].endswith("+00:00")
    if e["git_commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", e["git_commit"]) and isinstance(e["git_dirty"], bool)


# ---------------------------------------------------------------- CLI


def test_cli_help():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-m", "routerlib.bench", "--help"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    for opt in ("--configs", "--tokens", "--stages", "--backends", "--inputs", "--dtype",
                "--warmup", "--rep", "--cuda-graph", "--profile", "--out", "decode", "prefill",
                "cpu_small", "recorded:PATH", "zipf", "compile", "deepseek-v3"):
        assert opt in r.stdout, opt


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    rc = sweep.main(["--configs", "tiny", "--tokens", "16,64", "--backends", "torch",
                     "--stages", "gate,route,dispatch,experts,combine", "--inputs",
                     "uniform,zipf", "--warmup", "1", "--rep", "3", "--roofs", "quick",
                     "--profile", "--profile-iters", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out


def test_cli_tiny_run_writes_results(tiny_run):
    df = pd.read_csv(f"{tiny_run}.csv")
    assert list(df.columns) == list(env_info()) + sweep.ROW_COLUMNS
    assert len(df) == 2 * 2 * 5  # T x inputs x stages
    assert df.error.isna().all()
    assert (df.median_us > 0).all() and (df.p20_us <= df.p80_us).all()
    assert (df.gbps > 0).all() and (df.frac_roof > 0).all() and (df.floor_us > 0).all()
    assert set(df.inputs) == {"uniform", "zipf:1.2"} and set(df["T"]) == {16, 64}
    z, u = df[df.inputs == "zipf:1.2"], df[df.inputs == "uniform"]
    assert z.imbalance.min() > u.imbalance.max()
    rs = results.ResultSet.read(f"{tiny_run}.json")  # the one row schema
    assert rs.bench == "tiny" and rs.env["torch"] == torch.__version__
    assert rs.meta["roofs"]["copy_gbps"] > 0 and rs.meta["args"]["configs"] == "tiny"
    w = results.wide(f"{tiny_run}.json")
    timed = w[w["mode"] == "eager"]
    assert len(timed) == len(df) and set(timed["config"]) == {"tiny"}
    merged = timed.merge(df, on=["config", "inputs", "T", "stage"])
    assert (merged["time_us"] == merged["median_us"]).all()
    assert (merged["time_us_p20"] <= merged["time_us_p80"]).all()
    assert len(w[w["mode"] == "profile"]) == 2 * 2 * 5
    prof = pd.read_csv(f"{tiny_run}_profile.csv")
    assert len(prof) == 2 * 2 * 5 and (prof.time_us > 0).all()


def test_cli_records_oom_and_bad_args(tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(sweep, "make_stage_fns", oom)
    out = tmp_path / "oom"
    assert sweep.main(["--configs", "tiny", "--tokens", "8", "--backends", "torch", "--stages",
                       "route,combine", "--roofs", "none", "--no-progress", "--out",
                       str(out)]) == 0
    df = pd.read_csv(f"{out}.csv")
    assert len(df) == 2 and df.error.str.startswith("OOM").all() and df.median_us.isna().all()
    rs = results.ResultSet.read(f"{out}.json")
    assert rs.meta["roofs"] is None and len(rs.rows) == 2
    assert all(r.value is None and r.error.startswith("OOM") for r in rs.rows)
    # results are checkpointed after every case (failed ones too), compile cases last
    args = sweep.build_parser().parse_args(
        ["--configs", "tiny", "--tokens", "8,16", "--backends", "compile,torch", "--stages",
         "route", "--roofs", "none", "--no-progress"])
    seen = []
    sweep.run_sweep(args, checkpoint=lambda r: seen.append([x["backend"] for x in r["rows"]]))
    assert seen == [["torch"], ["torch"] * 2, ["torch"] * 2 + ["compile"],
                    ["torch"] * 2 + ["compile"] * 2]
    assert sweep.main(["--stages", "sort"]) == 2
    assert "--stages" in capsys.readouterr().err


def test_bench_plots(tiny_run):
    from routerlib.viz import plot_bench, plot_stage_breakdown

    df = pd.read_csv(f"{tiny_run}.csv")
    assert isinstance(plot_stage_breakdown(df), Figure)
    assert isinstance(plot_stage_breakdown(pd.read_csv(f"{tiny_run}_profile.csv")), Figure)
    fig = plot_bench(df, stage="dispatch")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    roof = df.roof_copy_gbps.iloc[0]
    assert any(line.get_ydata()[0] == pytest.approx(roof) for line in fig.axes[1].get_lines())
    fig = plot_bench(df, stage="route", floor_us=4.8)  # the graph floor on the time axis
    assert any(len(line.get_ydata()) and line.get_ydata()[0] == pytest.approx(4.8)
               for line in fig.axes[0].get_lines())
    # a second backend reuses torch's gate/experts times in its stacked bar
    two = pd.concat([df, df[df.stage.isin(["route", "dispatch", "combine"])].assign(
        backend="triton")])
    assert isinstance(plot_stage_breakdown(two), Figure)
    with pytest.raises(ValueError):
        plot_bench(df, stage="backward")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_timing_graph_and_profile():
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    t = timing.bench(lambda: a @ a, device=dev)
    g = timing.bench_cuda_graph(lambda: a @ a)
    assert 0 < t.p20_us <= t.median_us <= t.p80_us and g.median_us > 0
    r = roofline.measure_roofs(dev, quick=True)
    assert r.copy_gbps > 100 and r.matmul_tflops > 10
    ss = make_stage_fns(get_shape("olmoe"), 256, "torch", torch.bfloat16, dev)
    assert set(ss.fns) == set(STAGE_NAMES), ss.errors
    df = profile_stages(get_shape("olmoe"), 256, stage_set=ss, iters=2)
    assert (df.time_kind == "device").all() and (df.time_us > 0).all()
    assert (df.n_kernels >= 1).all() and (df.peak_mem_mb > 0).all()
    # one elementwise kernel per call, and its range annotation is not counted as a kernel
    from routerlib.bench.profile import _profile_one

    v = torch.zeros(1 << 20, device=dev)
    one = _profile_one(lambda: v.add_(1), "routerlib::one", dev, iters=4, trace_path=None)
    assert one["n_kernels"] == 1 and 0 < one["time_us"] < 1000


@pytest.mark.gpu
def test_failed_capture_leaves_cuda_usable():
    dev = torch.device("cuda")
    x = torch.randn(64, device=dev)
    with pytest.raises(RuntimeError, match="host sync"):  # refused before capturing
        timing.bench_cuda_graph(lambda: torch.bincount((x > 0).long()))
    lg = torch.randn(16, 4, device=dev, requires_grad=True)
    y = lg.softmax(-1).sum(0)
    dy = torch.randn(4, device=dev)
    # an autograd backward of a graph built outside the capture fails inside the capture
    with pytest.raises(RuntimeError, match="capture failed"):
        timing.bench_cuda_graph(lambda: torch.autograd.grad(y, (lg,), dy, retain_graph=True))
    assert timing.cuda_state_ok()
    assert torch.randn(3, device=dev).shape == (3,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_gpu_only_tools_refuse_without_a_gpu(tmp_path):
    """The GPU tools say so and exit 2 on a CPU instead of failing half-way."""
    from routerlib.bench import route_breakdown, tune

    assert route_breakdown.main(["--out", str(tmp_path / "b.json")]) == 2
    assert tune.main(["--out", str(tmp_path / "t")]) == 2


# ---------------------------------------------------------------- results: one schema, one layout

RESULTS_ROOT = results.RESULTS


def _a_set(bench="demo", device="NVIDIA H200", commit="abc1234def"):
    rs = results.ResultSet(bench, env={"device": device, "git_commit": commit, "torch": "x"},
                           meta={"roofs": {"copy_gbps": 4000.0}})
    rs.add("triton", {"T": 64, "stage": "route"}, "time_us", 12.5, "us", p20=12.0, p80=13.5, n=9)
    rs.add("triton", {"T": 64, "stage": "route"}, "gbps", 3.25, "GB/s")
    rs.add("torch", {"T": 64, "stage": "route"}, "time_us", float("nan"), "us",
           error="not capturable")
    return rs


def test_result_set_roundtrip_and_wide(tmp_path):
    rs = _a_set()
    path = rs.write(tmp_path)
    back = results.ResultSet.read(path)
    assert back.env == rs.env and back.meta == rs.meta and back.rows == rs.rows
    assert back.rows[2].value is None and back.rows[2].error == "not capturable"  # NaN -> null
    w = results.wide(path).set_index("variant")
    assert w.loc["triton", "time_us"] == 12.5 and w.loc["triton", "gbps"] == 3.25
    assert w.loc["triton", "time_us_p20"] == 12.0 and w.loc["triton", "time_us_p80"] == 13.5
    assert w.loc["torch", "error"] == "not capturable"
    assert len(pd.read_csv(tmp_path / "demo.csv")) == 3
    with pytest.raises(ValueError, match="not a routerlib result file"):
        (tmp_path / "old.json").write_text(json.dumps({"env": {}, "roofs": {}}))
        results.ResultSet.read(tmp_path / "old.json")
    with pytest.raises(FileNotFoundError, match="no .missing. results for .h200"):
        results.latest("missing", "h200", tmp_path)


def test_pack_then_install_archives_the_previous_run(tmp_path):
    run = tmp_path / "out" / "step"
    _a_set(commit="1111111aaaa").write(run)
    (run / "notes.log").write_text("a log travels too")
    tgz = results.pack(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == ["results.tgz"]
    root = tmp_path / "results"
    first = results.install(tgz, root)
    assert first == [root / "h200" / "demo.json"]
    second_run = tmp_path / "out2"
    rs2 = _a_set(commit="2222222bbbb")
    rs2.rows[0].value = 11.0
    rs2.write(second_run)
    results.install(second_run, root)
    assert results.ResultSet.read(root / "h200" / "demo.json").rows[0].value == 11.0
    old = results.ResultSet.read(root / "h200" / "archive" / "demo_1111111.json")
    assert old.rows[0].value == 12.5 and (root / "h200" / "archive" / "demo_1111111.csv").exists()


def test_convert_keeps_env_and_merges_newest_first():
    env_a = {"device": "NVIDIA H100 80GB HBM3", "git_commit": "aaaaaaa", "date": "2026-01-01"}
    env_b = {**env_a, "git_commit": "bbbbbbb", "date": "2026-01-02"}
    case = dict(config="qwen3", D=2048, E=128, K=8, F=768, inputs="uniform", dtype="bfloat16",
                T=64, stage="route", mode="graph", backend="triton", error=None, p20_us=1.0,
                p80_us=3.0, n=5, gbps=1.0, frac_roof=0.1, floor_us=0.5, bytes=100, flops=0)
    a = {"env": env_a, "roofs": {"copy_gbps": 1.0}, "args": {}, "rows": [
        {**case, "median_us": 2.0}, {**case, "T": 128, "median_us": 4.0}], "profile": []}
    b = {"env": env_b, "roofs": {"copy_gbps": 2.0}, "args": {}, "rows": [
        {**case, "median_us": 1.5}, {**case, "T": 128, "median_us": None, "error": "OOM"}],
         "profile": []}
    rs = convert.from_sweep([b, a], "kernels")  # order of the files does not matter
    assert rs.env == env_b and rs.meta["roofs"]["copy_gbps"] == 2.0
    t = {(r.config["T"], r.config["commit"]): r.value for r in rs.rows if r.metric == "time_us"}
    assert t == {(64, "bbbbbbb"): 1.5, (128, "aaaaaaa"): 4.0}  # a newer error does not win
    assert not any(r.metric == "tflops" for r in rs.rows)  # no FLOPs: no TFLOP/s row


@pytest.mark.parametrize("card,bench", [("h100", "targets"), ("h200", "targets"),
                                        ("h100", "route_breakdown"), ("h100", "kernels")])
def test_committed_results_are_in_the_one_schema(card, bench):
    rs = results.ResultSet.read(results.latest(bench, card))
    assert rs.bench == bench and card in rs.env["device"].lower() and rs.env["git_commit"]
    assert rs.rows and all(isinstance(r.config, dict) and r.metric for r in rs.rows)
    timed = [r for r in rs.rows if r.value is not None and r.unit == "us"]
    assert timed and all(r.value > 0 for r in timed)
    if bench == "targets":
        assert all({"target", "goal", "measured", "pass"} <= set(t) for t in rs.meta["targets"])


@pytest.mark.parametrize("card", ["h100", "h200"])
def test_results_index_lists_every_file(card):
    """results/<card>/README.md names every file there and in archive/, and every file it
    names exists."""
    folder = RESULTS_ROOT / card
    readme = (folder / "README.md").read_text()
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name != "README.md")
    cited: set[str] = set()
    for tok in re.findall(r"`([^`\s]+\.(?:json|csv|txt|log|md|npz|pt))`", readme):
        m = re.match(r"(.*)\.\{(.*)\}$", tok)
        cited |= {f"{m.group(1)}.{e}" for e in m.group(2).split(",")} if m else {tok}
    for tok in re.findall(r"`([^`\s]+)\.\{([a-z,]+)\}`", readme):
        cited |= {f"{tok[0]}.{e}" for e in tok[1].split(",")}
    folders = set(re.findall(r"`([A-Za-z0-9_]+/)`", readme))  # a cited folder covers its files
    missing = [f for f in files if f not in cited and Path(f).name not in cited
               and not any(f.startswith(d) for d in folders)]
    assert not missing, f"files not in {card}/README.md: {missing}"
    here = [c for c in cited if "<" not in c and not c.startswith(("docs/", "results/", "../"))]
    absent = [c for c in here if not (folder / c).exists()]
    assert not absent, f"{card}/README.md names files that are not there: {absent}"


def test_route_rule_within_5_percent_of_the_best_config_on_h200():
    """The benchmark check that replaces pinning a tuning table: in the committed tuning run,
    the route's rule picks a config within 5% of the fastest measured for every case."""
    df = checks.rule_within(RESULTS_ROOT / "h200" / "tune_route.json", tol=0.05)
    assert len(df) >= 4 and df["pass"].all(), df
    assert (df["ratio"] >= 1.0).all()


def test_rule_check_flags_a_slow_default(tmp_path):
    rs = results.ResultSet("tune_demo", env={"device": "cpu"})
    for variant, us in (("default", 12.0), ("1,1", 10.0), ("2,2", float("nan"))):
        rs.add(variant, {"kernel": "route", "T": 64}, "time_us", us, "us")
    df = checks.rule_within(rs.write(tmp_path), tol=0.05)
    assert df.loc[0, "best_config"] == "1,1" and df.loc[0, "ratio"] == pytest.approx(1.2)
    assert not df.loc[0, "pass"]


def test_sweep_ab_variants_label_rows(tmp_path, monkeypatch):
    """An A/B run is variants of one sweep: each variant in its own process with its env, the
    order alternating between rounds, rows labelled backend[variant]. The child processes are
    stood in for here (a real child is the plain sweep of test_cli_tiny_run_writes_results)."""
    calls = []
    real_run = subprocess.run

    def child(cmd, env=None, **kw):
        if cmd[1:3] != ["-m", "routerlib.bench"]:  # git, asked by env_info
            return real_run(cmd, env=env, **kw)
        prefix = cmd[cmd.index("--out") + 1]
        calls.append((cmd, env.get("ROUTERLIB_AB_DEMO")))
        rs = results.ResultSet(Path(prefix).name, env={"device": "cpu", "git_commit": "c"})
        rs.add("torch", {"config": "tiny", "T": 16, "stage": "route", "mode": "eager"},
               "time_us", 10.0 + len(calls), "us")
        rs.write(Path(prefix).parent)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", child)
    out = tmp_path / "ab"
    argv = ["--configs", "tiny", "--tokens", "16", "--backends", "torch", "--stages", "route",
            "--variant", "a:ROUTERLIB_AB_DEMO=1", "--variant", "b", "--rounds", "2",
            "--out", str(out)]
    assert sweep.main(argv) == 0
    assert [e for _, e in calls] == ["1", None, None, "1"]  # a b, then b a
    for cmd, _ in calls:
        assert cmd[1:3] == ["-m", "routerlib.bench"] and "--variant" not in cmd
        assert cmd[cmd.index("--stages") + 1] == "route"
    w = results.wide(f"{out}.json")
    assert sorted(zip(w["variant"], w["round"], w["time_us"])) == [
        ("torch[a]", 0, 11.0), ("torch[a]", 1, 14.0), ("torch[b]", 0, 12.0), ("torch[b]", 1, 13.0)]
    assert results.ResultSet.read(f"{out}.json").meta["variants"] == {
        "a": {"ROUTERLIB_AB_DEMO": "1"}, "b": {}}
    assert sweep.main(["--variant", "bad name:X"]) == 2
    assert sweep.main(["--variant", "a:NOVALUE"]) == 2


# ---------------------------------------------------------------- set-up for a user's machine

def test_environment_takes_cpu_torch_and_bounds_triton():
    """environment.yml and scripts/env.sh take torch's CPU build (never PyPI's default Linux
    wheel, which pulls the CUDA libraries) and triton within the tested bounds, and the
    installed triton is inside them."""
    root = results.ROOT
    yml = (root / "environment.yml").read_text()
    env_sh = (root / "scripts" / "env.sh").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in yml
    assert re.search(r"torch==[\d.]+\+cpu", yml)
    assert "https://download.pytorch.org/whl/cpu" in env_sh and '+cpu"' in env_sh
    for text in (yml, env_sh):
        assert "triton>=3.6,<3.10" in text
    triton = pytest.importorskip("triton")
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    assert (3, 6) <= (major, minor) < (3, 10), triton.__version__
    r = subprocess.run(["bash", "-n", str(root / "scripts" / "env.sh")], capture_output=True)
    assert r.returncode == 0, r.stderr
