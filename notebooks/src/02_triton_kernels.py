# %% [markdown]
# # 02 — Triton kernels: fused score + top-K, a sort-free plan, dispatch and combine
#
# Notebook 01 found the reference's costs: at decode sizes the routing path (softmax, a sorting
# top-K, bincount, argsort, host syncs) takes ~1 ms for a few KB; at prefill the combine
# (K-way index_select + multiply-add) runs at ~5% of the copy bandwidth. This notebook goes through
# the four kernels that replace them — what each reads and writes, why it is shaped so — checks
# each against the reference on random inputs, and renders the H100 measurements: the issue's
# targets, the launch-config sweep and the comparison with `torch.compile` and the peers.
#
# | kernel | file | reads | writes | launches |
# | --- | --- | --- | --- | --- |
# | score + top-K (+ loss sums) | `kernels/topk.py` | T·E logits | T·K ids + weights, E+1 sums | 2 (main + a tiny column sum) |
# | plan | `kernels/plan.py` | T·K ids (+ weights/keys for priority) | counts, offsets, slot→row, row→slot | 1 (small T) or 2 |
# | dispatch | `kernels/dispatch.py` | T·D tokens | R·D rows (empty rows zeroed) | 1 |
# | combine | `kernels/combine.py` | T·K·D rows + T·K weights | T·D | 1 |
#
# On a CPU the kernels run under `TRITON_INTERPRET=1` (set below when there is no GPU), on small
# shapes; the timings come from `results/h100/`.

# %%
import json
import os
from pathlib import Path

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import matplotlib  # noqa: E402
import pandas as pd  # noqa: E402
from IPython.display import display  # noqa: E402

from routerlib import RouterConfig, ops  # noqa: E402
from routerlib import reference as ref  # noqa: E402
from routerlib.bench import make_logits, make_tokens  # noqa: E402

matplotlib.rcParams["figure.dpi"] = 80
DEVICE = torch.device("cuda" if GPU else "cpu")
RESULTS = Path("..") / "results" / "h100"
print("device:", torch.cuda.get_device_name() if GPU else "CPU (Triton interpreter)")

# %% [markdown]
# ## 1. Score + top-K in one pass
#
# One program walks tiles of [BLOCK_T tokens × next_pow2(E) experts] in registers: it loads the
# logits once (any float dtype, computed in fp32), takes softmax or sigmoid, adds the selection
# bias, applies the group limit, and selects K experts with K max-reductions over a **packed
# int64 key** — the order-preserving bits of the fp32 key in the high half and (E−1−e) in the
# low half — so one `max` returns the best score *and* the lowest expert index among ties,
# exactly the reference's rule. The same pass accumulates the two sums the losses need
# (Σ_t p_t,e and Σ_t lse_t²) per program; a second tiny kernel adds them in a fixed order, so
# the result is bit-reproducible without float atomics. The backward recomputes the scores from
# the logits and writes ∂L/∂logits in one pass.

# %%
from routerlib.kernels.topk import fused_topk  # noqa: E402

cases = [  # (T, E, K, config overrides): odd T, E not a power of two, k=1, k=E, groups, bias
    (37, 13, 3, {}),
    (64, 64, 8, dict(renormalize=True)),
    (33, 8, 8, dict(softmax_after_topk=True)),
    (50, 32, 4, dict(score_func="sigmoid", n_groups=4, topk_groups=2, group_score="top2_sum",
                     expert_bias=True, renormalize=True, routed_scaling_factor=2.5)),
    (1, 160, 1, {}),
]
for T, E, K, kw in cases:
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    logits = make_logits("zipf:1.0", T, E, torch.bfloat16, DEVICE, seed=T)
    logits[0, 1:3] = logits[0, 0]  # a three-way tie in token 0
    bias = torch.randn(E, device=DEVICE) * 0.01 if cfg.expert_bias else None
    got, want = fused_topk(logits, cfg, bias), ref.select(logits, cfg, bias)
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.prob_sum, want.prob_sum, rtol=1e-5, atol=1e-5)
    print(f"T={T:3d} E={E:3d} K={K} {kw or ''}: ids equal, weights and loss sums match")

# %% [markdown]
# ## 2. The plan without a sort
#
# Routing metadata is a counting sort: a per-block histogram of the T·K expert ids, an exclusive
# scan over blocks and experts, and each slot's stable rank inside its block. rank < C decides
# which slots survive (by arrival, by weight for Batch Prioritized Routing, or by a random key),
# the offsets are padded to the GEMM block size in the same pass, and the inverse map row→slot
# (with −1 for empty rows) is written by the same programs. No `.item()`, no data-dependent
# shape: the buffer has a static bound of rows (E·C, or T·K + E·(block−1)), so the whole path can
# be captured in a CUDA graph. Integer metadata must match the reference exactly.

# %%
from routerlib.kernels.plan import build_plan  # noqa: E402

for T, E, K, kw in [(300, 13, 2, dict(capacity_factor=1.0)),
                    (37, 8, 8, dict(pad_to_multiple=16)),
                    (200, 64, 4, dict(capacity_factor=0.5, drop_policy="priority")),
                    (129, 7, 3, dict(capacity_factor=1.25, drop_policy="random")),
                    (1, 3, 3, {})]:
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    sel = ref.select(make_logits("zipf:1.5", T, E, device=DEVICE, seed=E), cfg)
    pri = torch.rand(T, K, device=DEVICE) if cfg.drop_policy == "random" else None
    got, want = build_plan(sel.topk_ids, sel.topk_weights, cfg, pri), ref.build_plan(sel, cfg, pri)
    for f in ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    print(f"T={T:3d} E={E:2d} K={K} {kw}: all five maps equal; "
          f"{int(got.num_dropped())} of {T * K} slots dropped")

# %% [markdown]
# ## 3. Dispatch and combine at copy bandwidth
#
# Both kernels walk the **tokens**: dispatch reads x[t] once and writes it to the row of each kept
# slot (the floor: T·D read, T·K·D written); combine reads the K rows of token t and sums them
# with their weights in fp32 registers, writing y[t] once (T·K·D read, T·D written). Each program
# handles several tokens with 16-byte vector accesses over a D tile, looping over D for wide
# rows. Every output row is written by exactly one program, so there are **no atomics** and the
# results are deterministic. The backward of each is the other's kernel: dispatch's backward is
# a gather-sum over slot→row (not a scatter-add), combine's backward writes w·∂y to each row and
# ⟨∂y, row⟩ to each weight from one read of ∂y.

# %%
from routerlib.kernels.combine import combine  # noqa: E402
from routerlib.kernels.dispatch import dispatch  # noqa: E402

for T, D, E, K, kw, dtype in [(33, 100, 8, 2, dict(capacity_factor=1.0), torch.bfloat16),
                              (17, 256, 13, 3, dict(pad_to_multiple=4), torch.float32),
                              (5, 24, 3, 3, {}, torch.float16)]:
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    sel = ref.select(make_logits("uniform", T, E, device=DEVICE, seed=D), cfg)
    plan = ref.build_plan(sel, cfg)
    x = make_tokens(T, D, dtype, DEVICE, seed=1).requires_grad_()
    w = sel.topk_weights.clone().requires_grad_()
    rows = dispatch(x, plan)
    y = combine(rows * 2, plan, w)
    x_r = x.detach().clone().requires_grad_()
    w_r = w.detach().clone().requires_grad_()
    y_r = ref.combine(ref.dispatch(x_r, plan) * 2, plan, w_r)
    assert torch.equal(rows, ref.dispatch(x.detach(), plan))
    torch.testing.assert_close(y.float(), y_r.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y)
    y.backward(g)
    y_r.backward(g)
    torch.testing.assert_close(x.grad.float(), x_r.grad.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(w.grad, w_r.grad, rtol=3e-2, atol=3e-2)
    print(f"T={T} D={D} E={E} K={K} {dtype}: dispatch exact, combine + both grads match")

# %% [markdown]
# **The whole path behind the backend switch.** `routerlib.route / dispatch / combine` with
# `backend="triton"` give what `backend="torch"` gives, and the MoE layer takes the same switch.

# %%
cfg = RouterConfig(num_experts=16, top_k=4, renormalize=True, capacity_factor=1.25,
                   drop_policy="priority")
logits = make_logits("hot:2:2", 64, 16, device=DEVICE, seed=3)
x = make_tokens(64, 32, torch.float32, DEVICE, seed=4)
outs = {}
for backend in ("torch", "triton"):
    sel, plan = ops.route(logits, cfg, backend=backend)
    outs[backend] = ops.combine(ops.dispatch(x, plan, backend) * 3, plan, sel.topk_weights,
                                backend)
torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)
print("route -> dispatch -> combine: triton == torch")

# %% [markdown]
# ## 4. Measured on an H100
#
# `scripts/gpu_run.sh` (steps `targets`, `tune`, `kernels`) on a lent H100; every triton row was
# first checked against the reference on the same inputs (`verified`). Times are medians
# (`triton.testing.do_bench`, L2 flushed; CUDA-graph replays for the graph rows).
