# %% [markdown]
# # 04 — Quantization and mixed precision: what precision costs in routing decisions
#
# Precision decides which experts a token goes to. A gate GEMM in lower precision moves every
# logit a little; where the K-th and (K+1)-th scores of a token are closer than that, its top-K
# set flips and the token is computed by a different expert. Serving stacks run MoE layers in
# fp8 with block scales; this notebook measures, for each precision path routerlib offers:
#
# 1. the bytes each path moves (gate, dispatched payload, expert weights);
# 2. how often its top-K set differs from the fp32 router's, and where (the margin between the
#    K-th and (K+1)-th score), with the routing-agreement harness `routerlib.quant.agreement`;
# 3. the quantized token payload (fp8 / int8 rows quantized inside the dispatch) and the fp8
#    experts (e4m3 weights in 128×128 blocks, activations in 1×128 groups);
# 4. a toy model's validation loss with its router, payload and experts in each precision;
# 5. speed and bytes measured on the lent H200 (`results/h200/quant.json`), the trade-off plot
#    and a recommendation that reads its numbers from that file.
#
# Shapes: T tokens, D hidden, E experts, K top-k, F expert width, R buffer rows.

# %%
import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

from routerlib import MoEConfig, MoELayer, Router, RouterConfig
from routerlib import reference as ref
from routerlib.bench.results import to_frame
from routerlib.quant import (
    PRECISIONS,
    compare_routers,
    gate_inputs,
    moe_forward_quantized,
    payload_bytes,
    quantize_dispatch_reference,
    set_router_precision,
    summary,
)
from routerlib.quant.agreement import relative_error
from routerlib.quant.toy import ToyConfig, toy_loss, train_toy
from routerlib.report import ROOT

matplotlib.rcParams["figure.dpi"] = 80
torch.set_num_threads(1)  # small CPU sizes: one thread is faster than contended ones
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
RESULT = ROOT / "results" / "h200" / "quant.json"
print(f"device: {torch.cuda.get_device_name() if GPU else 'CPU'}; torch {torch.__version__}")

# %% [markdown]
# ## 1. The bytes of each path
#
# At T=16384, D=4096, E=128, K=8: the gate GEMM reads x (T·D) and the weight (E·D) and writes
# fp32 logits (T·E·4); the dispatch reads x once and writes T·K rows; the experts read their
# weights (E·3·D·F). A format with s bytes an element moves s/2 of bf16's bytes for the parts it
# stores — but x is read in bf16 by every dispatch, so the payload's total saving stops at
# (2 + 2K) / (2 + K) = 1.8× for K=8, and the buffer the experts or an all-to-all read shrinks 2×.

# %%
T, D, E, K = 16384, 4096, 128, 8
rows = []
for name, s in (("fp32", 4), ("bf16 / fp16", 2), ("int8 / fp8", 1)):
    rows.append({"stage": "gate weight [E, D]", "format": name, "MB": E * D * s / 1e6})
for fmt in (None, "fp8"):
    for group in ((None,) if fmt is None else (None, 128)):
        b = payload_bytes(T, D, K, fmt, group)
        label = "bf16" if fmt is None else f"{fmt}, scales per {'token' if group is None else '128'}"
        rows.append({"stage": "dispatch (read + write)", "format": label, "MB": b["total"] / 1e6})
for shape, (d, f, e) in {"Qwen3-30B-A3B": (2048, 768, 128), "DeepSeek-V3": (7168, 2048, 256)}.items():
    for name, s in (("bf16", 2), ("fp8 + 128x128 scales", 1 + 4 / 128**2)):
        rows.append({"stage": f"expert weights {shape}", "format": name, "MB": e * 3 * d * f * s / 1e6})
display(pd.DataFrame(rows).round(1))

# %% [markdown]
# ## 2. The reference: a router in each precision, against fp32
#
# `routerlib.quant.QuantGate` computes the logits in a chosen precision and hands fp32 logits to
# the softmax and top-K (which stay fp32 in every path); `set_router_precision(model, p)` swaps
# the gate of every Router in a model, sharing its trained weight. The harness
# `compare_routers(a, b, x, layer)` runs both on the same tokens and reports the top-K set flip
# rate, the Jaccard overlap, the weight L1 error, the load shift and the layer's output error.
#
# Two kinds of operands: **bf16** tokens and weights (serving a bf16 model: rounding them to
# bf16 changes nothing, only the logits' rounding and summation order remain) and **fp32**
# tokens and weights (an fp32 model or hidden state: the operands' rounding counts too).

# %%
Tn, Dn, En, Kn, Fn = (16384, 4096, 128, 8, 1024) if GPU else (2048, 256, 64, 8, 128)
cfg = RouterConfig(num_experts=En, top_k=Kn, renormalize=True)
layer = MoELayer(MoEConfig(hidden_size=Dn, ffn_size=Fn, router=cfg), device=DEVICE).eval()
table, agreements = [], {}
for inputs, kind, dtype in (("bf16", "random", torch.bfloat16), ("fp32", "random", torch.float32),
                            ("skewed bf16", "skewed", torch.bfloat16)):
    x, w = gate_inputs(kind, Tn, Dn, En, seed=1, dtype=dtype, device=DEVICE)
    lay = layer.to(dtype)
    base = Router(Dn, cfg, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        base.gate.weight.copy_(w)
        lay.router.gate.weight.copy_(w)
    routers = {}
    for p in PRECISIONS:
        routers[p] = Router(Dn, cfg, device=DEVICE, dtype=dtype)
        routers[p].load_state_dict(base.state_dict())
        set_router_precision(routers[p], p)
    for p in PRECISIONS:
        agr = compare_routers(routers["fp32"], routers[p], x, lay)
        agreements[(inputs, p)] = agr
        table.append({"inputs": inputs, "precision": p, **agr.summary()})
agreement_table = pd.DataFrame(table).drop(columns="tokens")
display(agreement_table.style.format({"flip_rate": "{:.3%}", "jaccard": "{:.5f}",
                                      "weight_l1": "{:.2e}", "load_shift": "{:.3%}",
                                      "margin_p1": "{:.4f}", "margin_p50": "{:.3f}",
                                      "output_error": "{:.2e}"}))

# %% [markdown]
# On bf16 operands the mixed-precision gates (bf16, fp16: 16-bit products accumulated and written
# in fp32) differ from fp32 only in the summation order, so a flip needs a margin below fp32's
# rounding. The naive bf16 gate, whose logits are rounded to bf16 before the softmax, flips
# tokens; so do the int8 and fp8 gates, whose operands are rounded to 8 bits. On fp32 operands
# the rounding of x and W to 16 bits counts too: fp16 (11-bit mantissa) flips fewer than bf16.
#
# ## 3. Where flips happen: the margin between the K-th and (K+1)-th score
#
# A flip needs a logit error larger than the token's margin. The histogram shows the margins of
# all tokens and of the flipped ones (fp8 gate, fp32 operands).

# %%
agr = agreements[("fp32", "fp8")]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].hist(agr.margins, bins=60, color="0.7", label="all tokens")
axes[0].hist(agr.margins[agr.flipped], bins=60, color="C3", label="top-K set flipped")
axes[0].set(xlabel="margin: K-th minus (K+1)-th logit", ylabel="tokens", yscale="log",
            title="fp8 gate vs fp32 (fp32 operands)")
axes[0].legend()
edges = [0, 0.001, 0.003, 0.01, 0.03, 0.1, 10]
for p in ("bf16_logits", "int8", "fp8"):
    t = agreements[("fp32", p)].flips_by_margin(edges)
    axes[1].plot(range(len(t)), t["flip_rate"] * 100, marker="o", label=p)
axes[1].set_xticks(range(len(edges) - 1),
                   [f"[{a:g}, {b:g})" for a, b in zip(edges[:-1], edges[1:])], rotation=30)
axes[1].set(xlabel="margin bin (logit units)", ylabel="tokens flipped (%)",
            title="flip rate by margin (fp32 operands)")
axes[1].legend()
fig.tight_layout()
display(agr.flips_by_margin(edges))

# %% [markdown]
# ## 4. The quantized payload and the fp8 experts
#
# `routerlib.quant.quantize_dispatch(x, plan, fmt, group, backend)` writes the dispatched rows
# as e4m3 or int8 with one fp32 scale per row (per token) or per 128 columns, in the plan's
# expert-major order. Its Triton kernel (`routerlib/kernels/quant.py`) reads x once and
# quantizes on the way; its codes and scales equal the reference below bit for bit (the tests
# check it, under the interpreter on a CPU and on the GPU). Empty rows hold code 0 with scale 0.
# The layer's output error with each payload, against the bf16/fp32 dispatch:

# %%
with torch.no_grad():
    xl = gate_inputs("random", 2048, Dn, En, seed=3, dtype=torch.float32, device=DEVICE)[0]
    lay32 = layer.float()
    routed = lay32.router(xl)
    y_ref = moe_forward_quantized(lay32, xl, None, backend="torch", routed=routed)
    rows = []
    for fmt in ("fp8", "int8"):
        for group in (None, 128):
            q, s = quantize_dispatch_reference(xl, routed.plan, fmt, group)
            y = moe_forward_quantized(lay32, xl, fmt, group, backend="torch", routed=routed)
            rows.append({"payload": fmt, "scales": "per token" if group is None else "per 128",
                         "codes": str(q.dtype).replace("torch.", ""), "scale shape": tuple(s.shape),
                         "layer output error": relative_error(y, y_ref)})
display(pd.DataFrame(rows).style.format({"layer output error": "{:.3%}"}))

# %% [markdown]
# The fp8 experts (`routerlib/kernels/experts_fp8.py`) keep the fused experts' tile map and
# schedule and change the operands: e4m3 weights with one scale per 128×128 block, tokens
# quantized in 1×128 groups, fp32 accumulation (each 128-deep step scaled by its two scales),
# SwiGLU's output quantized to e4m3 in the up GEMM's epilogue. Its reference in torch, against
# the exact experts:

# %%
from routerlib.kernels.experts_fp8 import Fp8ExpertWeights, fp8_experts_reference  # noqa: E402
from routerlib.reference.experts import experts as exact_experts  # noqa: E402

with torch.no_grad():
    fw = Fp8ExpertWeights.from_weights(lay32.experts.w_gate_up, lay32.experts.w_down)
    w8 = routed.topk_weights
    y8 = fp8_experts_reference(xl, routed.plan, w8, fw)
    y_exact = exact_experts(xl, routed.plan, w8, lay32.experts.w_gate_up, lay32.experts.w_down)
print(f"fp8 experts: output error {relative_error(y8, y_exact):.2%} against the fp32 experts; "
      f"weights {fw.nbytes() / 1e6:.1f} MB instead of "
      f"{(lay32.experts.w_gate_up.numel() + lay32.experts.w_down.numel()) * 2 / 1e6:.1f} MB in bf16")

# %% [markdown]
# ## 5. A toy model's validation loss in each precision
#
# No trained language model checkpoint or routing trace exists in routerlib yet, so this section
# uses a **toy model**: one MoE layer with a residual and a linear head, trained in seconds on a
# CPU to classify points of a 16-component Gaussian mixture (`routerlib.quant.toy`). Its losses
# say how a small trained router reacts to each precision; they are not a language model's.

# %%
toy = train_toy(ToyConfig())
print(f"toy: trained {toy.cfg.steps} steps, train loss {toy.train_loss[0]:.2f} -> "
      f"{toy.train_loss[-1]:.2f}")
cases = [("fp32 (reference)", {})] + [(f"router {p}", {"router": p}) for p in PRECISIONS[1:]]
cases += [("payload fp8", {"payload": "fp8"}), ("payload int8", {"payload": "int8"}),
          ("experts fp8", {"experts": "fp8"}),
          ("router fp8 + experts fp8", {"router": "fp8", "experts": "fp8"})]
losses = pd.DataFrame([{"path": n, "validation loss": toy_loss(toy, **kw)} for n, kw in cases])
losses["change vs fp32"] = losses["validation loss"] - losses["validation loss"].iloc[0]
display(losses.style.format({"validation loss": "{:.4f}", "change vs fp32": "{:+.4f}"}))

# %% [markdown]
# ## 6. Speed and bytes on the H200, the trade-off and the recommendation
#
# `python -m routerlib.bench.quant` (GPU step `scripts/gpu_steps/quant.sh`) times each router
# path on a real-sized gate (T=16384; D=4096 E=128 and DeepSeek-V3's D=7168 E=256), the payload
# dispatch (T=16384 D=4096 K=8) and the fp8 experts against the bf16 fused experts (T=32768),
# and writes `results/h200/quant.json`.

# %%
if RESULT.exists():
    df = to_frame(RESULT)
    print(f"results: {RESULT.relative_to(ROOT)}")
    display(summary.router_table(df).round(5))
    display(summary.payload_table(df).round(4))
    display(summary.experts_table(df).round(3))
else:
    df = None
    print(f"GPU results: not measured yet ({RESULT.relative_to(ROOT)} does not exist). The speed "
          "columns below stay empty until the H200 run is committed; the accuracy above is "
          "measured here.")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
acc = agreement_table[agreement_table["inputs"] == "fp32"].set_index("precision")
if df is not None and not summary.router_table(df).empty:
    rt = summary.router_table(df)
    rt = rt[rt["shape"] == rt["shape"].iloc[0]]
    for _, r in rt.iterrows():
        axes[0].scatter(r["router_us"], max(r["flip_fp32_inputs"], 1e-6) * 100, s=40)
        axes[0].annotate(r["variant"], (r["router_us"], max(r["flip_fp32_inputs"], 1e-6) * 100))
    axes[0].set(xlabel="gate + route time (us, H200)", yscale="log",
                ylabel="tokens whose top-K set flips (%)", title=f"router paths, {rt['shape'].iloc[0]}")
else:
    axes[0].bar(acc.index, acc["flip_rate"] * 100, color="C0")
    axes[0].set(ylabel="tokens whose top-K set flips (%)",
                title="router paths (accuracy only: speed not measured yet)")
    axes[0].tick_params(axis="x", rotation=30)
if df is not None and not summary.payload_table(df).empty:
    pt = summary.payload_table(df)
    for _, r in pt.iterrows():
        err = r.get("layer_output_error", float("nan"))
        y = 0.0 if r["variant"] == "bf16" else err * 100
        axes[1].scatter(r["time_us"], y, s=40)
        axes[1].annotate(f"{r['variant']} ({r['group']})", (r["time_us"], y))
    axes[1].set(xlabel="dispatch time (us, H200, quantization included)",
                ylabel="layer output error (%)", title="payload formats, T=16384 D=4096 K=8")
else:
    axes[1].set(title="payload formats: speed not measured yet")
    axes[1].axis("off")
fig.tight_layout()

# %% [markdown]
# ### Recommendation
#
# Read from the measured rows (`routerlib.quant.summary.recommendation`); the target of the
# mixed-precision router is the fp32 top-K set for at least 99.9% of tokens.

# %%
if df is not None:
    for line in summary.recommendation(df):
        print("-", line)
else:
    mixed = agreement_table[(agreement_table["inputs"] == "fp32")
                            & agreement_table["precision"].isin(["bf16", "fp16"])]
    print("- speed: not measured yet; accuracy measured here (CPU sizes):")
    for _, r in mixed.iterrows():
        print(f"  the {r['precision']} mixed-precision gate flips {r['flip_rate']:.3%} of tokens on "
              f"fp32 operands, {agreements[('bf16', r['precision'])].flip_rate:.3%} on bf16 ones")
    naive = agreement_table[(agreement_table["inputs"] == "bf16")
                            & (agreement_table["precision"] == "bf16_logits")].iloc[0]
    print(f"  rounding the logits to bf16 (nn.Linear in bf16) flips {naive['flip_rate']:.3%}: "
          "keep the gate's output in fp32")
