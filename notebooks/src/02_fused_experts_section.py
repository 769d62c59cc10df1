# %% [markdown]
# ## The fused MoE experts: grouped GEMMs that read tokens through the plan
#
# Routing decides where each token goes; the experts are where the FLOPs are. The straightforward
# layer copies every token into an expert-major buffer (dispatch), runs two grouped GEMMs, then
# reads the buffer back for the weighted K-way sum (combine). At the Qwen3-30B-A3B shape the two
# copies move as many bytes as the expert weights, and training keeps the dispatched copy alive
# for the backward. `routerlib.kernels.experts` removes both:
#
# | launch | reads | writes | epilogue |
# | --- | --- | --- | --- |
# | up `x[token(r)] @ W_gu[e]` | x via `row_to_slot`, W_gu | h (R·F); [g \| u] (training) | SwiGLU |
# | down `h[r] @ W_d[e]` | h, W_d | o (R·D) | × combine weight |
# | sum `Σ_j o[slot_to_row[t, j]]` | o | y (T·D) | fp32, a program a token |
#
# The K-way sum runs in fp32 with one program per token: deterministic, no float atomics.
#
# The cell below counts FLOPs and bytes for the model shapes of the benchmark.

# %%
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from routerlib import RouterConfig  # noqa: E402
from routerlib import reference as ref  # noqa: E402
from routerlib.bench.configs import SHAPES  # noqa: E402
from routerlib.bench.experts import PREFILL  # noqa: E402
from routerlib.bench.results import to_frame  # noqa: E402
from routerlib.kernels import experts as kx  # noqa: E402
from routerlib.reference.experts import experts as ref_experts  # noqa: E402

rows = []
for name, T in PREFILL.items():
    s = SHAPES[name]
    D, E, K, F = s.hidden, s.num_experts, s.top_k, s.ffn
    flops = 6 * T * K * D * F
    weights = E * 3 * D * F * 2
    copy = T * K * D * 2  # one dispatched copy of the tokens (bf16)
    rows.append(dict(shape=name, T=T, TFLOP=flops / 1e12, weights_GB=weights / 1e9,
                     dispatch_copy_GB=copy / 1e9,
                     ms_at_800_TFLOPs=flops / 800e12 * 1e3,
                     ms_per_copy_at_4_TBs=2 * copy / 4.2e12 * 1e3))
pd.DataFrame(rows).round(3)

# %% [markdown]
# Each dispatched copy (written once, read once) costs 0.5 ms at Qwen3's T=32768, against ~3 ms
# of GEMMs at the matmul roof: dispatch and combine together would add a third.
#
# **The tile map.** Expert e owns ceil(rows_e / BLOCK_M) consecutive row tiles. Each program
# loads the E row counts, takes their cumulative sum in registers and finds its expert: no tile
# map tensor, no host sync, and an expert without rows owns no tile. The grid is a bound that
# depends on shapes only, min(ceil(T·K / BLOCK_M) + E, E · ceil(C / BLOCK_M)); programs past the
# last tile return at once. So the launches can be captured in a CUDA graph, and the rows
# computed exceed the rows used only by the last partial tile of each expert (the padding waste).

# %%
torch.manual_seed(0)
cfg = RouterConfig(num_experts=6, top_k=2)
T, D, F = 40, 48, 32
logits = torch.randn(T, 6)
logits[:, 5] -= 50  # expert 5 gets no token
sel = ref.select(logits, cfg)
plan = ref.build_plan(sel, cfg)
bm = 16
tiles = (plan.kept_counts + bm - 1) // bm
print("rows per expert   ", plan.kept_counts.tolist())
print(f"tiles (BLOCK_M={bm})", tiles.tolist(), "-> first tile of each expert",
      (tiles.cumsum(0) - tiles).tolist())
print("grid bound", kx.tile_bound(T, 2, 6, plan.num_rows, T, bm), "programs over M;",
      f"padding waste {kx.padding_waste(plan.kept_counts, bm).item():.2f}x rows computed / used")

# %% [markdown]
# **Backward, with little saved.** Training saves x, the weights, the plan and the
# pre-activations [g | u] (R·2F), and nothing else: no dispatched copy of x (the weight-gradient
# GEMM gathers x through the plan again) and no h or o (recomputed from [g | u] where needed).
#
# 1. `acc = dy[token(r)] @ W_d[e]^T` (a Triton grouped GEMM reading dy through the plan); the
#    epilogue recomputes h and writes [dg | du] and the per-tile partial dots `<acc, h>`, whose
#    sum is d(combine weight) = <dy, unweighted output>;
# 2. `dW_d[e] = h_e^T (w·dy)_e` and `dW_gu[e] = x_e^T [dg | du]_e`: grouped A^T·B over each
#    expert's rows (an expert without rows gets zeros);
# 3. `dx` rows = [dg | du] @ W_gu[e]^T, summed per token in fp32 like the forward.
#
# Steps 2 and 3 are plain grouped GEMMs over expert-sorted rows, the one thing a library does
# well: on a CUDA GPU in bf16 they run in `torch._grouped_mm` (`offs` over the row dimension gives
# the per-expert A^T·B), fed by the dispatch kernel's gathered rows of x and of w·dy (one [R, D]
# buffer at a time, freed at once) and h stored by step 1's epilogue. A Triton A^T·B kernel that
# loops over each expert's rows serves fp16, fp32 and the interpreter (the check below); on an
# H200 it was 2-4x slower than the library, having one program per output tile for all of an
# expert's rows (Mixtral: 8 experts, few programs).
#
# The check below runs the kernels (under the Triton interpreter on a CPU) against the readable
# reference (`routerlib.reference.experts`: dispatch, one SwiGLU per expert in fp32, combine),
# forward and backward, with an empty expert and tiles spanning several blocks.

# %%
x = torch.randn(T, D, requires_grad=True)
w_gate_up = (torch.randn(6, D, 2 * F) / D**0.5).requires_grad_()
w_down = (torch.randn(6, F, D) / F**0.5).requires_grad_()
weights = sel.topk_weights.clone().requires_grad_()
dy = torch.randn(T, D)
leaves = (x, w_gate_up, w_down, weights)
y = kx.fused_experts(x, plan, weights, w_gate_up, w_down)
y_ref = ref_experts(x, plan, weights, w_gate_up, w_down)
grads = torch.autograd.grad(y, leaves, dy)
grads_ref = torch.autograd.grad(y_ref, leaves, dy)
check = {"y": (y - y_ref).abs().max().item()}
for name, g, gr in zip(("dx", "dW_gate_up", "dW_down", "d(weights)"), grads, grads_ref):
    check[name] = (g - gr).abs().max().item()
print({k: f"{v:.1e}" for k, v in check.items()})
assert max(check.values()) < 1e-4

# %% [markdown]
# Activation memory saved for the backward, per layer at Qwen3's T=32768 (bf16): the
# composition keeps the dispatched rows (R·D), the up-projection output (R·2F), the activation
# (R·F) and the expert output (R·D); the fused experts keep [g | u] (R·2F). Their backward then
# allocates [dg | du] (R·2F) and h (R·F), plus one [R, D] row buffer at a time.

# %%
s = SHAPES["qwen3-30b-a3b"]
R = PREFILL[s.name] * s.top_k
composition = R * (2 * s.hidden + 3 * s.ffn) * 2
fused = R * 2 * s.ffn * 2
print(f"saved activations: composition {composition / 2**30:.2f} GiB, fused {fused / 2**30:.2f} "
      f"GiB ({fused / composition:.0%})")
transient = R * (3 * s.ffn + s.hidden) * 2
print(f"fused backward's largest transient buffers together: {transient / 2**30:.2f} GiB")

# %% [markdown]
# ### Measured on an H200
#
# `python -m routerlib.bench.experts --sweep` (GPU step `experts`) times the whole layer and the
# experts alone against the torch composition (top-k, argsort, index_select, `torch._grouped_mm`,
# index_add), the per-expert loop of Hugging Face's Mixtral block and `torch._grouped_mm` on the
# experts alone, in one run; decode (T=64) in CUDA graphs.

# %%
RESULT = Path("..") / "results" / "h200" / "experts.json"
if not RESULT.exists():
    print(f"not measured yet: {RESULT} does not exist (run the GPU step 'experts')")
else:
    df = to_frame(RESULT)
    runs = df[df.variant.isin(["routerlib", "routerlib_batched", "torch_composition", "hf_loop",
                               "grouped_mm_experts", "routerlib_experts"])]
    for metric, unit in (("time_us", "us"), ("tflops", "TFLOP/s"), ("peak_mem_mb", "MiB")):
        t = runs[runs.metric == metric].pivot_table(index=["shape", "mode"], columns="variant",
                                                     values="value").dropna(axis=1, how="all")
        if t.empty:
            continue
        ax = t.plot.bar(figsize=(11, 3.6), logy=metric == "time_us", rot=20)
        ax.set_ylabel(f"{metric} ({unit})")
        ax.set_title(f"MoE layer on an H200: {metric}")
        plt.show()
    targets = df[(df.variant == "target")]
    print(targets.pivot_table(index=["target", "need"], columns="metric", values="value"))

# %% [markdown]
# Where the time goes at decode: the layer reads each used expert's weights once (one row tile per
# expert at BLOCK_M=16); its target is 1.15x the time of reading those bytes at the measured copy
# bandwidth. At prefill the GEMMs are compute bound and the fused layer's gain comes from the
# copies and the sort it does not do; at the Mixtral shape (8 experts of 14336) the experts
# dominate and the margin is the routing around them.
