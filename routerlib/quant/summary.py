"""Tables and the written recommendation of notebook 04, from a quant result file (the rows of
routerlib.bench.quant, as routerlib.bench.results.to_frame gives them). Nothing here invents a
number: a metric missing from the file reads as missing."""

from __future__ import annotations

import math

import pandas as pd

# the mixed-precision router's target: the same top-K set as fp32 for >= 99.9% of tokens
FLIP_TARGET = 1e-3


def _pick(df: pd.DataFrame, **eq) -> pd.DataFrame:
    m = pd.Series(True, index=df.index)
    for k, v in eq.items():
        if k not in df.columns:
            return df.iloc[0:0]
        m &= df[k] == v
    return df[m]


def router_table(df: pd.DataFrame, shape: str | None = None) -> pd.DataFrame:
    """One row per (shape, precision): router time, speed-up against fp32, flip rate and weight L1
    on bf16 inputs and on fp32 inputs, flip rate on skewed inputs."""
    r = _pick(df, part="router")
    if shape is not None:
        r = r[r["shape"] == shape]
    if r.empty:
        return pd.DataFrame()
    wide = r.pivot_table(index=["shape", "variant"], columns=["inputs", "metric"],
                         values="value", aggfunc="first")
    out = pd.DataFrame(index=wide.index)

    def col(inputs: str, metric: str) -> pd.Series:
        key = (inputs, metric)
        return wide[key] if key in wide.columns else pd.Series(math.nan, index=wide.index)

    out["router_us"] = col("bf16", "router_time_us")
    out["gate_us"] = col("bf16", "gate_time_us")
    fp32_us = out["router_us"].groupby(level="shape").transform(
        lambda s: s.xs("fp32", level="variant").iloc[0] if "fp32" in s.index.get_level_values(
            "variant") else math.nan)
    out["speedup_vs_fp32"] = fp32_us / out["router_us"]
    out["flip_bf16_inputs"] = col("bf16", "flip_rate")
    out["flip_fp32_inputs"] = col("fp32", "flip_rate")
    out["flip_skewed"] = col("skewed_bf16", "flip_rate")
    out["weight_l1_fp32_inputs"] = col("fp32", "weight_l1")
    return out.reset_index()


def payload_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per payload format and scale group: time, bytes, GB/s, speed-up and byte ratio
    against the bf16 dispatch, and the layer's output error with that payload."""
    p = _pick(df, part="payload")
    if p.empty:
        return pd.DataFrame()
    p = p[p["variant"] != "copy"]
    wide = p.pivot_table(index=["variant", "group"], columns="metric", values="value",
                         aggfunc="first").reset_index()
    lay = _pick(df, part="layer")
    if not lay.empty and "what" in lay.columns:
        err = lay[lay["what"] == "payload"].set_index(["variant", "group"])["value"]
        wide["layer_output_error"] = [err.get((v, g), math.nan)
                                      for v, g in zip(wide["variant"], wide["group"])]
    return wide


def experts_table(df: pd.DataFrame) -> pd.DataFrame:
    e = _pick(df, part="experts")
    if e.empty:
        return pd.DataFrame()
    return e.pivot_table(index=["shape", "variant"], columns="metric", values="value",
                         aggfunc="first").reset_index()


def recommendation(df: pd.DataFrame) -> list[str]:
    """Sentences that follow from the measured rows (each names its numbers)."""
    lines: list[str] = []
    rt = router_table(df)
    if not rt.empty:
        for shape, g in rt.groupby("shape"):
            ok = g[(g["flip_fp32_inputs"] <= FLIP_TARGET) & (g["variant"] != "fp32")]
            if ok.empty:
                lines.append(f"{shape}: no reduced-precision router keeps the fp32 top-K set for "
                             f"{1 - FLIP_TARGET:.1%} of tokens; route in fp32.")
            else:
                best = ok.sort_values("router_us").iloc[0]
                lines.append(
                    f"{shape}: route with the {best['variant']} gate: {best['router_us']:.1f} us "
                    f"({best['speedup_vs_fp32']:.2f}x fp32); its top-K set differs from fp32's "
                    f"for {best['flip_fp32_inputs']:.3%} of tokens on fp32 inputs "
                    f"({best['flip_bf16_inputs']:.3%} on bf16 inputs).")
            bad = g[g["flip_fp32_inputs"] > FLIP_TARGET]
            if not bad.empty:
                worst = ", ".join(f"{v} {f:.2%}" for v, f in
                                  zip(bad["variant"], bad["flip_fp32_inputs"]))
                lines.append(f"{shape}: these paths flip more than {FLIP_TARGET:.1%} of tokens: "
                             f"{worst}.")
    pt = payload_table(df)
    if not pt.empty and "speedup_vs_bf16" in pt.columns:
        fast = pt.dropna(subset=["speedup_vs_bf16"]).sort_values("speedup_vs_bf16").iloc[-1]
        err = fast.get("layer_output_error", math.nan)
        lines.append(
            f"payload: {fast['variant']} with {fast['group']} scales dispatches "
            f"{fast['speedup_vs_bf16']:.2f}x faster than bf16 moving "
            f"{fast['bytes_ratio_vs_bf16']:.2f}x fewer bytes; the layer's output moves by "
            f"{err:.2%} (relative).")
    et = experts_table(df)
    if not et.empty and "speedup_vs_bf16" in et.columns:
        for _, r in et.dropna(subset=["speedup_vs_bf16"]).iterrows():
            lines.append(f"experts {r['shape']}: fp8 runs {r['speedup_vs_bf16']:.2f}x the bf16 "
                         f"fused experts ({r.get('tflops', math.nan):.0f} TFLOP/s).")
    return lines
