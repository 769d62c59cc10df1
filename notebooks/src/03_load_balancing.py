# %% [markdown]
# # 03 — Load balancing: every strategy on a small MoE language model trained on real text
#
# A router that learns freely tends to send most tokens to a few experts. That costs twice:
# **time**, because an MoE layer finishes when its most loaded expert does (a grouped GEMM, an
# expert-parallel rank, a capacity buffer are all sized by the maximum), and **quality**, because
# experts that receive nothing stop learning (dead experts) and a capacity limit then drops the
# overflow. The field has many remedies; this notebook trains the same model on the same text,
# with the same seed and token budget, once per remedy, and measures what each does:
#
# 1. the cost of imbalance in bytes and FLOPs;
# 2. the strategies and their formulas;
# 3. the model and the text;
# 4. the study at toy size on this machine (CPU, seconds);
# 5. the full-size study measured on an H200 (`results/h200/balance*`), rendered here;
# 6. routing traces of the trained model, which the benchmarks and the quantization study replay;
# 7. the conclusion: which strategy when.
#
# Shapes: T tokens, D hidden, E experts, K top-k, F expert width, C capacity, L MoE layers.

# %%
%matplotlib inline
import dataclasses
import math
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from routerlib.models import data, plots, study, traces
from routerlib.models.lm import MoETransformer

matplotlib.rcParams["figure.dpi"] = 80
pd.set_option("display.width", 160, "display.max_columns", 20, "display.precision", 3)
GPU = torch.cuda.is_available()
torch.set_num_threads(1)  # toy shapes on a CPU: threads only add overhead
RESULTS = traces.ROOT / "results"
print(f"device: {torch.cuda.get_device_name() if GPU else 'CPU'}; torch {torch.__version__}")

# %% [markdown]
# ## 1. What imbalance costs
#
# One MoE layer of the study's full-size model does 2·T·K·D·F·3 FLOPs of SwiGLU experts and moves
# each token's row to its K experts and back. With E experts computing in parallel (one GEMM
# group each, or one rank each under expert parallelism), the layer's time is set by the expert
# holding the most rows: a max/mean load of m makes the layer m times slower than balanced, and
# a capacity C = ⌈cf·T·K/E⌉ sized for balance drops everything above C.

# %%
full_lm, full_train = study.SIZES["full"]
D, F, E, K = full_lm.hidden_size, full_lm.ffn_size, full_lm.router.num_experts, full_lm.router.top_k
T = full_train.batch_size * full_train.seq_len
flops = 2 * T * K * D * F * 3
rows_bytes = 2 * T * K * D * 2  # dispatch + combine, bf16 rows
rows = []
for m in (1.0, 1.25, 2.0, 4.0):
    rows.append({"max/mean load": m, "rows on the busiest expert": int(m * T * K / E),
                 "layer time vs balanced": f"{m:.2f}x",
                 "slots dropped at cf=1.0 (if one expert has it all above C)":
                 f"{max(0.0, (m - 1) / E):.1%}"})
print(f"T={T} tokens a step, D={D}, F={F}, E={E}, K={K}: expert FLOPs {flops / 1e9:.2f} GFLOP "
      f"per layer forward, dispatch+combine {rows_bytes / 1e6:.1f} MB of bf16 rows")
display(pd.DataFrame(rows))

# %% [markdown]
# ## 2. The strategies
#
# With f_e the fraction of the T·K slots routed to expert e and P_e the mean router probability
# of e over the tokens:
#
# | strategy | what it does | formula / rule |
# |---|---|---|
# | none | plain top-K of the softmax, dropless | — |
# | Switch/GShard aux loss (coef α = 1e-3, 1e-2, 1e-1) | a differentiable push towards uniform | α · E · Σ_e f_e · P_e (1 when uniform) |
# | sequence-level aux loss (1e-2) | the same per sequence (DeepSeek-V3) | mean over sequences of the loss above |
# | z-loss (1e-3) | keeps router logits small (ST-MoE) | β · mean_t (logsumexp_e z_te)² |
# | jitter (ε = 1e-2) | multiplicative noise on the router input (Switch) | x · U(1-ε, 1+ε) |
# | capacity factor cf = 1.0 / 1.25 / 2.0 | each expert keeps at most C slots | C = ⌈cf · T · K / E⌉; drop by position (arrival), priority (highest weight first), or random |
# | expert choice (cf = 1.0) | each expert picks its C best tokens | balanced by construction; a token may get 0..E experts |
# | aux-loss-free bias (rate u = 1e-3) | a per-expert bias added for selection only (DeepSeek-V3) | b_e ← b_e + u · sign(mean load − load_e) after each step |
#
# Every run uses `routerlib.MoELayer` (`backend="torch"`, the reference) in every layer; only
# the `RouterConfig` changes (`routerlib.models.study.strategies()`).

# %%
display(pd.DataFrame([{"strategy": s.name, "description": s.label,
                       "router fields": ", ".join(f"{k}={v}" for k, v in s.router.items())}
                      for s in study.strategies()]))

# %% [markdown]
# ## 3. The model and the text
#
# A decoder-only transformer (`routerlib.models.MoETransformer`): token embedding tied to the
# output head, pre-norm blocks of RMSNorm → rotary attention (`scaled_dot_product_attention`) →
# RMSNorm → MoE layer of SwiGLU experts. The text is CPython's own documentation
# (`pydoc_data.topics`) and the standard library's sources, built once into the package (the
# same bytes on every machine), split by document, tokenized by a byte-level BPE of 4096 tokens
# trained with the `tokenizers` library on the training split.

# %%
corpus = data.load_corpus()
print(corpus.source)
print(f"{len(corpus.train):,} training tokens, {len(corpus.val):,} validation tokens, "
      f"vocabulary {corpus.vocab_size}")
full_cfg = dataclasses.replace(full_lm, vocab_size=corpus.vocab_size)
with torch.device("meta"):
    m = MoETransformer(full_cfg)
print(f"full size: {full_cfg.num_layers} layers, D={full_cfg.hidden_size}, "
      f"{full_cfg.num_heads} heads, E={E} experts of F={F}, top-{K}; "
      f"{m.num_params() / 1e6:.2f} M parameters, {m.num_params(active=True) / 1e6:.2f} M active "
      f"a token; {T} tokens a step")
print("a validation excerpt:\n" + "".join(data.token_pieces(corpus.val[:80])))

# %% [markdown]
# ## 4. The study at toy size (this machine)
#
# The same code at a size a CPU trains in seconds: 2 layers, D=64, 8 experts, 30 steps of 512
# tokens, a handful of strategies. At this size the numbers only show that the pipeline works;
# the evidence is the full-size run of section 5.

# %%
toy_dir = Path(tempfile.mkdtemp()) / "toy"
toy_names = ["none", "aux_1e-2", "aux_free_bias", "expert_choice", "cap1_position"]
toy = study.run_study(toy_dir, size="toy", names=toy_names, device="cpu", progress=False)
display(toy)
toy_meta, toy_hist = study.load_history(toy_dir / "balance_history.npz")
toy_tokens = toy_meta["train"]["batch_size"] * toy_meta["train"]["seq_len"]
display(plots.plot_losses(toy_hist, toy_tokens))
display(plots.plot_load_heatmaps(toy_hist, "none"))

# %% [markdown]
# ## 5. The full-size study on an H200
#
# `scripts/gpu_steps/balance.sh` runs `python -m routerlib.models.study --size full` on the lent
# GPU: every strategy, the same seed, the same number of steps (chosen from a timed probe so that
# all runs fit the step's budget), bf16 autocast. Its files are committed under `results/h200/`.

# %%
gpu_json = RESULTS / "h200" / "balance.json"
gpu_hist_file = RESULTS / "h200" / "balance_history.npz"
MEASURED = gpu_json.exists() and gpu_hist_file.exists()
if MEASURED:
    summary = study.summary_frame(gpu_json)
    meta, hist = study.load_history(gpu_hist_file)
    tokens_per_step = meta["train"]["batch_size"] * meta["train"]["seq_len"]
    print(f"{meta['device']}: {meta['train']['steps']} steps of {tokens_per_step} tokens per "
          f"strategy ({meta['train']['steps'] * tokens_per_step / 1e6:.2f} M tokens), "
          f"{len(hist)} strategies")
    display(summary)
else:
    print("The full-size study is not measured yet: no results/h200/balance.json. "
          "The plots below show the toy run of section 4 instead.")
    summary, meta, hist, tokens_per_step = toy, toy_meta, toy_hist, toy_tokens

# %% [markdown]
# ### Validation loss over training

# %%
display(plots.plot_losses(hist, tokens_per_step))

# %% [markdown]
# ### Per-expert load over training
#
# Each panel is one MoE layer; each row one expert; colour is the expert's share of the slots
# divided by the uniform share (1 = balanced, 0 = dead). Without balancing the load concentrates;
# the balancing strategies keep every row near 1.

# %%
for name in [n for n in ("none", "aux_1e-2", "aux_free_bias") if n in hist]:
    display(plots.plot_load_heatmaps(hist, name))

# %% [markdown]
# ### Imbalance, drops, dead experts, step time

# %%
display(plots.plot_summary(summary))
display(plots.plot_routing_over_steps(hist, "imbalance", ylabel="max / mean load (EMA)"))
caps = [n for n in hist if n.startswith("cap")]
if caps:
    display(plots.plot_routing_over_steps(hist, "drop_rate", names=caps,
                                          ylabel="dropped slots (fraction, EMA)"))

# %% [markdown]
# ## 6. Routing traces
#
# `routerlib.models.traces.load_trace()` reads the committed trace: the first validation tokens
# routed through the best token-choice model of the study, every layer's K experts and weights
# per token (uint8 ids, fp16 weights). Benchmarks, the quantization study and the explorer replay
# these real distributions instead of random logits. Its metadata says where it came from.

# %%
trace = traces.load_trace()
print(trace.meta["label"])
print(f"{trace.num_tokens} tokens, {trace.num_layers} layers, top-{trace.top_k} of "
      f"{trace.num_experts} experts")
load = np.stack([trace.load(layer) for layer in range(trace.num_layers)])  # [L, E]
display(plots.plot_trace_load(load, "expert load in the trace (sorted per layer)"))
pieces = trace.pieces[:24]
display(pd.DataFrame({"token": [repr(p) for p in pieces],
                      **{f"layer {layer} experts": [", ".join(map(str, ids)) for ids in
                                                    trace.topk_ids[layer, :24]]
                         for layer in range(trace.num_layers)}}))

# %% [markdown]
# ## 7. Conclusion: which strategy when
#
# Read from the full-size results (section 5); every number below comes from the result files.

# %%
if MEASURED:
    display(Markdown(study.conclusion(summary)))
else:
    display(Markdown("**Not measured yet**: the full-size study has not run on the GPU, so there "
                     "is no conclusion to draw; the toy run above only shows that every "
                     "strategy trains."))

# %% [markdown]
# ## Explore the trained router
#
# The checkpoint of the study's best run, re-routed live: pick a layer and a validation passage,
# then a strategy, capacity factor and K, and watch which tokens each expert keeps and which slots
# the capacity drops (red crosses).

# %%
from routerlib.widgets import text_routing_explorer  # noqa: E402

explorer = text_routing_explorer(results=str(RESULTS), capacity_factor=1.25)
explorer
