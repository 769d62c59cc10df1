"""The load-balancing study: one MoE language model, the same seed and token budget, trained once
per balancing strategy; final quality, routing balance and speed of each.

    python -m routerlib.models.study --out DIR [--size toy|full] [--budget-s 270]

writes into DIR
    balance.json / .csv     routerlib.bench.results rows: per strategy, the final validation loss
                            and perplexity, imbalance max/mean, CV, MaxVio, drop rate, tokens no
                            expert processed, dead experts (averaged over the last 50 steps and
                            the layers), median step time
    balance_history.npz     per strategy and step: losses, step time, routing metrics per layer,
                            the per-expert load [N, L, E]; validation loss at each evaluation
    balance_model.pt        the checkpoint of the strategy with the lowest validation loss
    lm_trace.npz            routing trace (routerlib.models.traces) of the best token-choice run
    lm_trace_none.npz       routing trace of the unbalanced run
Each file is rewritten after every run, so a run cut short leaves the finished strategies.

With --budget-s the number of steps (the same for every strategy) is chosen to fit the budget
from a timed probe of the slowest and the plainest strategy; without it the size's preset holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routerlib.bench.results import ResultSet
from routerlib.config import RouterConfig
from routerlib.models.data import load_corpus
from routerlib.models.lm import LMConfig
from routerlib.models.train import TrainConfig, TrainResult, build_model, save_checkpoint, train


@dataclass(frozen=True)
class Strategy:
    """A balancing strategy: its name, a one-line description, and the router fields it sets
    on top of the plain dropless top-K softmax router."""

    name: str
    label: str
    router: dict = field(default_factory=dict)


def strategies() -> list[Strategy]:
    """Every strategy of the study, in the order they run (the references first)."""
    out = [
        Strategy("none", "no balancing (dropless)"),
        Strategy("aux_1e-3", "Switch/GShard aux loss, coef 1e-3", {"aux_loss_coef": 1e-3}),
        Strategy("aux_1e-2", "Switch/GShard aux loss, coef 1e-2", {"aux_loss_coef": 1e-2}),
        Strategy("aux_1e-1", "Switch/GShard aux loss, coef 1e-1", {"aux_loss_coef": 1e-1}),
        Strategy("seq_aux_1e-2", "sequence-level aux loss, coef 1e-2",
                 {"seq_aux_loss_coef": 1e-2}),
        Strategy("z_1e-3", "router z-loss, coef 1e-3", {"z_loss_coef": 1e-3}),
        Strategy("jitter_1e-2", "input jitter, eps 1e-2", {"jitter_eps": 1e-2}),
        Strategy("aux_free_bias", "aux-loss-free bias, rate 1e-3",
                 {"expert_bias": True, "bias_update_rate": 1e-3}),
        Strategy("expert_choice", "expert choice, capacity factor 1.0",
                 {"routing": "expert_choice", "capacity_factor": 1.0}),
    ]
    for cf in (1.0, 1.25, 2.0):
        for policy in ("position", "priority", "random"):
            out.append(Strategy(f"cap{cf:g}_{policy}", f"capacity {cf:g}, drop by {policy}",
                                {"capacity_factor": cf, "drop_policy": policy}))
    return out


BASE_ROUTER = dict(top_k=2, score_func="softmax", renormalize=True, check_finite=False)

SIZES: dict[str, tuple[LMConfig, TrainConfig]] = {
    # seconds on a CPU: what the tests and the notebook run
    "toy": (LMConfig(max_seq_len=64, num_layers=2, hidden_size=64, num_heads=2, ffn_size=64,
                     router=RouterConfig(num_experts=8, **BASE_ROUTER)),
            TrainConfig(steps=30, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
                        eval_every=15, eval_batches=2)),
    # the GPU study: ~6.8 M parameters (bf16 checkpoint ~14 MB), 8192 tokens a step
    "full": (LMConfig(max_seq_len=256, num_layers=4, hidden_size=256, num_heads=4, ffn_size=96,
                      router=RouterConfig(num_experts=16, **BASE_ROUTER)),
             TrainConfig(steps=400, batch_size=32, seq_len=256, lr=2e-3, warmup_steps=30,
                         eval_every=50, eval_batches=4)),
}


def lm_config(base: LMConfig, s: Strategy, backend: str | None = None) -> LMConfig:
    router = dataclasses.replace(base.router, **s.router)
    return dataclasses.replace(base, router=router, backend=backend or base.backend)


def probe_step_time(base: LMConfig, tcfg: TrainConfig, s: Strategy, device: torch.device,
                    steps: int = 8) -> float:
    """Median seconds per training step of strategy s (after 3 warm-up steps)."""
    model = build_model(lm_config(base, s), tcfg.seed, device)
    probe = dataclasses.replace(tcfg, steps=steps + 3, warmup_steps=1, eval_every=10 ** 6,
                                eval_batches=1)
    res = train(model, load_corpus(), probe, device, progress=False)
    return float(res.history.step_time_s.iloc[3:].median())


def steps_for_budget(budget_s: float, per_step: dict[str, float], runs: list[Strategy],
                     tcfg: TrainConfig, lo: int = 50) -> int:
    """Steps per run so that all runs fit budget_s: each run's time is its probe's step time
    (the plain one for strategies not probed) plus 15% for evaluation, logging and set-up."""
    plain = per_step["none"]
    total_per_step = sum(per_step.get(s.name, plain) for s in runs) * 1.15
    return int(max(lo, min(tcfg.steps, budget_s / total_per_step)))


def _history_arrays(name: str, res: TrainResult) -> dict[str, np.ndarray]:
    h, r = res.history, res.routing
    N, L, _ = res.load.shape

    def per_layer(col: str, dtype) -> np.ndarray:
        return r[col].to_numpy().reshape(N, L).astype(dtype)

    load_dtype = np.uint16 if res.load.max() < 2 ** 16 else np.int32
    return {
        f"{name}/ce": h.ce.to_numpy(np.float32), f"{name}/aux": h.aux.to_numpy(np.float32),
        f"{name}/z": h.z.to_numpy(np.float32),
        f"{name}/step_time_ms": (1e3 * h.step_time_s).to_numpy(np.float32),
        f"{name}/eval_step": res.evals.step.to_numpy(np.int32),
        f"{name}/val_loss": res.evals.val_loss.to_numpy(np.float32),
        f"{name}/imbalance": per_layer("imbalance", np.float32),
        f"{name}/cv": per_layer("cv", np.float32),
        f"{name}/max_vio": per_layer("max_vio", np.float32),
        f"{name}/drop_rate": per_layer("drop_rate", np.float32),
        f"{name}/tokens_unrouted": per_layer("tokens_unrouted", np.float32),
        f"{name}/dead_experts": per_layer("dead_experts", np.int16),
        f"{name}/load": res.load.astype(load_dtype),  # [N, L, E]
    }


def load_history(path: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(meta, {strategy: {field: array}}) of a balance_history.npz."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            if "/" in key:
                s, f = key.split("/", 1)
                out.setdefault(s, {})[f] = z[key]
    return meta, {s: out[s] for s in meta["strategies"] if s in out}


SUMMARY_METRICS = {"val_loss": "nats", "val_ppl": "", "imbalance": "max/mean", "cv": "",
                   "max_vio": "", "drop_rate": "fraction", "tokens_unrouted": "fraction",
                   "dead_experts": "experts", "step_time_ms": "ms"}


def summary_frame(rs_path: str | Path) -> pd.DataFrame:
    """One row per strategy, one column per metric, from a balance.json."""
    from routerlib.bench.results import to_frame

    df = to_frame(rs_path)
    wide = df.pivot_table(index="variant", columns="metric", values="value", sort=False)
    labels = df.drop_duplicates("variant").set_index("variant")["label"]
    wide.insert(0, "label", labels)
    return wide[["label", *[m for m in SUMMARY_METRICS if m in wide.columns]]]


def conclusion(summary: pd.DataFrame, balanced_below: float = 1.25) -> str:
    """Markdown: which strategy when, every number read from the summary (summary_frame)."""
    s = summary
    lines = ["| strategy | validation loss | perplexity | max/mean load | drop rate | "
             "dead experts | step time (ms) |", "|---|---|---|---|---|---|---|"]
    for name, r in s.iterrows():
        lines.append(f"| {name} | {r.val_loss:.3f} | {r.val_ppl:.1f} | {r.imbalance:.2f} | "
                     f"{r.drop_rate:.3f} | {r.dead_experts:.2f} | {r.step_time_ms:.1f} |")
    lines.append("")
    best = s.val_loss.idxmin()
    lines.append(f"- Lowest validation loss: **{best}** ({s.val_loss[best]:.3f} nats, max/mean "
                 f"load {s.imbalance[best]:.2f}).")
    if "none" in s.index:
        n = s.loc["none"]
        lines.append(f"- Without balancing the router ends at max/mean load {n.imbalance:.2f} "
                     f"(MaxVio {n.max_vio:.2f}) with {n.dead_experts:.2f} dead experts per layer "
                     f"and validation loss {n.val_loss:.3f} ({n.val_loss - s.val_loss[best]:+.3f}"
                     f" against the best).")
    aux = s[s.index.str.startswith("aux_1")]
    if len(aux):
        parts = ", ".join(f"{k.removeprefix('aux_')}: loss {r.val_loss:.3f}, max/mean "
                          f"{r.imbalance:.2f}" for k, r in aux.iterrows())
        lines.append(f"- The Switch/GShard loss trades balance for quality with its coefficient "
                     f"({parts}).")
    tc = s[(s.drop_rate == 0) & (s.tokens_unrouted == 0)]
    ok = tc[tc.imbalance <= balanced_below]
    if len(ok):
        b = ok.val_loss.idxmin()
        lines.append(f"- **When balance matters** (expert parallelism, a capacity to respect): "
                     f"among dropless strategies with max/mean load <= {balanced_below:g}, "
                     f"**{b}** has the lowest validation loss ({ok.val_loss[b]:.3f}, max/mean "
                     f"{ok.imbalance[b]:.2f}).")
    else:
        lines.append(f"- No dropless strategy kept max/mean load <= {balanced_below:g} in this "
                     "run.")
    cap = s[s.index.str.startswith("cap")]
    if len(cap):
        for cf in sorted({k.split("_")[0] for k in cap.index}, key=lambda c: float(c[3:])):
            g = cap[cap.index.str.startswith(cf + "_")]
            b = g.val_loss.idxmin()
            lines.append(f"- Capacity factor {cf[3:]}: {g.drop_rate.mean():.1%} of slots dropped "
                         f"on average; the best drop policy is {b.split('_', 1)[1]} (loss "
                         f"{g.val_loss[b]:.3f}, worst {g.val_loss.max():.3f}).")
    if "expert_choice" in s.index:
        e = s.loc["expert_choice"]
        lines.append(f"- Expert choice is balanced by construction (max/mean {e.imbalance:.2f}) "
                     f"but leaves {e.tokens_unrouted:.1%} of tokens to the residual alone and "
                     f"lets a token's routing depend on later tokens of the batch (not causal); "
                     f"validation loss {e.val_loss:.3f}.")
    if "aux_free_bias" in s.index and "aux_1e-2" in s.index:
        a, f = s.loc["aux_1e-2"], s.loc["aux_free_bias"]
        lines.append(f"- The aux-loss-free bias reaches max/mean {f.imbalance:.2f} at loss "
                     f"{f.val_loss:.3f}, against {a.imbalance:.2f} at {a.val_loss:.3f} for the "
                     "aux loss at 1e-2: balance without a gradient that fights the language "
                     "model loss.")
    fast, slow = s.step_time_ms.idxmin(), s.step_time_ms.idxmax()
    lines.append(f"- Step time ranges from {s.step_time_ms[fast]:.1f} ms ({fast}) to "
                 f"{s.step_time_ms[slow]:.1f} ms ({slow}).")
    return "\n".join(lines)


def run_study(out: str | Path, size: str = "full", names: list[str] | None = None,
              budget_s: float | None = None, steps: int | None = None,
              device: str | None = None, backend: str | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Train every strategy (or those named) and write the files listed in the module doc."""
    from routerlib.models.traces import capture_trace

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, tcfg = SIZES[size]
    runs = strategies()
    if names:
        known = {s.name for s in runs}
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"unknown strategies {bad}; known: {sorted(known)}")
        runs = [s for s in runs if s.name in names]
    corpus = load_corpus()
    base = dataclasses.replace(base, vocab_size=corpus.vocab_size)
    if steps is not None:
        tcfg = dataclasses.replace(tcfg, steps=steps, warmup_steps=min(tcfg.warmup_steps, steps))
    elif budget_s is not None:
        by_name = {s.name: s for s in strategies()}
        per_step = {n: probe_step_time(base, tcfg, by_name[n], dev)
                    for n in ("none", "expert_choice")}
        n = steps_for_budget(budget_s, per_step, runs, tcfg)
        print(f"probe: {', '.join(f'{k} {1e3 * v:.1f} ms/step' for k, v in per_step.items())}"
              f" -> {n} steps per run")
        tcfg = dataclasses.replace(tcfg, steps=n, warmup_steps=min(tcfg.warmup_steps, n // 10))
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    common = {"size": size, "device": device_name, "steps": tcfg.steps,
              "tokens": tcfg.steps * tcfg.batch_size * tcfg.seq_len,
              "batch_size": tcfg.batch_size, "seq_len": tcfg.seq_len,
              "layers": base.num_layers, "hidden": base.hidden_size,
              "E": base.router.num_experts, "K": base.router.top_k, "F": base.ffn_size,
              "backend": backend or base.backend, "seed": tcfg.seed}
    rs = ResultSet("balance")
    arrays: dict[str, np.ndarray] = {}
    done: list[str] = []
    best_val, best_tc_val = math.inf, math.inf
    for s in runs:
        cfg = lm_config(base, s, backend)
        model = build_model(cfg, tcfg.seed, dev)
        t0 = time.perf_counter()
        res = train(model, corpus, tcfg, dev, progress=progress, desc=s.name)
        wall = time.perf_counter() - t0
        summ = res.summary()
        for metric, unit in SUMMARY_METRICS.items():
            rs.add(s.name, {**common, "label": s.label, **s.router}, metric, summ[metric], unit)
        rs.add(s.name, {**common, "label": s.label, **s.router}, "train_time_s", wall, "s")
        arrays.update(_history_arrays(s.name, res))
        done.append(s.name)
        meta = {"size": size, "device": device_name, "train": dataclasses.asdict(tcfg),
                "model": {k: v for k, v in dataclasses.asdict(base).items() if k != "router"},
                "router": BASE_ROUTER | {"num_experts": base.router.num_experts},
                "strategies": done, "labels": {r.name: r.label for r in runs},
                "source": corpus.source}
        rs.write(out)
        np.savez_compressed(out / "balance_history.npz", meta=np.array(json.dumps(meta)),
                            **arrays)
        label = f"{size} model trained on {device_name}, strategy {s.name}"
        if summ["val_loss"] < best_val:
            best_val = summ["val_loss"]
            save_checkpoint(model, out / "balance_model.pt", step=tcfg.steps - 1, strategy=s.name,
                            val_loss=summ["val_loss"])
        if cfg.router.routing == "token_choice" and summ["val_loss"] < best_tc_val:
            best_tc_val = summ["val_loss"]
            capture_trace(model, corpus, tcfg.seq_len, label=label, strategy=s.name
                          ).save(out / "lm_trace.npz")
        if s.name == "none":
            capture_trace(model, corpus, tcfg.seq_len, label=label, strategy=s.name
                          ).save(out / "lm_trace_none.npz")
        print(f"{s.name:>22}: val loss {summ['val_loss']:.4f}  imbalance "
              f"{summ['imbalance']:.2f}  drop {summ['drop_rate']:.3f}  dead "
              f"{summ['dead_experts']:.2f}  {summ['step_time_ms']:.1f} ms/step  ({wall:.1f} s)",
              flush=True)
        del model
    return summary_frame(out / "balance.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--strategies", default="", help="comma-separated names (default: all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="fit all runs in this many seconds (steps from a timed probe)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (overrides the size)")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=("torch", "triton"), default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    names = [n for n in a.strategies.split(",") if n]
    df = run_study(a.out, a.size, names or None, a.budget_s, a.steps, a.device, a.backend,
                   progress=not a.no_progress)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df)


if __name__ == "__main__":
    main()
