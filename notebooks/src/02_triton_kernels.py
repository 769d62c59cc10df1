# %% [markdown]
# # 02 — Triton kernels for MoE routing: route, dispatch, combine
#
# Notebook 01 measured the reference: at decode sizes its routing (softmax, a sorting top-K,
# bincount, argsort, host syncs) takes about a millisecond for a few kilobytes, and at prefill
# its combine runs at about 5% of the copy bandwidth. This notebook builds the replacement one
# kernel at a time, in the order of the Triton tutorials:
#
# 1. **motivation**: the bytes the stage must move, hence its floor;
# 2. **reference**: the readable PyTorch code in `routerlib.reference` that defines the result;
# 3. **kernel**: what it reads and writes and why it is shaped so;
# 4. **check**: the kernel against the reference on random inputs of awkward sizes (here on the
#    CPU, through Triton's interpreter);
# 5. **benchmark**: the numbers measured on a GPU, read from the committed files under
#    `results/<card>/` (one row schema: `routerlib.bench.results`);
# 6. **conclusion**.
#
# Shapes: T tokens, D hidden size, E experts, K experts a token, C capacity, R buffer rows.
# Every kernel is reached through the backend switch, `backend="triton"`, and returns what
# `backend="torch"` returns.

# %%
import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run on the CPU, slowly

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
from IPython.display import display  # noqa: E402

import routerlib  # noqa: E402
from routerlib import RouterConfig, viz  # noqa: E402
from routerlib import reference as ref  # noqa: E402
from routerlib.bench import checks, make_logits, make_tokens, results, stage_cost  # noqa: E402

# The interpreter runs each program in numpy over every lane, masked-out lanes too (padding
# experts hold -inf): their exp overflows or inf - inf appears before the mask discards them.
# numpy's RuntimeWarnings from the interpreter say nothing about the result; a GPU has none.
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")

DEVICE = torch.device("cuda" if GPU else "cpu")
RESULTS = Path("..") / "results"
print("device:", torch.cuda.get_device_name() if GPU else "CPU (Triton interpreter)")


def measured(card: str, bench: str):
    """The rows of results/<card>/<bench>.json, one column per metric, and the file's env/meta."""
    path = results.latest(bench, card, RESULTS)
    rs = results.ResultSet.read(path)
    env = rs.env
    print(f"{path}: {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
          f"measured at commit {str(env.get('git_commit'))[:7]} on {str(env.get('date'))[:10]}")
    return results.wide(path), rs.meta


targets, tmeta = measured("h100", "targets")
ROOFS = tmeta["roofs"]
print(f"roofs of that run: copy {ROOFS['copy_gbps']:.0f} GB/s (read + write), an empty launch "
      f"{ROOFS['launch_us']:.1f} us from Python, a one-kernel CUDA graph {ROOFS['graph_us']:.1f} us")
assert targets.loc[targets["variant"] == "triton", "verified"].fillna(0).eq(1).all(), \
    "every Triton row of the targets run is checked against the reference before it is timed"


def floor_us(stage: str, T: int, D: int, E: int, K: int, s: int) -> float:
    """The time to move the stage's minimal bytes at the measured copy bandwidth."""
    return stage_cost(stage, T, D, E, K, 1, s).bytes / (ROOFS["copy_gbps"] * 1e3)


# %% [markdown]
# ## 1. Route: scores, top-K and the plan
#
# ### Motivation
#
# Routing reads the [T, E] fp32 logits once and writes, per token, K expert ids, K weights and
# K buffer rows (4 bytes each): T·E·4 + T·K·12 bytes. For Qwen3-30B-A3B at prefill (T = 16384,
# E = 128, K = 8) that is 9.96 MB: about 3 µs at the copy bandwidth. At decode (T = 64) the bytes
# are nothing and the cost is the number of kernel launches. The reference spends about a
# millisecond either way, and it syncs with the host (a bincount, an `.item()`), so it cannot be
# captured in a CUDA graph.

# %%
for T in (64, 16384):
    print(f"route, T={T:5d} E=128 K=8: {stage_cost('route', T, 0, 128, 8, 1).bytes / 1e6:6.3f} MB"
          f" -> floor {floor_us('route', T, 0, 128, 8, 4):.2f} us at the copy bandwidth; "
          f"one CUDA-graph launch costs {ROOFS['graph_us']:.1f} us")

# %% [markdown]
# ### Reference
#
# `ref.select` scores the logits (softmax or sigmoid, optional expert bias and group limit),
# keeps the K best experts of each token (ties go to the lower expert index) and their
# weights. `ref.build_plan` turns the ids into the metadata of an expert-major buffer: tokens
# per expert, the first row of each expert, each slot's row (−1 when capacity drops it) and the
# inverse map. A tiny example:

# %%
cfg = RouterConfig(num_experts=6, top_k=2, renormalize=True, capacity_factor=1.0)
logits = make_logits("zipf:1.0", 8, 6, seed=0)  # [T, E] = [8, 6]
sel = ref.select(logits, cfg)
plan = ref.build_plan(sel, cfg)
print("topk_ids    [T, K]:", sel.topk_ids.tolist())
print("expert_counts  [E]:", plan.expert_counts.tolist(), " capacity C =", plan.capacity)
print("expert_offsets [E+1]:", plan.expert_offsets.tolist())
print("slot_to_row [T, K]:", plan.slot_to_row.tolist(), f"({int(plan.num_dropped())} dropped)")

# %% [markdown]
# ### Kernel
#
# Two paths compute the same result (`routerlib/kernels/`):
#
# * **Training** (the loss sums are needed): one kernel scores a tile of tokens × all experts in
#   registers and selects K with K max-reductions over a *packed key* — the order-preserving
#   bits of the fp32 score in the high half, (E − 1 − e) in the low half — so one `max` gives
#   the best score and, among equal scores, the lowest expert index. The same pass sums
#   Σ_t p_t,e and Σ_t logsumexp_t² per program for the losses; a tiny kernel adds the partial
#   sums in a fixed order, so the result is reproducible without float atomics. The plan
#   follows as a counting sort.
# * **Inference** (no loss sums; `kernels/fast_route/`, one module a stage): the route is
#   score + select, then ranks, then place. Select
#   keeps each token's best keys in registers; a per-tile histogram of expert ids and a stable
#   rank inside the tile replace the sort; an exclusive scan over tiles and experts gives every
#   slot its row, and the place step writes ids, weights, `slot_to_row` and `row_to_slot`.
#   There is no `.item()` and no shape that depends on the data (the buffer has a static number
#   of rows: E·C, or T·K plus padding), so the route can be captured in a CUDA graph. On Hopper
#   the later launches start early and wait for the earlier ones (programmatic dependent launch),
#   which hides part of each launch.
#
# ### Check
#
# Every case below is random: odd T, E not a power of two, K = 1, K = E and K not a power of
# two, exact ties, bf16 / fp16 / fp32 logits, a group-limited sigmoid router with a bias
# (DeepSeek-V3's form), capacity dropping by position and by priority. Integer metadata must be
# equal, weights close.

# %%
cases = [  # (T, E, K, logit dtype, config): the edge each case covers
    (1, 13, 1, torch.float32, {}),                                      # one token, K = 1
    (37, 13, 3, torch.bfloat16, {}),                                    # odd T, E not 2^n
    (9, 8, 8, torch.float16, dict(renormalize=True)),                   # K = E
    (70, 24, 6, torch.float32, dict(capacity_factor=1.0)),              # capacity drops
    (90, 16, 4, torch.float32, dict(capacity_factor=0.5, drop_policy="priority")),
    (50, 32, 4, torch.float32, dict(score_func="sigmoid", n_groups=4, topk_groups=2,
                                    group_score="top2_sum", expert_bias=True, renormalize=True,
                                    routed_scaling_factor=2.5)),        # DeepSeek-V3's form
]
PLAN_FIELDS = ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot")
for T, E, K, dtype, kw in cases:
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    logits = make_logits("zipf:1.0", T, E, dtype, DEVICE, seed=T + E)
    logits[0, 1:3] = logits[0, 0]  # an exact three-way tie in token 0
    bias = torch.randn(E, device=DEVICE) * 0.01 if cfg.expert_bias else None
    want_sel, want_plan = routerlib.route(logits, cfg, bias, backend="torch")
    for path, need_stats in (("training", True), ("inference", False)):
        sel, plan = routerlib.route(logits, cfg, bias, backend="triton", need_stats=need_stats)
        assert torch.equal(sel.topk_ids, want_sel.topk_ids), (T, E, K, path)
        torch.testing.assert_close(sel.topk_weights, want_sel.topk_weights, rtol=1e-5,
                                   atol=1e-6)
        for f in PLAN_FIELDS:
            assert torch.equal(getattr(plan, f), getattr(want_plan, f)), (T, E, K, path, f)
        if need_stats:
            torch.testing.assert_close(sel.prob_sum, want_sel.prob_sum, rtol=1e-5, atol=1e-5)
    print(f"T={T:3d} E={E:2d} K={K} {str(dtype)[6:]:8s} {kw or ''}: ids and plan equal, "
          "weights close, on both paths")

# %% [markdown]
# ### Benchmark
#
# The targets run (`results/h100/targets.json`) times every implementation of the same route on
# the same logits, at Qwen3's prefill shape (T = 16384, E = 128, K = 8, fp32 logits), K = 4,
# and DeepSeek-V3's group-limited router (E = 256). `graph` is a CUDA-graph replay; `eager` a
# call from Python, reported as the larger of the `do_bench` median and the wall time of
# back-to-back calls (what a caller waits). The reference cannot be captured (host syncs).

# %%
route = targets[(targets["section"] == "route") & targets["time_us"].notna()].copy()
route["us"] = route[["time_us", "wall_us"]].max(axis=1).where(route["mode"] != "graph",
                                                              route["time_us"])
route.pivot_table(index=["variant"], columns=["case", "mode"], values="us").round(1)

# %% [markdown]
# Across the standard model configurations (`results/h100/kernels.json`, the sweep
# `python -m routerlib.bench --backends triton --cuda-graph`): time per call against T, with
# the one-kernel CUDA graph as the floor (red), and the bandwidth reached against the copy
# roof. The route moves few bytes: it is latency-bound at every size.

# %%
kern, kmeta = measured("h100", "kernels")
kern = kern.rename(columns={"variant": "backend", "time_us": "median_us"})
for stage in ("route", "combine"):
    fig = viz.plot_bench(kern, stage=stage, floor_us=ROOFS["graph_us"],
                         roof_gbps=kmeta["roofs"]["copy_gbps"],
                         title=f"{stage}, Triton, H100: standard configurations")
    display(fig)

# %% [markdown]
# ### Conclusion
#
# The route runs in a CUDA graph at a few times the one-launch floor and about ten times faster
# than the best peer measured (torchtitan); eagerly its cost is the Python host path. The 10 µs
# graph target is not met: three dependent launches each pay their latency.

# %%
r = route.set_index(["variant", "case", "mode"])["us"]
print(f"route, Qwen3 prefill in a graph: Triton {r['triton', 'qwen3', 'graph']:.1f} us, "
      f"torchtitan {r['torchtitan', 'qwen3', 'graph']:.1f} us; eager: Triton "
      f"{r['triton', 'qwen3', 'eager']:.1f} us, reference {r['torch', 'qwen3', 'eager']:.0f} us")
assert r["triton", "qwen3", "graph"] < r["torchtitan", "qwen3", "graph"] / 5
assert r["triton", "qwen3", "eager"] < r["torch", "qwen3", "eager"] / 10

# %% [markdown]
# ## 2. Dispatch: gather the tokens into expert-major rows
#
# ### Motivation
#
# The experts want their tokens contiguous: rows[r] = x[row_to_slot[r] // K]. The floor is one
# read of x and one write of every kept copy: T·D·s + T·K·D·s bytes (s bytes an element). At
# T = 16384, D = 4096, K = 8 in bf16 that is 1.2 GB, about 0.4 ms at the copy bandwidth.
#
# ### Reference
#
# `ref.dispatch(x, plan)`: an `index_select` of the token of every row, zeros in empty rows.
#
# ### Kernel
#
# The kernel walks the **tokens**, not the rows: a program loads x[t] once (16-byte vector
# accesses over a D tile, looping over D for wide rows) and writes it to the row of each of its
# K kept slots. Each output row is written by exactly one program, so there are no atomics and
# the result is deterministic. At decode sizes (few tokens) a second grid axis splits D, so that
# enough programs run to cover the latency. Its backward is the dual gather: the gradient of x[t]
# is the sum of the gradients of its K rows, read through `slot_to_row`.
#
# ### Check

# %%
for T, D, E, K, dtype, kw in [(33, 100, 8, 2, torch.bfloat16, dict(capacity_factor=1.0)),
                              (17, 256, 13, 3, torch.float32, dict(pad_to_multiple=4)),
                              (5, 24, 3, 3, torch.float16, {})]:
    cfg = RouterConfig(num_experts=E, top_k=K, **kw)
    sel, plan = routerlib.route(make_logits("uniform", T, E, device=DEVICE, seed=D), cfg)
    x = make_tokens(T, D, dtype, DEVICE, seed=1)
    rows = routerlib.dispatch(x, plan, backend="triton")  # [R, D]
    assert torch.equal(rows, ref.dispatch(x, plan))
    print(f"T={T} D={D} E={E} K={K} {str(dtype)[6:]}: {rows.shape[0]} rows, equal to the reference")

# %% [markdown]
# ### Benchmark
#
# T = 16384, K = 8, bf16, dropless; `frac_copy` is the achieved bandwidth (minimal bytes /
# time) over the copy bandwidth measured in the same run.

# %%
dc = targets[(targets["section"] == "dispatch") & targets["time_us"].notna()
             & (targets["mode"] == "eager")]
display(dc.pivot_table(index="variant", columns=["op", "case"], values="frac_copy").round(3))

# %%
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

g = sns.catplot(dc, x="variant", y="gbps", hue="case", col="op", kind="bar", height=3.2,
                aspect=1.4)
for ax in g.axes.flat:
    ax.axhline(ROOFS["copy_gbps"], color="k", ls="--", lw=1)
    ax.set(xlabel="implementation", ylabel="achieved GB/s (copy roof dashed)")
g.figure.suptitle("dispatch and combine, T=16384 K=8 bf16, H100", y=1.03)
display(g.figure)
plt.close(g.figure)  # drawn once: pyplot would show it again at the cell's end

# %% [markdown]
# ### Conclusion
#
# Dispatch runs at about 90% of the copy bandwidth, where `index_select` and the peers reach
# about half of it.

# %%
tri = dc[(dc["variant"] == "triton")].set_index(["op", "case"])["frac_copy"]
print("Triton dispatch, fraction of copy:", tri["dispatch"].round(3).to_dict())
assert (tri["dispatch"] >= 0.85).all()

# %% [markdown]
# ## 3. Combine: the weighted sum of each token's K rows
#
# ### Motivation
#
# y[t] = Σ_k w[t, k] · rows[slot_to_row[t, k]], dropped slots adding nothing. Floor:
# T·K·D·s + T·K·4 bytes read, T·D·s written — the same 1.2 GB as dispatch at the sizes above.
# The reference gathers K copies and sums them with separate kernels, reading and writing
# intermediates: about 5% of the copy bandwidth.
#
# ### Reference
#
# `ref.combine(rows, plan, weights)`: an fp32 K-way sum through `slot_to_row`.
#
# ### Kernel
#
# Again one program per group of tokens: it reads the K rows of token t, multiplies each by its
# weight and sums in fp32 registers, and writes y[t] once. No atomics, no intermediate in memory,
# deterministic. Its backward reads ∂y once and writes w · ∂y into each row and ⟨∂y, row⟩ into
# each weight.
#
# ### Check (forward and both gradients)

# %%
for T, D, E, K, dtype in [(33, 100, 8, 2, torch.bfloat16), (17, 256, 13, 3, torch.float32),
                          (1, 64, 4, 4, torch.float16)]:
    cfg = RouterConfig(num_experts=E, top_k=K, capacity_factor=1.0)
    sel, plan = routerlib.route(make_logits("zipf:1.2", T, E, device=DEVICE, seed=T), cfg)
    rows = make_tokens(plan.num_rows, D, dtype, DEVICE, seed=2)  # stand-in expert outputs
    out = {}
    for backend in ("triton", "torch"):
        rw = rows.clone().requires_grad_()
        w = sel.topk_weights.clone().requires_grad_()
        y = routerlib.combine(rw, plan, w, backend=backend)  # [T, D]
        y.backward(torch.ones_like(y) * 0.5 + make_tokens(T, D, dtype, DEVICE, seed=3))
        out[backend] = (y, rw.grad, w.grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("y", "grad rows", "grad weights"), out["triton"], out["torch"]):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
    print(f"T={T} D={D} E={E} K={K} {str(dtype)[6:]}: combine and both gradients match")

# %% [markdown]
# ### Benchmark and conclusion
#
# Same run, same shapes as dispatch (the bars above, right). The combine is where the field
# loses most: the reference and the peers reach 5–8% of the copy bandwidth, the kernel nearly
# all of it.

# %%
print("Triton combine, fraction of copy:", tri["combine"].round(3).to_dict())
peers = dc[(dc["op"] == "combine") & (dc["variant"] != "triton")]
print("best other combine:", peers.loc[peers["frac_copy"].idxmax(), ["variant", "case",
                                                                     "frac_copy"]].to_dict())
assert (tri["combine"] >= 0.85).all() and (peers["frac_copy"] < 0.2).all()

# %% [markdown]
# ## 4. The decode path: route, dispatch and combine at T = 64
#
# ### Motivation
#
# At T = 64, D = 4096, E = 64, K = 8 the path moves about 9 MB: 3 µs at the copy bandwidth.
# What costs is the number of dependent launches, each about a CUDA-graph launch's latency. The
# path is built to need few of them: the route's launches, then dispatch and combine; up to 16
# tokens `routerlib.route_dispatch` does the route and the dispatch in one launch.
#
# ### Check

# %%
cfg = RouterConfig(num_experts=16, top_k=4, renormalize=True, capacity_factor=1.25,
                   drop_policy="priority")
for T in (5, 64):
    logits = make_logits("hot:2:2", T, 16, device=DEVICE, seed=8)
    x = make_tokens(T, 40, torch.bfloat16, DEVICE, seed=9)
    sel, plan, rows = routerlib.route_dispatch(logits, x, cfg, backend="triton")
    sel_r, plan_r, rows_r = routerlib.route_dispatch(logits, x, cfg, backend="torch")
    assert torch.equal(sel.topk_ids, sel_r.topk_ids) and torch.equal(rows, rows_r)
    assert all(torch.equal(getattr(plan, f), getattr(plan_r, f)) for f in PLAN_FIELDS)
    y = routerlib.combine(rows * 2, plan, sel.topk_weights, backend="triton")
    y_r = routerlib.combine(rows_r * 2, plan_r, sel_r.topk_weights, backend="torch")
    torch.testing.assert_close(y, y_r, rtol=2e-2, atol=2e-2)
    print(f"T={T}: route + dispatch + combine equal the reference ({rows.shape[0]} rows)")

# %% [markdown]
# ### Benchmark and conclusion
#
# `path_no_expert` is the route, the dispatch and the combine reading the dispatched rows;
# `path` adds a stand-in expert (one elementwise kernel) between them.

# %%
dec = targets[(targets["section"] == "decode") & targets["time_us"].notna()]
display(dec[["op", "variant", "mode", "time_us", "wall_us"]].round(1))
g = dec[(dec["variant"] == "triton") & (dec["mode"] == "graph")].set_index("op")["time_us"]
print(f"decode path in a CUDA graph: {g['path_no_expert']:.1f} us "
      f"({g['path_no_expert'] / ROOFS['graph_us']:.1f}x a one-kernel graph)")
assert g["path_no_expert"] < 5 * ROOFS["graph_us"]

# %% [markdown]
# ## 5. Backward
#
# Training needs gradients through the combine weights into the scores and the logits, and
# through dispatch and combine into x. Each backward kernel is the dual of its forward (a
# gather's backward is a gather-sum through the inverse map, not a scatter with atomics), and
# the route's backward recomputes the scores from the logits in one pass.

# %%
cfg = RouterConfig(num_experts=13, top_k=3, renormalize=True, capacity_factor=1.25)
grads = {}
for backend in ("triton", "torch"):
    logits = make_logits("zipf:1.0", 41, 13, device=DEVICE, seed=5).requires_grad_()
    x = make_tokens(41, 48, torch.float32, DEVICE, seed=6).requires_grad_()
    sel, plan = routerlib.route(logits, cfg, backend=backend)
    y = routerlib.combine(routerlib.dispatch(x, plan, backend) * 1.5, plan, sel.topk_weights,
                          backend)
    y.backward(make_tokens(41, 48, torch.float32, DEVICE, seed=7))
    grads[backend] = (logits.grad, x.grad)
for name, a, b in zip(("d logits", "d x"), grads["triton"], grads["torch"]):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
print("fp32 gradients of route -> dispatch -> combine match the reference")

# %%
bw = targets[(targets["section"] == "backward") & targets["time_us"].notna()]
bw = bw.pivot_table(index="variant", columns="mode", values="time_us")
bw["backward / forward"] = bw["backward"] / bw["forward"]
bw.round(2)

# %% [markdown]
# ## 6. Launch configurations: the rule against the measurement
#
# Each kernel picks its launch configuration (tokens a program, warps, threads a token) by a
# rule of the shape. A tuning run times every configuration in a CUDA graph, checked against the
# default's output; `routerlib.bench.checks.rule_within` compares the rule's pick with the
# fastest. The route's rule, on the H200 (`results/h200/tune_route.json`):

# %%
print(results.ResultSet.read(RESULTS / "h200" / "tune_route.json").env["device"])
rule = checks.rule_within(RESULTS / "h200" / "tune_route.json", tol=0.05)
display(rule.round(3))
assert rule["pass"].all(), "the route's rule is within 5% of the best config measured"

# %% [markdown]
# Dispatch and combine leave prefill sizes to Triton's autotuner (`autotune`); on the H100
# (`results/h100/tune_rowmap.json`) its pick against the fixed configs:

# %%
display(checks.rule_within(RESULTS / "h100" / "tune_rowmap.json", tol=0.05).round(3))

# %% [markdown]
# ## Summary: the targets
#
# The targets, judged in one run per card on the same inputs for every implementation
# (`meta.targets` of `results/<card>/targets.json`). Combine sits at the copy bandwidth on both
# cards; dispatch at 88–89% of it on the H100 and 83–85% on the H200, whose copy roof is 40%
# higher; the backward costs about as much as the forward. The route is several times faster
# than every peer but over its latency targets, which a chain of launches does not meet.

# %%
verdicts = []
for card in ("h100", "h200"):
    tm = results.ResultSet.read(results.latest("targets", card, RESULTS))
    for t in tm.meta["targets"]:
        verdicts.append(dict(card=card, commit=str(tm.env["git_commit"])[:7], target=t["target"],
                             goal=f"{t['cmp']} {t['goal']}", measured=round(t["measured"], 3),
                             met=bool(t["pass"])))
verdicts = pd.DataFrame(verdicts)
copy = verdicts[verdicts["target"].str.contains("frac of copy")]
assert copy[copy["target"].str.startswith("combine")]["met"].all()
assert (copy["measured"] > 0.8).all()  # dispatch: 83-85% of the H200's higher copy roof
verdicts.pivot_table(index=["target", "goal"], columns="card", values=["measured", "met"],
                     aggfunc="first")

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
    if targets.empty:  # the run's time limit ended it before the target rows were written
        print("no target rows in this file: compare the routerlib and torch_composition rows")
    else:
        print(targets.pivot_table(index=["target", "need"], columns="metric", values="value"))

# %% [markdown]
# Where the time goes at decode: the layer reads each used expert's weights once (one row tile per
# expert at BLOCK_M=16); its target is 1.15x the time of reading those bytes at the measured copy
# bandwidth. At prefill the GEMMs are compute bound and the fused layer's gain comes from the
# copies and the sort it does not do; at the Mixtral shape (8 experts of 14336) the experts
# dominate and the margin is the routing around them.
