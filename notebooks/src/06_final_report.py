# %% [markdown]
# # 06 — Final report: what routerlib gained, and how
#
# routerlib routes the tokens of a Mixture-of-Experts layer: a readable PyTorch reference (the
# contract) and Triton kernels that compute the same integers and the same weights fast on Hopper
# GPUs, with the MoE layer, load balancing, quantization and expert parallelism built on them.
# This notebook is the summary a reader wants first: one table and one figure of what was gained
# over the baseline (the PyTorch reference) and over the peers (torch.compile, torchtitan,
# DeepSpeed, the Hugging Face expert loop), then one section per phase: the challenges and how
# they were solved, the trade-offs, a short example that runs here on a CPU, the limits and the
# work left.
#
# Every number below is read from a committed result file (`results/<card>/<bench>.json`, one
# row schema: `routerlib.bench.results`), printed with its card and commit; a benchmark that has
# not run yet says "not measured yet". Nothing is typed in. Shapes: T tokens, D hidden, E
# experts, K top-k, F expert width, C capacity.

# %%
import os

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run on the CPU, slowly

from routerlib import MoEConfig, MoELayer, RouterConfig, route  # noqa: E402
from routerlib import report_summary as rsum  # noqa: E402
from routerlib.bench.results import RESULTS  # noqa: E402

matplotlib.rcParams["figure.dpi"] = 80
pd.set_option("display.precision", 2)
pd.set_option("display.max_colwidth", 80)
CARD = "h200"  # the card whose committed results this report summarises
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__}; examples run on {DEVICE}; results from results/{CARD}/")

# %% [markdown]
# ## What was measured, and where
#
# The result files this report reads, with the card, the commit and the date of each run.

# %%
avail = rsum.availability(CARD)
display(avail)
missing = avail.loc[avail.status == "not measured yet", "bench"].tolist()
print("not measured yet: " + (", ".join(missing) if missing else "none"))

# %% [markdown]
# ## The summary: routerlib against the baseline and the peers
#
# One line per stage (the largest case each file measured): the baseline's time, routerlib's,
# the fastest peer measured in the same run, and the two ratios ("x" = times faster; above 1
# routerlib wins). The baseline is the PyTorch reference where the benchmark has one, the
# per-expert loop of Hugging Face's Mixtral block for the whole layer, and the stock model for
# the drop-in. The `source` column names the file, card, commit and date of each number.

# %%
table = rsum.gains(CARD)
head = rsum.headline(table)
if head.empty:
    print(f"not measured yet: no comparison file under results/{CARD}/")
else:
    show = head.assign(**{"x vs baseline": head.x_vs_baseline.map(rsum.fmt_ratio),
                          "x vs best peer": head.x_vs_peer.map(rsum.fmt_ratio)})
    display(show[["stage", "case", "metric", "baseline", "baseline_value", "routerlib",
                  "best_peer", "peer_value", "x vs baseline", "x vs best peer", "source"]])

# %% [markdown]
# Every case behind those lines (all shapes and sizes each file holds), same columns:

# %%
if not table.empty:
    display(table[["stage", "case", "metric", "baseline_value", "routerlib", "best_peer",
                   "peer_value", "x_vs_baseline", "x_vs_peer", "commit"]])

# %%
ax = rsum.plot_gains(head, title=f"routerlib's speed-up per stage (results/{CARD}/, sources above)")
plt.show()

# %% [markdown]
# The latency and bandwidth targets, judged in the targets run on the same inputs for
# every implementation (`meta.targets`):

# %%
verdicts = rsum.target_verdicts(CARD)
if rsum.result_path("targets", CARD) is None:
    print("targets: not measured yet")
elif verdicts.empty:
    print(f"results/{CARD}/targets.json holds no verdicts (no meta.targets in that run's file)")
else:
    display(verdicts)

# %% [markdown]
# ## 01 — Baseline: the reference is the contract
#
# **Challenge.** Routing is small in FLOPs and bytes (T·E scores, T·K ids) but the reference
# spends its time in many small kernels and in host synchronisations (`bincount`, `.item()`
# to size the buffers), so it cannot be captured in a CUDA graph and its latency is launch and
# host bound; dispatch and combine move T·K·D elements and should run at copy bandwidth.
#
# **How.** The reference (`routerlib/reference/`) is written for reading: score, top-K with
# ties to the lower index, a plan (counts, offsets, rank in expert, capacity dropping) and the
# gather/scatter; it fixes every integer the kernels must reproduce. Notebook 01 measures each
# stage against its floor (bytes / copy bandwidth).
#
# **Usage** (the reference on a toy batch):

# %%
cfg = RouterConfig(num_experts=6, top_k=2, score_func="softmax", capacity_factor=1.0,
                   drop_policy="priority")
logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))  # [T, E]
sel, plan = route(logits, cfg, backend="torch")
print("top-K ids [T, K]:\n", sel.topk_ids)
print("kept per expert:", plan.kept_counts.tolist(), "| dropped slots:", int(plan.num_dropped()))

# %% [markdown]
# **Limits.** The reference is the contract, not a fast path: it syncs with the host to size
# its buffers and launches one kernel per step.
#
# ## 02 — Triton kernels and fused experts
#
# **Challenges and how they were solved.**
# - *No sort, no host sync*: a per-tile expert histogram, a scan over the tiles and a stable
#   in-tile rank give every slot its row, so the route is graph-capturable and needs no
#   `argsort`.
# - *Top-K in registers*: packed integer keys (score bits high, reversed expert index low) make
#   one integer max give the best score and the lower index among ties, so ties match the
#   reference exactly.
# - *Dispatch and combine at copy bandwidth*: walk the tokens, not the rows: each program reads
#   x[t] once and writes its K rows (dispatch) or reads K rows and writes y[t] once with an
#   fp32 sum (combine); no atomics, so results are deterministic.
# - *Decode sizes*: D split over a second grid axis, and the route and the dispatch in one
#   launch up to 16 tokens.
# - *Fused experts*: gather, both expert GEMMs and the weighted combine over a per-expert tile
#   map, against `torch._grouped_mm` compositions (`routerlib/kernels/experts.py`).
#
# **Trade-off: fusion against flexibility.** The fast inference route covers token choice with
# position dropping, K ≤ 8 and E ≤ 512 without loss sums (`kernels.fast_route.applies`); every
# other configuration (groups, priority dropping, training with loss sums) takes the general
# kernels (`kernels/topk.py` + `kernels/plan.py`), slower but complete. Fused experts save the
# round trips through memory of the expert buffer, at the cost of one tile map shape per launch.
#
# **Check** (the kernels against the reference on the same toy batch: integers equal, weights to
# fp32 rounding; on a CPU the Triton interpreter runs them):

# %%
sel_t, plan_t = route(logits.to(DEVICE), cfg, backend="triton")
same_ids = torch.equal(sel_t.topk_ids.cpu(), sel.topk_ids)
same_rows = torch.equal(plan_t.slot_to_row.cpu(), plan.slot_to_row)
w_err = (sel_t.topk_weights.cpu().float() - sel.topk_weights.float()).abs().max().item()
print(f"ids equal: {same_ids}; rows equal: {same_rows}; max weight difference {w_err:.1e}")

# %%
experts = rsum.bench_rows("experts", CARD, columns=("variant", "shape", "mode", "T", "time_us",
                                                   "x_floor", "peak_mem_mb", "rel_err"))
if experts is None:
    print(f"whole layer and fused experts (experts.json): not measured yet on {CARD}")
else:
    display(experts.dropna(subset=["time_us"]))

# %% [markdown]
# **Limits and future work.** The eager route is bound by the Python host path (tens of µs
# for a few µs of device work); the graph route misses the 10 µs target at T=16384 (see the
# verdicts above). Next: a persistent kernel for the decode path (one launch for route,
# experts and combine), and a backward for the fp8 fused experts (inference only today).
#
# ## 03 — Load balancing
#
# **Challenge.** Without balancing a few experts take most tokens: with a capacity they drop
# tokens, without one they become the step's straggler. **How.** The Switch/GShard auxiliary
# loss, the sequence loss and the z-loss (fused sums in the top-K kernel), the DeepSeek-V3
# bias update (in place, no gradient) and expert choice (each expert picks its C tokens: no
# drops by construction, `kernels/expert_choice.py`), compared on a small MoE language model
# (`routerlib.models.study`).
#
# **Trade-off: capacity against drops.** A capacity factor bounds each expert's buffer (E·C
# rows) and the step's time, and drops the slots beyond it; dropless routing loses nothing but
# its buffer and time follow the hottest expert. The example: the same skewed logits at three
# capacity factors.

# %%
skew = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
skew[:, :2] += 1.5  # two hot experts
drop_rows = []
for cf in (1.0, 1.5, None):
    c = RouterConfig(num_experts=8, top_k=2, capacity_factor=cf, drop_policy="position")
    _, p = route(skew, c, backend="torch")
    drop_rows.append(dict(capacity_factor=cf or "dropless", dropped_slots=int(p.num_dropped()),
                          rows_of_buffer=int(p.kept_counts.sum()),
                          hottest_expert_load=int(p.expert_counts.max())))
display(pd.DataFrame(drop_rows))

# %%
balance = rsum.bench_rows("balance", CARD, columns=(
    "variant", "label", "steps", "val_loss", "val_ppl", "imbalance", "cv", "drop_rate",
    "dead_experts", "step_time_ms"))
if balance is None:
    print(f"load-balancing study on the GPU (balance.json): not measured yet on {CARD} "
          "(notebook 03 renders its CPU run)")
else:
    display(balance)

# %% [markdown]
# **Limits and future work.** The study trains a small model for the few steps its GPU budget
# allowed (the `steps` column), not a production run: its ranking of the strategies holds for
# that model and budget; longer runs and several seeds would make it firmer.
#
# ## 04 — Quantization
#
# **Challenge.** A router in int8/fp8 saves little time (the gate GEMM is small) but can flip
# routing decisions; the token payload of dispatch and the expert GEMMs are where the bytes and
# FLOPs are. **How.** `routerlib.quant` measures what each precision costs in routing decisions
# (flip rate, Jaccard overlap, load shift) and in the layer's output, and quantizes the
# dispatched rows (fp8 / int8 with a scale per row or group) inside the dispatch kernel.
#
# **Trade-off: precision against agreement.** Tokens whose K-th and (K+1)-th scores are close
# flip first; the example routes the same tokens with an fp32 and an int8 gate:

# %%
from routerlib.quant import compare_routers, gate_inputs, set_router_precision  # noqa: E402

qcfg = RouterConfig(num_experts=16, top_k=2)
layer = MoELayer(MoEConfig(hidden_size=64, ffn_size=128, router=qcfg, backend="torch"))
x, w = gate_inputs("random", T=512, D=64, E=16, dtype=torch.float32)
with torch.no_grad():
    layer.router.gate.weight.copy_(w)
quant_layer = MoELayer(MoEConfig(hidden_size=64, ffn_size=128, router=qcfg, backend="torch"))
quant_layer.load_state_dict(layer.state_dict())
set_router_precision(quant_layer, "int8")
agr = compare_routers(layer.router, quant_layer.router, x, layer=layer)
display(pd.DataFrame([agr.summary()]))

# %%
quant = rsum.bench_rows("quant", CARD, columns=(
    "variant", "part", "shape", "inputs", "what", "group", "T", "D", "E", "K", "flip_rate",
    "jaccard", "load_shift", "output_error", "router_time_us", "time_us", "frac_of_roof",
    "speedup_vs_bf16", "output_error_vs_bf16"))
if quant is None:
    print(f"router precision, payload and fp8 experts on the GPU (quant.json): not measured yet "
          f"on {CARD}")
else:
    display(quant)

# %% [markdown]
# **Limits and future work.** The fp8 experts are inference only (no backward yet) and need D and
# F multiples of 128; a low-precision router GEMM that the torch build refuses on a device runs
# its exact emulation there (slower, same numbers, and the benchmark says so).
#
# ## 05 — Multi-GPU: expert parallelism
#
# **Challenge.** When the experts do not fit one GPU, every token's row crosses the wire twice
# (dispatch and combine all-to-alls). **How.** `routerlib.parallel.EPMoELayer` sends a token once
# to each GPU that holds one of its experts (deduplication) with its routing metadata in the same
# payload (optionally fp8), and is checked against the single-process layer on gloo ranks. No
# multi-GPU machine was lent, so the multi-GPU numbers are the simulator's, calibrated on H200
# all-to-all measurements: predictions, not measurements.

# %%
from routerlib.parallel import simulator as sim  # noqa: E402

plan_rows = sim.plan_table(sim.SHAPES["deepseek-v3"], [8, 16], sim.calibrated_h200(),
                           tokens_per_rank=1024, sample=512)
cols = ["world", "payload", "dedup", "dispatch", "round_trip_ratio", "imbalance", "t_layer_us"]
display(pd.DataFrame(plan_rows)[cols].rename(columns={
    "dispatch": "dispatch B/token", "t_layer_us": "predicted layer us"}))
print("multi-GPU measurements: not measured yet (no multi-GPU machine lent)")

# %% [markdown]
# **Limits and future work.** Run the EP layer on 2-8 GPUs over NCCL, then overlap the
# all-to-alls with the expert GEMMs (the simulator's chunked pipeline).
#
# ## Integration: generation and the Hugging Face drop-in
#
# **How.** `routerlib.models.generate.Generator` decodes the small MoE language model with a
# static KV cache (a CUDA graph on a GPU); `routerlib.integrations.hf.apply_routerlib` swaps the
# sparse MoE blocks of a transformers model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3)
# for routerlib's layer sharing the same weights. The example: a two-layer Mixtral of random
# weights, its logits with and without routerlib.

# %%
import importlib.util  # noqa: E402

if importlib.util.find_spec("transformers") is None:
    print("transformers is not installed here (pip install 'routerlib[hf]'): example skipped")
else:
    import transformers

    from routerlib.integrations.hf import apply_routerlib, count_routerlib_blocks, small_config

    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(small_config("mixtral")).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref_logits = hf_model(ids).logits
        apply_routerlib(hf_model, backend="torch")
        rl_logits = hf_model(ids).logits
    print(f"{count_routerlib_blocks(hf_model)} blocks replaced; max |logit difference| "
          f"{(rl_logits - ref_logits).abs().max().item():.1e}")

# %%
shown = {"inference": ("variant", "B", "latency_p50_us", "latency_p99_us", "tokens_per_s",
                       "prefill_ms", "captured"),
         "hf_dropin": ("variant", "model", "T", "B", "forward_ms", "generate_tokens_per_s",
                       "forward_speedup", "generate_speedup")}
for bench, cols in shown.items():
    df = rsum.bench_rows(bench, CARD, columns=cols)
    if df is None:
        print(f"{bench}.json: not measured yet on {CARD}")
    else:
        display(df)

# %% [markdown]
# ## Conclusion
#
# The table above is the answer: each line's ratio against the reference and against the best
# peer, from the file, card and commit beside it. Where routerlib misses a target the verdicts
# say so; where a benchmark has not run yet the report says "not measured yet" rather than
# guessing. The design decisions behind the numbers, and what was tried and dropped, are in
# `docs/architecture.md` and `docs/decisions.md`.

# %%
if not head.empty:
    lines = [f"- {r.stage} ({r.case}): {rsum.fmt_ratio(r.x_vs_baseline)} vs {r.baseline}"
             + (f", {rsum.fmt_ratio(r.x_vs_peer)} vs {r.best_peer}" if r.best_peer else "")
             + f" [{r.source}]" for r in head.itertuples()]
    print("\n".join(lines))
print(f"result files read from {RESULTS.name}/{CARD}/")

# %% [markdown]
# ## Explore the routing
#
# The trained small model's router on its validation text, re-routed with the settings you pick
# (layer, passage, strategy, capacity factor, K, precision, backend): the trade-off between
# capacity and drops, token by token.

# %%
from routerlib.widgets import text_routing_explorer  # noqa: E402

explorer = text_routing_explorer(results=str(RESULTS), capacity_factor=1.25)
explorer
