"""Checks of benchmark results: does a rule's choice hold up against what was measured?

A launch-config rule is right when, in a tuning run, the config it picks ("default", or
"autotune" where the autotuner picks) is within a tolerance of the fastest config measured for
the same case. These checks replace tests that pinned a tuning table: the table may change, the
measurement decides.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from routerlib.bench.results import wide

RULE_VARIANTS = ("default", "autotune")


def default_vs_best(path: str | Path, case_keys: tuple[str, ...] = ("kernel", "case", "T", "E",
                                                                     "K", "D")) -> pd.DataFrame:
    """Per case of a tuning result file: the rule's time, the best time and config, and
    ratio = rule / best (1.0: the rule picked the fastest). Cases without a rule row are left
    out; configs that failed (no time) do not count as best."""
    w = wide(path)
    keys = [k for k in case_keys if k in w.columns]
    out = []
    for case, g in w[w["time_us"].notna()].groupby(keys, dropna=False):
        rule = g[g["variant"].isin(RULE_VARIANTS)]
        if rule.empty:
            continue
        best = g.loc[g["time_us"].idxmin()]
        rule_us = float(rule["time_us"].min())
        out.append(dict(zip(keys, case if isinstance(case, tuple) else (case,)),
                        rule_us=rule_us, best_us=float(best["time_us"]),
                        best_config=best["variant"], ratio=rule_us / float(best["time_us"])))
    return pd.DataFrame(out)


def rule_within(path: str | Path, tol: float = 0.05) -> pd.DataFrame:
    """default_vs_best with a `pass` column: the rule at most `tol` slower than the best."""
    df = default_vs_best(path)
    df["pass"] = df["ratio"] <= 1.0 + tol
    return df
