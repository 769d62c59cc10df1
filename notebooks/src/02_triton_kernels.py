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
# | inference route: score + top-K + plan | `kernels/fast_route/` | T·E logits | ids, weights, the plan | 3 (PDL), or 1 with grid barriers |
# | decode route + dispatch (T ≤ 16) | `kernels/_route_dispatch_kernels.py` | T·E logits (each program), T·D tokens | the route's outputs, R·D rows | 1 |
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

# %%
doc = json.loads((RESULTS / "targets.json").read_text())
env, roofs = doc["env"], doc["roofs"]
print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit "
      f"{str(env['git_commit'])[:10]} | {env['date']}")
print(f"roofs measured in the same run: copy {roofs['copy_gbps']:.0f} GB/s (read+write), "
      f"launch {roofs['launch_us']:.1f} us, a one-kernel CUDA graph "
      f"{roofs.get('graph_us') or float('nan'):.1f} us")
rows = pd.DataFrame(doc["rows"])
assert rows.loc[rows["impl"] == "triton", "verified"].fillna(False).all(), "unverified row"
targets = pd.DataFrame(doc["targets"])[["target", "cmp", "goal", "measured", "verified", "pass"]]
targets.round(3)

# %% [markdown]
# ### Routing: score + top-K + plan
#
# Medians per call (µs). `eager` is a Python call (the larger of the do_bench median and the wall
# time of back-to-back calls is what a caller sees: `wall_us`), `graph` a CUDA-graph replay. The
# reference syncs with the host, so it cannot be captured at all.

# %%
route = rows[(rows["section"] == "route") & (rows["status"] == "ok")]
route.pivot_table(index=["impl", "mode"], columns="case", values="median_us").round(1)

# %% [markdown]
# ### Dispatch and combine against the copy roof
#
# T = 16384, K = 8, bf16, dropless. GB/s count the minimal bytes (dispatch T·D + T·K·D elements,
# combine T·K·D + T·D elements plus the fp32 weights); `frac_copy` divides by the copy bandwidth
# measured in the same run.

# %%
dc = rows[(rows["section"] == "dispatch") & (rows["status"] == "ok")]
table = dc.pivot_table(index=["op", "impl"], columns="case", values=["median_us", "frac_copy"])
display(table.round(3))
tri = dc[dc["impl"] == "triton"]
assert (tri["frac_copy"] >= 0.85).all(), tri[["op", "case", "frac_copy"]]

# %%
import seaborn as sns  # noqa: E402

eager = dc[dc["mode"] == "eager"]
g = sns.catplot(eager, x="impl", y="gbps", hue="case", col="op", kind="bar", height=3.2,
                aspect=1.4)
for ax in g.axes.flat:
    ax.axhline(roofs["copy_gbps"], color="k", ls="--", lw=1)
    ax.set_ylabel("achieved GB/s (copy roof dashed)")
display(g.figure)
matplotlib.pyplot.close(g.figure)

# %% [markdown]
# ### Decode and backward

# %%
other = rows[rows["section"].isin(["decode", "backward"]) & (rows["status"] == "ok")]
display(other[["section", "case", "impl", "mode", "median_us", "wall_us"]].round(1))
bw = other[other["section"] == "backward"].pivot_table(index="impl", columns="mode",
                                                      values="median_us")
bw["backward / forward"] = bw["backward"] / bw["forward"]
bw.round(2)

# %% [markdown]
# ### The Triton backend over the standard configurations (`kernels_triton.csv`)
#
# `python -m routerlib.bench --backends triton --cuda-graph` at decode and prefill sizes. The
# route: all five configurations with the current kernels (`kernels_route_431122d.csv`, Switch
# T = 65536 from `kernels_65536_8d3354d.csv`: same kernels; DeepSeek-V3's group limit takes the
# general path). Combine: Mixtral, OLMoE and Qwen3 at 1d3dbd6 (`kernels_triton.csv`),
# DeepSeek-V3 and Switch at ba899a1 (`kernels_triton_deepseek_switch.csv`), T = 65536 of Qwen3,
# Mixtral, OLMoE and Switch at 431122d / 8d3354d (`kernels_qwen3_65536_431122d.csv`,
# `kernels_65536_8d3354d.csv`).
# Left: time per call against T, eager and in a CUDA graph,
# with the graph floor (a one-kernel graph, 4.9 µs) in red: up to 256 tokens the row-wise route
# sits 1–10 µs above it (Mixtral 6.1–8.5 µs, Qwen3 10.1–14.0 µs), DeepSeek-V3's general path
# 11–35 µs. Right: achieved bandwidth against the copy roof — combine reaches ~80% of it at
# T = 4096 and 95–100% from T = 16384 on; the route moves few bytes and is latency-bound at
# every size.

# %%
from routerlib import viz  # noqa: E402

late = pd.read_csv(RESULTS / "kernels_65536_8d3354d.csv")
kt = {"route": pd.concat([pd.read_csv(RESULTS / "kernels_route_431122d.csv"),
                          late[late["config"] == "switch-base-128"]], ignore_index=True),
      "combine": pd.concat([pd.read_csv(RESULTS / name) for name in (
          "kernels_triton.csv", "kernels_triton_deepseek_switch.csv",
          "kernels_qwen3_65536_431122d.csv")] + [late], ignore_index=True)}
floor = json.loads((RESULTS / "kernels_triton.json").read_text())["roofs"]["graph_us"]
for stage in ("route", "combine"):
    fig = viz.plot_bench(kt[stage], stage=stage, floor_us=floor,
                         title=f"{stage}, Triton backend, H100 (standard configurations)")
    display(fig)
    matplotlib.pyplot.close(fig)

# %% [markdown]
# ## 5. Tuning: what was tried and why the winners win
#
# `python -m routerlib.bench.tune` pins each launch config through an environment variable,
# checks the output against the default's and times it in a CUDA graph. For the top-K kernel
# (bf16 logits, E = 128, K = 8) it swept tokens per program (BLOCK_T), warps and the persistent
# grid's programs per SM:

# %%
tune = pd.read_csv(RESULTS / "tune.csv")
assert tune["ok"].all()
t = tune[tune["config"] != "default"].copy()
t[["BLOCK_T", "warps", "programs_per_sm"]] = t["config"].str.split(",", expand=True).astype(int)
for T in sorted(t["T"].unique(), reverse=True):
    print(f"T = {T}: us in a CUDA graph (default config: "
          f"{float(tune[(tune['T'] == T) & (tune['config'] == 'default')]['us'].iloc[0]):.1f})")
    display(t[t["T"] == T].pivot_table(index=["BLOCK_T", "warps"], columns="programs_per_sm",
                                       values="us").round(1))

# %% [markdown]
# * **Tokens per program.** A program holds a [BLOCK_T, 128] tile in registers; the K rounds of
#   max-reduction are a chain of dependent warp shuffles per row, so a program's latency is
#   fixed and throughput comes from having many programs in flight. At T = 16384 tiles of
#   16 tokens (2048 elements) balance that against register pressure: 32 adds registers, 2–8
#   leaves each program too little independent work. At T = 64 only small tiles (4 tokens) put
#   enough programs on the 132 SMs: 8.8 µs against 10.4 µs with 16 — that rule is in
#   `topk_config` now.
# * **Warps.** 2 warps won the top-K-alone sweep at T = 16384 (26.6 vs 30.8 µs: fewer threads per
#   row, fewer shuffle stages), but inside the full fp32 route of the targets run it measured
#   slower (58.3 vs 49.4 µs), so the default stays at 4; 8 warps was never faster.
# * **Programs per SM** (the persistent grid's cap) moves the time by < 1 µs: the kernel is
#   bound by the shuffle chains of the K rounds, not by the grid.
#
# The row-map kernels (dispatch/combine) autotune over 12 Hopper configs (BLOCK_D 512–2048,
# 2K–8K elements per program, 4–8 warps) on first use; they sit at 89–98% of the copy roof, where
# the config matters little.

# %% [markdown]
# ## 6. The row-wise route: top-K with few threads per token, ranks by counting
#
# Where the route needs no loss sums (inference: no gradient) and the config allows it (token
# choice, drop policy "position", no group limit, K ≤ 8, E ≤ 512), `routerlib.kernels.route` runs
# `kernels/fast_route/` instead of top-K + plan:
#
# 1. `_select_rows_kernel` — H ∈ {1, 2, 4} threads per token, each streaming its share of the
#    E columns 16 at a time (four 16-byte loads in flight) and inserting every key into a sorted
#    list of the K best held in registers: one compare and four selects per list entry, no
#    cross-thread reduction (the general kernel spends K × log2(32) dependent shuffles per token).
#    A new key lands *below* equal keys, and columns arrive in index order, so ties go to the
#    lower expert as in the reference. The H lists are merged by the same insertion. It writes
#    ids and weights, and ranks each chosen slot inside its tile by *counting*: every token
#    becomes a column of E/4 int32 words of 8-bit fields (field e%4 of word e//4 is 1 if the token
#    chose e); an exclusive cumsum of the columns along the tile's tokens gives, in field e of
#    token t, how many earlier tokens of the tile chose e — no sort. The table is [E/4, tokens]
#    so that Triton puts the tokens on the lanes and a token's words in its registers (the
#    transposed table made every thread hold every token's ids: ptxas spilled 5.9 KB a thread).
#    The tile's counts are the table's row sums. **Bit-transposed ranks** (the default with one
#    thread a token and E ≤ 128, i.e. prefill): a token's K choices are a 128-bit membership
#    mask (word w, bit b: expert 32w + b). Seen as rows of 32 tokens (a warp each), every
#    32 × 32 bit block is transposed across the lanes in five butterfly stages — `tl.gather` of a
#    lane's partner, one `SHFL` each on sm_90 — after which lane b of word w holds, one bit per
#    token, which of the row's tokens chose expert 32w + b. A slot's rank is then
#    `popc(bits & below(token))` with the bits fetched from lane e % 32 (one more shuffle per
#    word), plus the earlier rows' counts; the tile's counts are the summed popcounts. The
#    select kernel's sm_90 code went from 4552 to 1968 instructions (151 → 80 registers); the
#    rank work per token from ~3,000 instructions to ~300. The in-tile ranks go to slot_to_row,
#    the counts to a [tiles, E] table. **Packed keys** (the default with one thread a token):
#    the sortable int32 key's low SHIFT bits (SHIFT = bits of the largest column index)
#    give way to the column's complement, so one int32 orders by key, then lower index, and is
#    unique; an insertion is then a max/min pair per list entry (`p_j = max(p_j, min(x,
#    p_{j-1}))`) instead of a compare and four selects, and no index registers are needed.
#    Cutting low bits can merge keys closer than ~2^-16 relative into a tie the index decides, so
#    the list keeps K + 2 entries and is *finished exactly*: their logits are gathered again
#    (from L1/L2; the weights reuse them), four odd-even transposition passes sort them by the
#    exact key, and a token is sure when the result is sorted and the K-th packed entry's high
#    bits beat the last one's. A tile with an unsure token (≥ 3 merged keys at the cut: never
#    seen on random fp32 logits, always on rows of equal fp32 values) is selected again by the
#    exact insertion. bf16/fp16 logits as keys have zero low bits in fp32: they pack exactly
#    and skip the finishing. **Sorting networks** (section 9): the packed keys go into the list
#    8 at a time — sorted by Knuth's 19-comparator network, then merged with the list by
#    `C_j = max(p_j, b_(M-1-j))` (the M best of both as a bitonic sequence) and a bitonic
#    merger — 76 integer min/max for 8 keys at K = 8 instead of 152.
# 2. `_scan_tiles_kernel` — exclusive scan of the tile counts down the tiles (O(NT·E), ≥ 16
#    programs). With few tiles (tiles × experts ≤ 4096: decode sizes) there is no scan launch:
#    every place program loads the [tiles, E] counts into registers and scans them itself
#    (H100, same run: T = 64 9.9 µs vs 11.8 µs with the scan launch, T = 256 13.7 vs 15.3 µs;
#    `scan_ab_9727bcd.txt`).
# 3. `_place_slots_kernel` — elementwise over the slots (1024 a program): rank = the earlier
#    tiles' count + the in-tile rank; kept iff rank < C; row = the expert's start + rank;
#    slot_to_row, row_to_slot; extra programs mark the empty rows.
#
# When all tokens fit one tile, kernel 1 builds the whole plan itself (one launch). Checked here
# against the reference (and in `tests/test_route_rows.py`: every H × warps split, ties, poisoned
# outputs, random configs; on the H100 up to T = 65536 and E = 512):

# %%
from routerlib.kernels.fast_route import route_rows  # noqa: E402

for T in (6, 300):
    cfg = RouterConfig(num_experts=24, top_k=4, renormalize=True, capacity_factor=1.25)
    logits = make_logits("zipf:1.2", T, 24, device=DEVICE, seed=5)
    sel, plan = route_rows(logits, cfg)
    want_sel = ref.select(logits, cfg)
    want = ref.build_plan(want_sel, cfg)
    assert torch.equal(sel.topk_ids, want_sel.topk_ids)
    for f in ("expert_counts", "kept_counts", "expert_offsets", "slot_to_row", "row_to_slot"):
        assert torch.equal(getattr(plan, f), getattr(want, f)), f
    print(f"route_rows: T={T}, ids and plan equal to the reference, "
          f"{int(plan.num_dropped())} slots dropped")

# %% [markdown]
# ### Where its time goes (H100, `route_breakdown.json`)
#
# Device time of each kernel (torch.profiler), the route in a CUDA graph beside the graph floor
# (one one-element kernel in a graph, timed the same way), and the host side of an eager call.

# %%
bd = json.loads((RESULTS / "route_breakdown.json").read_text())
print(f"{bd['env']['device']}, commit {bd['env']['git_commit']}; a one-kernel CUDA graph: "
      f"{bd['graph_floor_us']:.1f} us")
pd.DataFrame([{"case": c["case"],
               "launches": "one (grid barriers)" if c.get("one_launch") else "three (PDL)",
               **{k.strip("_").replace("_kernel", ""): v for k, v in c["device_us"].items()},
               "graph": c["graph_us"], "eager wall": c["eager_wall_us"],
               "eager without launches": c["eager_no_launch_us"],
               "one torch.empty": c["empty_alloc_us"]} for c in bd["cases"]]).round(1)

# %% [markdown]
# At T = 16384 the three kernels take 8.5 + 3.0 + 4.1 µs of device time (select 11.4 µs with
# the 8-bit count table, `route_breakdown_ba899a1.json`; 13.7 µs before the packed keys,
# `route_breakdown_1d3dbd6.json`); in a graph, with the scan and place kernels as programmatic
# dependent launches, 20.5 µs over a 4.9 µs floor (22.1 µs without PDL at 42230d5). With PDL a
# dependent kernel is started early and waits, so its profiler time includes the wait (the scan
# at T = 65536). Eager is host-bound: an eager call now costs ~48 µs wall, 37 µs of it Python
# (62 µs at 42230d5, 139 µs before the outputs became views of one allocation), the rest one
# direct launch (section 7). The one launch is slower on the device at T = 65536 (65.6 µs vs
# 54.5 µs in a graph for the three): its selection phase runs slower inside the fused kernel.
#
# ### Its launch configs (sweep of the current kernels: H200, `../h200/tune_route_84e5f4f.csv`)
#
# µs per route in a CUDA graph for each (threads per token H, warps per tile); `general path` is
# top-K + plan measured in the same run. This sweep ran on the H200 the device tool gave for
# that call; the H100 sweep of the previous design is `tune_route.csv`.

# %%
tr = pd.read_csv(RESULTS.parent / "h200" / "tune_route_84e5f4f.csv")
assert tr["ok"].all()
tr["shape"] = tr["case"] + " T=" + tr["T"].astype(str) + " E=" + tr["E"].astype(str)
tr.pivot_table(index="config", columns="shape", values="us").round(1)

# %%
res = pd.read_csv(RESULTS.parent / "h200" / "tune_route_84e5f4f_resources.csv")
res = res[res["kernel"].str.contains("rows|scan|slots")]
print("registers per thread of the compiled variants (triton 3.6, sm_90):")
res.groupby("kernel")[["n_regs", "n_spills"]].describe().round(0)

# %% [markdown]
# * **Why these winners.** Nsight Compute on the selection kernel at T = 16384, 1 thread a
#   token, 1 warp a tile (`../h200/ncu_route_84e5f4f.txt`): one active warp per scheduler
#   (512 one-warp programs on 132 SMs, 143 registers), 0.26 instructions issued per cycle, no
#   eligible warp in 74% of cycles; waits on loads are 1.3 of the 3.8 cycles between two
#   instructions, the rest is the insertion's dependent compare/select chain. More threads per
#   token (more warps) add merge work in the same proportion: every split lands within ±10%
#   (28.3–32.3 µs), (1, 1) and (4, 4) in front. With the bit-transposed ranks, four warps a tile
#   win past 16k tokens (T = 65536: 55.2–55.6 vs 59.5–59.7 µs; T = 32768: 33.6 vs 34.1) and one
#   warp up to it (T = 16384: 22.1 vs 23.6 µs; `ab_tiles_scan_6f2ebbd.txt`,
#   `ab_decode_t32768_ed6f5de.txt`). At decode sizes many small tiles win (4 threads
#   a token, 1 warp: T = 64 11.7 µs, T = 256 15.4 µs on the H200). Three software-pipelining
#   stages of the column loop beat two on the H100 (26.1 vs 28.9 µs at T = 16384, 65.5 vs
#   72.2 µs at T = 65536, `stages_1d3dbd6.txt`): the default.
# * **Packed keys** (same-run A/B on the H100, `ab_packed_2c62426.txt`, route in a CUDA graph,
#   E = 128, K = 8): T = 4096 20.8 vs 22.6 µs, T = 16384 24.2 vs 26.3 µs (bf16 logits: 22.1 vs
#   24.7), so they are the default with one thread a token (up to 16k tokens until the
#   sorting network of section 9 made them win at T = 65536 too; the insertion was slower
#   there, 66.7 vs 65.5), slower with 4 threads a token (T = 64: 12.9 vs 11.9) and at E = 256
#   (2 threads, 4 warps: 51.1 vs 41.6 µs; Nsight Compute, `ncu_e256_*_0198a91.txt`: 38% of the
#   cycles between instructions wait on instruction fetch, the kernel holds both selections and
#   the finishing). The packed loop alone (no finishing, wrong on near ties) took 23.0 µs: the
#   exact finishing costs ~1 µs, one L2 round trip. The first version re-ran the exact
#   selection for a whole tile whenever two neighbours shared their high bits (1–7% of tiles on
#   random logits): one such tile sets the kernel's time, and the route got slower (31.1 µs).
# * **What failed on the way** (measured):
#   the column loop fully unrolled (`tl.static_range`) compiled for minutes and spilled
#   (≈14 KB of stack per thread: 1.45 ms at T = 16384); a [slots, E/4] rank table inside the
#   selection kernel did the same (the per-token [E/4, tokens] table above is 8× smaller); the
#   tile prefix summed by every program was quadratic in tiles (750 µs at T = 65536) until the
#   scan launch replaced it; a per-tile place kernel with a [slots, E/4] table cost 9.8 µs (the
#   elementwise one: 4.0 µs, select +3.7 µs for the ranks); two insertion lists per thread (two
#   independent dependency chains) did not help (28.2 vs 28.4 µs, slower at T = 65536:
#   `../h200/ab_ilp_stages_4baec7e.txt`); calling Triton's compiled kernel directly, skipping
#   `JITFunction.run`, did not lower the eager time by itself (170 vs 161 µs,
#   `../h200/route_breakdown_thin_launch_ee4653c.json`; with one launch, a cached launch plan
#   and raw pointers it now does, section 7); the previous session's one-launch decode
#   route and three-launch fused route were slower than the general path
#   (`targets_optin_routes_d8adf02.json`); this session, the place kernel summing the tile
#   counts itself in a loop, so that prefill needs no scan launch, was slower (T = 16384 with
#   four-warp tiles 28.0 vs 23.6 µs, T = 4096 23.3 vs 17.8: every program re-reads all counts),
#   and decode tiles holding every token (one launch, 8 warps) were slower than eight one-warp
#   tiles plus the place kernel (T = 64: 11.6 vs 9.8 µs; `ab_tiles_scan_6f2ebbd.txt`,
#   `ab_carve_decode_tiles_4d8da06.txt`); two threads a token with the bit-transposed ranks
#   (more warps for the same tokens) were slower too (T = 16384: 26.5–32.0 vs 22.0 µs,
#   `ab_h2_lane_ranks_7215180.txt`; kept only as the knob `ROUTERLIB_ROWS_LANE_RANKS=1`).
#   The sixth session's one cooperative launch (section 7) is slower than three launches in a
#   CUDA graph from T = 2048 on at E = 128 (T = 16384: 24.3 vs 20.7 µs with PDL), so graphs
#   keep the three launches there. The others were removed.

# %% [markdown]
# The final packed kernel against the exact insertion (`ab_packed_2c62426.txt`, its last block:
# two rounds each, µs per route in a CUDA graph, H100):

# %%
import re  # noqa: E402

block = (RESULTS / "ab_packed_2c62426.txt").read_text().split("# 2c62426")[1]
runs = re.findall(r"T=(\d+) E=(\d+) K=8 (\w+) \{'ROUTERLIB_ROWS_PACKED': '(\d)'.*? graph "
                  r"([\d.]+) us ok=True", block)
ab = pd.DataFrame([{"shape": f"T={t} E={e} {dt}", "selection": "packed" if p == "1" else "exact",
                    "us": float(us)} for t, e, dt, p, us in runs])
assert len(ab) == 24, "two rounds of 6 shapes x 2 selections"
ab = ab.pivot_table(index="shape", columns="selection", values="us", aggfunc="median")
ab["packed / exact"] = ab["packed"] / ab["exact"]
ab.round(2)

# %% [markdown]
# The bit-transposed ranks against the 8-bit count table (`ab_lane_ranks_42230d5.txt`: same run,
# twice each, µs per route in a CUDA graph, H100; `ROUTERLIB_ROWS_LANE_RANKS=0` keeps the table):

# %%
runs = re.findall(r"route T=(\d+) E=(\d+) K=8 (\w+) (\{[^}]*\}) graph ([\d.]+) us .*?ok=True",
                  (RESULTS / "ab_lane_ranks_42230d5.txt").read_text())
lr = pd.DataFrame([{"shape": f"T={t} E={e} {dt}",
                    "ranks": "count table" if "LANE_RANKS': '0'" in knobs else "bit-transposed",
                    "us": float(us)} for t, e, dt, knobs, us in runs])
assert len(lr) == 14, "3 shapes x 2 rounds x 2 rank methods, and bf16 once each"
lr = lr.pivot_table(index="shape", columns="ranks", values="us", aggfunc="median")
lr["bit-transposed / table"] = lr["bit-transposed"] / lr["count table"]
lr.round(2)

# %% [markdown]
# ## 7. One launch, dependent launches, a thin host path
#
# The route is three kernels; both the host (three Triton launches of ~10–30 µs each on the lent
# hosts) and the GPU (a kernel boundary) pay for the split. Three changes this session:
#
# * **One cooperative launch** (`_route_sync_kernel`): the same kernel bodies (select a tile,
#   scan expert columns, place slots) in one kernel whose programs loop over tiles, scan
#   columns and place blocks with a stride of the grid size, separated by two grid barriers.
#   The barrier is one int32 counter that is never reset: program 0 adds 2^31 − (G − 1), the
#   others 1, so one barrier's arrivals sum to 2^31 and flip the sign bit exactly when the last
#   program arrives, leaving the low bits as they were for the next barrier or launch of any
#   grid size. The arrival is a release, the wait an acquire (it compiles to
#   `atom.release.gpu` and a polling `ld.acquire.gpu` by one thread, then `bar.sync`), and the
#   loads after a barrier skip L1 (`.cg`). It needs every program resident at once: the grid is
#   at most what the CUDA occupancy rules allow for the compiled kernel (registers, threads,
#   shared memory per SM) and the launch is cooperative, so the driver refuses a grid that does
#   not fit instead of hanging. Counters come from a zeroed pool: one per stream, and a fresh
#   one per CUDA-graph capture (two graphs may replay side by side; replays of one graph are
#   serialised). The interpreter runs programs one after another, so on the CPU the same bodies
#   run as the three launches; the GPU tests run both (looping grids of 2 and 7 programs, the
#   counter's state across grid sizes, a graph next to eager calls on a second stream).
# * **Programmatic dependent launch** of the scan and place kernels: launched with the PDL
#   attribute, they are scheduled while their predecessor runs (it calls
#   `gdc_launch_dependents` first thing) and wait (`gdc_wait`) before touching anything. The
#   select kernel is launched plainly: it must not overlap the previous op on the stream.
# * **A thin host path**: everything that depends only on shapes, config, dtypes, pointer
#   alignment and knobs is computed once per configuration and cached (`_Static`); after the
#   first call each kernel is launched straight through its compiled launcher with raw pointers
#   (no `JITFunction.run` binding and specialisation, no driver pointer query per tensor); the
#   knobs are read from the environment's dict in one pass.
#
# What won where (`ab_pdl_a7653d2.txt`: same run, µs; graph = median CUDA-graph replay, eager =
# median of 25 interleaved batches of 20 calls):

# %%
text = (RESULTS / "ab_pdl_a7653d2.txt").read_text()
graph = {(int(t), m): float(a) for t, m, a in
         re.findall(r"T=(\d+) (\w+): device .*? graph ([\d.]+)/", text)}
eager = {}
for t, rest in re.findall(r"T=(\d+) eager wall us .*?: (.*)", text):
    for m, med in re.findall(r"(\w+) ([\d.]+)/", rest):
        eager[(int(t), m)] = float(med)
modes = {"sync": "one launch", "split": "three, PDL", "split_nopdl": "three, no PDL"}
assert len(graph) == 20 and len(eager) == 20, "5 sizes x 4 modes"
pd.DataFrame({f"{label} {kind}": {T: d[(T, m)] for T in sorted({k[0] for k in graph})}
              for kind, d in (("graph", graph), ("eager", eager))
              for m, label in modes.items()}).rename_axis("T (E=128, K=8)").round(1)

# %% [markdown]
# In a CUDA graph a grid barrier costs more than a kernel boundary with PDL: the one launch
# wins only where it replaces three short launches over tiny tiles (T ≤ 1024, and at E = 256
# up to T = 4096: 26.5 vs 29.3 µs, `ab_sync_pdl_e256_9af1b90.txt`), and loses at T = 16384
# (24.3 vs 20.7 µs; the cooperative attribute alone costs ~1.6 µs there and ~10 µs at
# T = 65536, `ab_sync_profile_974f0e9.txt`). Eagerly it wins everywhere: one launch instead of
# three. So the route takes the one launch for eager calls and, when a graph is being captured,
# only where it measured faster (`route_rows._use_sync`). With the direct launches the eager
# route went from 164–235 µs wall (42230d5) to 48.6 µs in the targets run
# (`targets_9af1b90.json`), of which ~37 µs is Python: one `torch.empty`, seven output views,
# the cache key, the dataclasses.

# %% [markdown]
# ## 8. The decode path: the dispatch inside the route, D split over the grid
#
# At decode sizes every stage is a few microseconds of latency, and the path (route, dispatch,
# the experts, combine) is a chain of kernel boundaries. Three changes, each measured in the
# same run against the others (`ab_decode_*.txt`, CUDA graph, E = 64, K = 8, D = 4096):
#
# * **The route and the dispatch in one launch** (`kernels.route_dispatch`,
#   `_route_dispatch_kernels.py`) for T ≤ 16: the plan of a one-tile route costs one program a
#   few microseconds and reads T·E logits (4 KB at T = 16, from L2 after the first program), so
#   *every* program selects and plans all T tokens itself, in registers, and no program waits
#   for another: program 0 writes the route's outputs, the others copy their slots' token rows
#   into the expert-major buffer (or write zeros to empty rows). No grid barrier, no second
#   launch. It wins only while the tile is small: with 64 or 128 tokens every program plans with
#   8 warps (9.9 / 15.8 µs of device time) and the path got slower (22.6 vs 21.0 µs at T = 64).
#   A second variant, the route's place kernel copying each slot's row, also lost (21.0 vs
#   18.7 µs at T = 64): it reads a token row K times, the dispatch kernel once. It stays
#   available (`ROUTERLIB_ROWS_DISPATCH=place`), tested, off by default.
# * **D split over a second grid axis** in the dispatch and combine kernels where the token
#   blocks alone leave SMs idle (`_rowmap.d_split`: T = 64 at one token a program is 64
#   programs on 132 SMs): each program then moves one range of D. The biggest win of the three:
#   the path at T = 64 went from 36.7 to 18.7 µs in the A/B (the no-split number is inflated:
#   the autotuner, whose key has no T, kept the configs it chose at T = 1 for every T of that
#   process; the targets run at 9af1b90, tuned at T = 16384 first, had 21.5 µs).
# * **Dispatch and combine as programmatic dependent launches** on Hopper (their launch and
#   prologue overlap the previous kernel's tail): 0.4–0.9 µs less at every T.

# %%
from routerlib import route_dispatch  # noqa: E402

cfg = RouterConfig(num_experts=16, top_k=2, capacity_factor=1.0)
logits = make_logits("hot:2:2", 5, 16, device=DEVICE, seed=8)
x = make_tokens(5, 40, torch.bfloat16, DEVICE, seed=9)
sel, plan, rows = route_dispatch(logits, x, cfg, backend="triton")
sel_r, plan_r, rows_r = route_dispatch(logits, x, cfg, backend="torch")
assert torch.equal(sel.topk_ids, sel_r.topk_ids) and torch.equal(rows, rows_r)
assert torch.equal(plan.row_to_slot, plan_r.row_to_slot)
print(f"route + dispatch in one launch: ids, plan and {rows.shape[0]} rows equal the reference")

# %%
text = (RESULTS / "ab_decode_082f3c8.txt").read_text()
path = {}
for t, rest in re.findall(r"T=(\d+) E=64 D=4096 graph us [^:]*: (.*)", text):
    for m, med in re.findall(r"(\w+) ([\d.]+) \[", rest):
        path[(int(t), m)] = float(med)
labels = {"fused": "default at 082f3c8 (one launch T<=16, place kernel past it)",
          "split": "route, then dispatch (default since 70ae2c4)",
          "split_nodsplit": "without the D split", "before": "and no dependent launches"}
assert len(path) == 16, "4 sizes x 4 modes"
pd.DataFrame({lab: {T: path[(T, m)] for T in (1, 16, 64, 256)} for m, lab in labels.items()}
             ).rename_axis("T (decode path, µs)").round(1)

# %% [markdown]
# ## 9. Selection by sorting networks; launch configs per token class (H200, 56cd269)
#
# **Where the select kernel's time went** (Nsight Compute on the H100,
# `ncu_route_T16384_E128_c26e3a6.txt`, T = 16384, E = 128): 5,240 instructions a thread, one
# warp per scheduler (512 one-warp programs over 528 schedulers), 0.34 instructions issued a
# cycle. 82% of the instructions are the column loop, and of its 535 a 16-column step 298 are
# the integer min/max of the packed insertion (each key walks the whole list of K + 2 = 10:
# `p_j = max(p_j, min(x, p_(j-1)))`). Integer min/max go through the integer pipe (16 lanes a
# cycle a scheduler on Hopper), so fewer of them is what makes this kernel faster; more warps
# per scheduler would need several threads a token, whose merges cost more than they save
# (section 6).
#
# **The network.** Eight packed keys are sorted by Knuth's 19-comparator network (38 min/max),
# merged with the descending list by `C_j = max(p_j, b_(M-1-j))` — the list against the sorted
# eight reversed, which leaves the M best of both as a bitonic sequence (8 max) — and a bitonic
# merger sorts that (M = 10: the 16-input merger with six +inf entries in front folds to 15
# comparators; M = 8: 12). 76 min/max for 8 keys where the insertion took 152; the step's sm_90
# code went from 535 to 407 instructions (298 → 145 min/max). Packed keys are unique (the column
# sits in their low bits), so the network returns exactly the list the insertion did, and the
# exact finishing is unchanged. Lists of 7 to 10 entries take the 10-entry merge (the entries
# past L are reset), shorter ones keep the insertion (2L - 1 min/max a key is cheaper there).
# Tested against the reference on every list length with the tie fallback off, and the network
# itself on random keys (`test_packed_network_equals_reference`, `test_sorting_network_and_merge`;
# both on the H200 too).
#
# **Measured** (same machine, one process per line, variants in turn; route in a CUDA graph):

# %%
H200 = RESULTS.parent / "h200"
runs: dict[tuple, list[float]] = {}
for line in (H200 / "ab_network_56cd269.txt").read_text().splitlines():
    m = re.match(r"route T=(\d+) E=(\d+) K=8 (\w+) \{(.*)\} graph ([\d.]+) us", line)
    if m:
        knobs = m.group(4)
        insertion, forced = "NETWORK': '0'" in knobs, "PACKED': '1'" in knobs
        variant = ("packed forced, insertion" if insertion and forced
                   else "insertion" if insertion
                   else "packed forced, network" if forced else "default")
        runs.setdefault((int(m.group(1)), int(m.group(2)), m.group(3), variant), []).append(
            float(m.group(5)))
net = pd.DataFrame([dict(T=k[0], E=k[1], logits=k[2], variant=k[3], graph_us=v)
                    for k, v in runs.items()])
assert len(net) >= 8
display(net)

# %% [markdown]
# At the prefill target (T = 16384) the network saves 0.3–0.45 µs of the route's ~19.6 µs in a
# graph (T = 4096: 0.6 µs; bf16 logits 0.8 µs): the select kernel is one of three launches
# over a 4.9 µs graph floor, and its loop still packs every key (~9 integer operations a key
# for the order-preserving transform, −0.0 and NaN). At T = 65536 packed keys used to lose to
# the exact insertion; with the network they win (46.4–46.9 vs 50.5–50.9 µs) and are the
# default there too. "default" at E = 64 is 4 threads a token (decode), where packed keys still
# lose. Device time of the select kernel at T = 16384 with the network: 7.5 µs on the H200
# (`route_breakdown_56cd269.json`; scan 3.0, place 3.8).
#
# **Launch configs per token class.** The row-map autotuner's key had no T: a process kept the
# configs chosen at its first call's size for every T (a 2× swing at decode, section 8). The
# key now has `token_class(T)` (T ≤ 16, ≤ 128, ≤ 1024, ≤ 8192, ≤ 32768, larger): a serving
# process tunes once per class, not per batch size. With it the decode path takes 18.9 µs at
# T = 64 on the H200 (`ab_decode_56cd269.txt`) and T = 256 29.0 µs (34.3 on the H100 tuned at
# T = 1 before).
#
# **The targets on the H200** (`targets_56cd269.json`, one run, every Triton row
# verified):

# %%
tg200 = pd.DataFrame(json.loads((H200 / "targets_56cd269.json").read_text())["targets"])
tg200[["target", "goal", "measured", "pass"]]

# %% [markdown]
# The decode row keeps a stand-in expert (`rows * 0.5`, one more kernel) between dispatch and
# combine: 18.4 µs. The stages the issue names — score, top-K, plan, dispatch, combine, with
# combine reading the dispatched rows — take **15.4 µs** in the same run (`path_no_expert`),
# 0.4 µs over the 15 µs goal. The dispatch's fraction of copy is lower on the H200 (83–85%)
# than on the H100 (89–90%) against a copy roof of 4.2 TB/s instead of 3.0; why it does not
# keep pace with the copy there was not profiled (no device time left in the session).
# The eager wall time (87 µs) follows the host: the same call took 41 µs of wall in the
# breakdown minutes later.

# %% [markdown]
# ## 10. Ninth session (H100): merges, cheaper keys, register prefetch, the decode configs
#
# * **Merging lists across threads by the network.** With several threads a token, each
#   thread's top-(K+2) list was inserted into its neighbour's key by key (L insertions of 2L
#   min/max). Both lists are sorted, so `C_j = max(a_j, b_(M-1-j))` is the best M as a bitonic
#   sequence and a merger sorts it (`_merge_packed`, `_bitonic10`: 10 + 15 min/max). That made
#   two or four threads a token worth measuring at prefill (more warps a scheduler than one
#   thread a token gives): they still lose, by 8-11 µs at T = 16384 (`ab_threads_a_token_*`:
#   the layout conversions of the merge and the one-hot ranks cost more than the occupancy
#   buys).
# * **Cheaper keys.** Negative floats now map to `-magnitude` (two integer operations; −0.0
#   lands on 0) instead of a zero test and an xor, and the packed loop loads without a row
#   mask (padding tokens read the last real row). sm_90 code: 375 instead of 406 instructions a
#   16-column step; 0.4-0.7 µs at T = 16384, 1.1 µs at T = 65536.
# * **Register prefetch.** Triton's software pipelining of the column loop goes through shared
#   memory (cp.async, a barrier, address arithmetic in the uniform datapath); loading the next
#   16 columns into registers by hand cuts the loop to 285 instructions a step. It wins with
#   4-warp tiles (T = 65536: 47.9 vs 52.2 µs) and loses with one-warp tiles (T = 16384: 21.5
#   vs 19.8): one warp a scheduler cannot cover the loads one step ahead, three cp.async stages
#   can. The rule takes it only with 4-warp tiles (`route_rows._stages`).
# * **Decode.** At T = 64 the row-map autotuner (timing each kernel alone) picked wide tiles;
#   in the graph, one token a program with 1024 columns and 4 warps is 0.4-1.2 µs faster for
#   dispatch + combine together, now the fixed config of token class 1 (`_rowmap.decode_config`).
#   Tried and dropped: the last program of the select grid placing every slot (one launch
#   fewer, but one warp placing 512-2048 slots: 19-20 µs instead of 15, reverted), the place
#   kernel copying the rows with 128-512 programs, other select tile shapes, the softmax
#   statistics once a step (no measurable change).

# %%
ab = []
for name in ("ab_sortable_decode_e8a78ac.txt", "ab_prefetch_d2a2fb5.txt"):
    old = None
    for line in (RESULTS / name).read_text().splitlines():
        if line.startswith("# OLD") or line.startswith("# NEW"):
            old = line[2:]
        m = re.match(r"route T=(\d+) E=128 K=8 (\w+) \{(.*)\} graph ([\d.]+) us", line)
        if m:
            variant = (old if old else "3 cp.async stages" if "STAGES': '3'" in m.group(3)
                       else "register prefetch")
            ab.append(dict(file=name.split("_")[1], T=int(m.group(1)), logits=m.group(2),
                           variant=variant, graph_us=float(m.group(4))))
ab = pd.DataFrame(ab)
assert len(ab) >= 20
ab.pivot_table(index=["file", "T", "logits"], columns="variant", values="graph_us",
               aggfunc="median").round(2)

# %% [markdown]
# (`sortable`: the 28d6739 package, OLD, against e8a78ac, NEW, in alternating processes;
# `prefetch`: d2a2fb5, register prefetch at every T against Triton's stages; the rule since
# keeps the stages at T <= 16384.)
#
# **The targets on the H100** at the tenth session's end are the table of section 4
# (`targets.json` at b6bfe8f; `targets_c96d3dd.json` is the same kernels on another host an
# hour earlier): route 20.1 / 19.7 µs in a graph (target 10), eager 72.3 / 43.3 µs wall (do_bench
# 29.5 / 23.6; target 40: the host sets it), dispatch 88.0 / 89.4% and combine 94.9-95.0 /
# 97.7-97.9% of copy, backward / forward 1.07 / 1.09×, and the decode path — judged on the stages
# the issue names (route, dispatch, combine: `path_no_expert`) — 15.2 / 14.98 µs: on its 15 µs
# line (15.3 at 9ceadc9; 14.0-15.1 µs in same-day A/Bs). Where the time goes
# (`route_breakdown_8a3804a.json`, `decode_profile_8a3804a.txt`): at T = 16384 the select
# kernel takes 6.98 µs of device time (8.5 at 9af1b90), scan 2.98, place 4.07, 20.06 µs in a
# graph over a 4.8 µs one-kernel floor; at T = 64 select 3.49 + place 2.08 µs, dispatch 2.78
# and combine 2.62 µs, four dependent launches: 15.0 µs in a graph (14.6-15.4 over rounds).
# Eagerly 35.5 µs of the 46.8 µs wall is Python (a `torch.empty` alone is 5.6 µs on that host).

# %% [markdown]
# ## Conclusions
#
# * **Dispatch and combine meet the targets**: 89–90% and 95–98% of the measured copy bandwidth
#   (3.0 TB/s) at T = 16384, against 5–8% for the reference, torchtitan and DeepSpeed combines:
#   combine is 20× faster than the reference and 11–15× faster than the peers, deterministic,
#   no atomics. torch.compile of the reference fuses the K-way gather-sum and reaches 94–96% on
#   combine too, but only 56–58% on dispatch (`targets_1d3dbd6.json`; the ba899a1 run's time
#   budget skipped those compiles), and it does not help the routing (1.0–1.8 ms).
# * **The backward** of route + dispatch + combine costs 1.07× its forward in `targets.json`
#   (b6bfe8f; 1.09× at c96d3dd, 0.53× at 9ceadc9 and 9af1b90 on slower hosts, 1.00× at 42230d5, 1.43× at ba899a1, 1.16× at 1d3dbd6 with the same backward
#   kernels, 645 µs: the forward with autograd on is host-bound, ~1.1–1.2 ms of wall time, and
#   its median follows the host; target ≤ 2×) and is 21× faster than the reference's backward.
# * **Routing misses its latency targets, by less** (the seventh session's numbers, 9af1b90;
#   the ninth's below). Score + top-K + plan (T = 16384, E = 128,
#   K = 8, fp32 logits) takes 20.5 µs in a CUDA graph (section 7: three launches with
#   programmatic dependent launch; 22.1 µs at 42230d5, 24.2 µs at ba899a1, 49.8–58.3 µs with
#   top-K + plan five sessions ago; target 10 µs; torchtitan 208 µs, the reference cannot be
#   captured; OpenAI's triton_kernels, measured at 19 µs in DESIGN.md, is still 1.5 µs ahead)
#   and 48.6 µs wall eager from Python (one cooperative launch and a cached launch plan;
#   164–235 µs at 42230d5; target 40 µs; reference 1.07 ms, torchtitan 0.28 ms in the same
#   run). A CUDA graph of one tiny kernel already takes 4.9 µs measured this way, the selection
#   kernel 8.5 µs (8 MB of logits: 2.7 µs at the copy roof; one warp per scheduler, so its
#   instruction stream sets the pace), the scan and place kernels 3.0 + 4.1 µs, mostly latency.
#   Eagerly ~37 µs is Python (an allocation, seven views, the cache key, two dataclasses) and
#   ~12 µs the launch. The decode path (T = 64, D = 4096) takes 18.7 µs in a graph in the
#   same-run A/B of section 8 (21.5 µs in the 9af1b90 targets run; 20.6 µs in the 082f3c8
#   decode targets run with the place-kernel variant; target 15 µs): five kernels (the route's
#   two, dispatch, the experts' stand-in multiply, combine) over a 4.9 µs graph floor; the
#   dispatch and combine split D over the grid now, and the one-launch route + dispatch pays
#   off only up to 16 tokens.
# * **Eighth session (H200, section 9):** the selection's packed keys sorted 8 at a time by a
#   network instead of inserted one by one: route 19.6 µs in a graph (0.3–0.45 µs less at
#   T = 16384, 0.6 at T = 4096, 4.1 µs at T = 65536 where packed keys now win); the decode path
#   18.4 µs with the stand-in expert and 15.4 µs for the stages the issue names; the row-map
#   configs tuned per token class. Still missed: 10 µs route, 40 µs eager, 15 µs decode.
# * **Ninth session (H100, section 10):** route 20.0 µs in a graph and 47.9 µs at T = 65536
#   (cheaper keys, register prefetch in 4-warp tiles), decode path 15.3 µs in the targets run
#   (14.0-15.1 in A/Bs) with fixed dispatch/combine configs at decode sizes; several ideas
#   measured and dropped (more threads a token, the last program placing, the place kernel
#   copying). Still missed: 10 µs route, 40 µs eager; decode by 0.3 µs.
# * **Tenth session (H100):** GPU tests, memcheck and racecheck at c96d3dd (0 errors, 0
#   hazards); the eager host path trimmed (the plan's dataclasses built without re-checking,
#   cheaper views: ~4 µs less in CPU timeit; on the lent hosts the process-to-process spread,
#   47-96 µs, hid it, `ab_host_path_*.txt`); two targets runs: decode 14.98 µs (met) and
#   15.2 µs (missed by 0.2), eager 43.3 and 72.3 µs on two hosts. Missed: 10 µs route, 40 µs
#   eager; decode at the line.

# %%
tg = targets.set_index("target")
assert tg.loc[[t for t in tg.index if "frac of copy" in t], "pass"].all()
assert tg.loc["backward/forward ratio qwen3 T=16384", "pass"]
missed = tg[~tg["pass"].astype(bool)]
print("missed targets (measured vs goal):")
for name, r in missed.iterrows():
    print(f"  {name}: {r['measured']:.1f} vs {r['cmp']} {r['goal']}")
