"""The final report's summary helpers on small hand-made result files with known answers, and
the report's index page."""

from __future__ import annotations

import math

import matplotlib
import pytest

from routerlib import report_summary as rsum
from routerlib.bench.results import ResultSet

matplotlib.use("Agg")
pd = pytest.importorskip("pandas")

ENV = {"device": "NVIDIA H200", "git_commit": "abcdef1234567890", "date": "2026-12-04T20:00:00"}
ROUTE = {"section": "route", "op": "route", "mode": "eager", "case": "qwen3", "T": 16384,
         "E": 128, "K": 8, "dtype": "float32"}


def _targets(root, card="h200") -> None:
    rs = ResultSet("targets", env=ENV, meta={"targets": [
        {"target": "route graph", "metric": "graph_us", "cmp": "<=", "goal": 10.0,
         "measured": 12.5, "pass": False},
        {"target": "combine frac", "metric": "frac_copy", "cmp": ">=", "goal": 0.85,
         "measured": 0.97, "pass": True}]})
    for variant, us in (("triton", 50.0), ("torch", 1500.0), ("torchtitan", 200.0),
                        ("deepspeed", 400.0)):
        rs.add(variant, ROUTE, "time_us", us, "us")
        rs.add(variant, ROUTE, "gbps", 1.0, "GB/s")  # another metric: ignored by the time rows
    rs.add("triton", {**ROUTE, "mode": "graph"}, "time_us", 20.0, "us")  # not eager: filtered
    for D, ref, fast, peer in ((2048, 300.0, 150.0, 330.0), (4096, 600.0, 300.0, 640.0)):
        c = {"section": "dispatch", "op": "combine", "mode": "eager", "case": f"D={D}",
             "T": 16384, "D": D, "K": 8}
        # the targets benchmark's own name for the median time, as its newer files write it
        rs.add("triton", c, "median_us", fast, "us")
        rs.add("torch", c, "median_us", ref, "us")
        rs.add("deepspeed", c, "median_us", peer, "us")
        rs.add("torchtitan", c, "median_us", None, "us", error="not installed")  # no number
    rs.write(root / card)


def _inference(root, card="h200") -> None:
    rs = ResultSet("inference", env={**ENV, "git_commit": "1234567aaaa"})
    for backend, mode, us in (("torch", "eager", 900.0), ("triton", "graph", 300.0),
                              ("torch", "graph", 450.0)):
        cfg = dict(model="tiny", backend=backend, mode=mode, B=4, S=64, N=48)
        rs.add(f"{backend}-{mode}", cfg, "latency_p50_us", us, "us")
        rs.add(f"{backend}-{mode}", cfg, "tokens_per_s", 4e6 / us, "tokens/s")
    rs.write(root / card)


def test_gains_known_ratios(tmp_path):
    _targets(tmp_path)
    t = rsum.gains("h200", tmp_path)
    route = t[t.stage.str.startswith("route")].iloc[0]
    assert (route.baseline_value, route.routerlib, route.peer_value) == (1500.0, 50.0, 200.0)
    assert route.best_peer == "torchtitan"
    assert route.x_vs_baseline == pytest.approx(30.0)
    assert route.x_vs_peer == pytest.approx(4.0)
    assert route.case == "qwen3 T=16384 E=128 K=8 dtype=float32"
    assert route.commit == "abcdef1"
    assert "commit abcdef1" in route.source and "NVIDIA H200" in route.source
    comb = t[t.stage == "combine"]
    assert comb.case.tolist() == ["D=2048 T=16384 K=8", "D=4096 T=16384 K=8"]
    assert comb.x_vs_baseline.tolist() == pytest.approx([2.0, 2.0])
    assert comb.best_peer.tolist() == ["deepspeed", "deepspeed"]  # torchtitan had no number
    assert comb.x_vs_peer.tolist() == pytest.approx([330 / 150, 640 / 300])
    assert comb.metric.tolist() == ["median_us", "median_us"] and route.metric == "time_us"
    # stages whose file is absent add no line; the others are absent from this file
    assert set(t.stage) == {"route (score + top-K + plan)", "combine"}


def test_headline_keeps_the_last_case_of_each_stage(tmp_path):
    _targets(tmp_path)
    h = rsum.headline(rsum.gains("h200", tmp_path))
    assert h.stage.tolist() == ["route (score + top-K + plan)", "combine"]
    assert h.case.tolist()[1] == "D=4096 T=16384 K=8"


def test_headline_prefers_the_quoted_shape(tmp_path):
    rs = ResultSet("experts", env=ENV)
    for shape in ("qwen3-30b-a3b", "mixtral-8x7b"):
        c = dict(shape=shape, T=4096, mode="forward", D=2048)
        for variant, us in (("routerlib", 100.0), ("hf_loop", 800.0),
                            ("torch_composition", 250.0)):
            rs.add(variant, {**c, "graph": variant == "routerlib"}, "time_us", us, "us")
    rs.write(tmp_path / "h200")
    t = rsum.gains("h200", tmp_path)
    assert len(t) == 2 and t.x_vs_baseline.tolist() == pytest.approx([8.0, 8.0])
    assert t.x_vs_peer.tolist() == pytest.approx([2.5, 2.5])
    assert rsum.headline(t).case.tolist() == ["shape=qwen3-30b-a3b T=4096"]


def test_case_keys_ignore_differing_config_and_higher_is_better(tmp_path):
    _inference(tmp_path)
    t = rsum.gains("h200", tmp_path)
    row = t.iloc[0]
    assert row.stage.startswith("LM decode") and row.case == "model=tiny B=4"
    assert row.x_vs_baseline == pytest.approx(3.0) and row.x_vs_peer == pytest.approx(1.5)
    tput = rsum.Comparison("inference", "tokens/s", "triton-graph", "torch-eager", "tokens_per_s",
                           ("model", "B"), ("torch-graph",), lower_is_better=False)
    r = rsum.gains("h200", tmp_path, (tput,)).iloc[0]
    assert r.x_vs_baseline == pytest.approx(3.0) and r.x_vs_peer == pytest.approx(1.5)


def test_missing_files_are_not_measured_yet(tmp_path):
    _targets(tmp_path)
    a = rsum.availability("h200", tmp_path).set_index("bench")
    assert a.loc["targets", "status"] == "h200/targets.json"
    assert a.loc["targets", "commit"] == "abcdef1" and a.loc["targets", "rows"] > 0
    assert a.loc["quant", "status"] == "not measured yet" and a.loc["quant", "rows"] == 0
    assert rsum.bench_rows("quant", "h200", tmp_path) is None
    empty = rsum.gains("h100", tmp_path)  # no file at all for that card
    assert empty.empty and "x_vs_baseline" in empty.columns
    assert rsum.target_verdicts("h100", tmp_path).empty


def test_target_verdicts_and_bench_rows(tmp_path):
    _targets(tmp_path)
    v = rsum.target_verdicts("h200", tmp_path)
    assert v.target.tolist() == ["route graph", "combine frac"]
    assert v.passed.tolist() == [False, True] and v.goal.tolist() == ["<= 10.0", ">= 0.85"]
    rows = rsum.bench_rows("targets", "h200", tmp_path, op="combine")
    assert set(rows.variant) == {"triton", "torch", "deepspeed", "torchtitan"}
    assert rows.source.str.contains("abcdef1").all()


def test_fmt_ratio():
    assert rsum.fmt_ratio(29.126) == "29.1x" and rsum.fmt_ratio(1.8501) == "1.85x"
    assert rsum.fmt_ratio(None) == "n/a" and rsum.fmt_ratio(math.nan) == "n/a"


def test_plot_gains_bars_match_the_table(tmp_path):
    import matplotlib.pyplot as plt

    _targets(tmp_path)
    t = rsum.gains("h200", tmp_path)
    ax = rsum.plot_gains(t, title="t")
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    want = sorted(round(v, 6) for v in [*t.x_vs_baseline, *t.x_vs_peer])
    assert widths == want
    assert "log" == ax.get_xscale() and "x" in ax.get_xlabel()
    legend = ax.get_legend()
    assert legend is not None and len(legend.get_texts()) == 2
    plt.close(ax.figure)
    ax = rsum.plot_gains(t.iloc[:0])  # nothing measured: says so instead of an empty axis
    assert any("not measured" in tx.get_text() for tx in ax.texts)
    plt.close(ax.figure)


def test_index_introduces_each_notebook():
    from types import SimpleNamespace as NS

    from routerlib.report import INTROS, index_html, notebook_intro

    assert set(INTROS) >= {"01", "02", "03", "04", "05", "06"}
    nb = NS(cells=[NS(cell_type="code", source="x = 1"),
                   NS(cell_type="markdown", source="# 07 — New\n\nFirst sentence here. Second.")])
    assert notebook_intro("07_new", nb) == "First sentence here."
    assert notebook_intro("01_baseline") == INTROS["01"]
    page = index_html([("01_baseline", "01 — Baseline", 3.0, INTROS["01"]),
                       ("07_new", "", 1.0, "A <b> sentence.")])
    items = [line for line in page.splitlines() if line.strip().startswith("<li>")]
    assert len(items) == 2
    assert INTROS["01"] in items[0] and 'href="01_baseline.html"' in items[0]
    assert "A &lt;b&gt; sentence." in items[1] and ".pdf" not in page
    with_pdf = index_html([("06_final_report", "06", 2.0)], pdf=True)
    assert 'href="06_final_report.pdf"' in with_pdf


def test_the_final_report_notebook_reads_every_number_from_files():
    """Notebook 06 types no measured number: its tables come from routerlib.report_summary."""
    import re

    from routerlib.report import ROOT

    src = (ROOT / "notebooks" / "src" / "06_final_report.py").read_text()
    code = "\n".join(line for line in src.splitlines() if not line.startswith("#"))
    assert "rsum.gains(" in code and "rsum.availability(" in code
    assert not re.search(r"\b\d+(\.\d+)?\s*(us|µs|ms|GB/s|TB/s)\b", code)
