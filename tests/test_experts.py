"""The fused MoE experts (routerlib.kernels.experts) against the reference twin
(routerlib.reference.experts), forward and backward; the MoE layer's fused path; GPU checks at
full model shapes (marked gpu)."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close

from routerlib import MoEConfig, MoELayer, RouterConfig
from routerlib import reference as ref
from routerlib.kernels import _rowmap
from routerlib.kernels import experts as kx
from routerlib.reference.experts import experts as ref_experts

# gradients of bf16/fp16 inputs: sums of D or R*F rounded products, compared relative to the
# largest expected entry
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_case(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, logits: str = "random",
              device: str | torch.device = "cpu", **router):
    """(x, plan, weights, w_gate_up, w_down), all leaves that need a gradient."""
    cfg = RouterConfig(num_experts=E, top_k=K, **router)
    g = torch.randn(T, E, device=device)
    if logits == "ties":  # every logit equal: ties go to the lowest experts, the rest get none
        g = torch.zeros(T, E, device=device)
    elif logits == "few":  # experts E//2.. get no token
        g[:, E // 2:] -= 100.0
    sel = ref.select(g, cfg)
    plan = ref.build_plan(sel, cfg)
    x = torch.randn(T, D, device=device).to(dtype).requires_grad_()
    wgu = (torch.randn(E, D, 2 * F, device=device) / D**0.5).to(dtype).requires_grad_()
    wd = (torch.randn(E, F, D, device=device) / F**0.5).to(dtype).requires_grad_()
    w = (sel.topk_weights + 0.1 * torch.rand_like(sel.topk_weights)).requires_grad_()
    return x, plan, w, wgu, wd


def check_against_reference(x, plan, w, wgu, wd, config=None, experts=None) -> None:
    """The fused experts' y and gradients equal the reference's; experts: the experts whose
    weight gradients are compared (all when None; a few keep the full-shape GPU check light)."""
    dtype = x.dtype
    y = kx.fused_experts(x, plan, w, wgu, wd, config=config)
    y_ref = ref_experts(x, plan, w, wgu, wd)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref.detach(), tol=TOL[dtype] if dtype != torch.float32 else 1e-5, name="y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, wgu, wd, w), dy)
    want = torch.autograd.grad(y_ref, (x, wgu, wd, w), dy)
    for name, a, e in zip(("dx", "dw_gate_up", "dw_down", "dweights"), got, want):
        assert a.dtype == e.dtype, name
        if name.startswith("dw_") and experts is not None:
            a, e = a[experts], e[experts]
        # relative to the largest entry: each entry is a long fp32/fp16 sum whose rounding error
        # scales with the operands, not with the (possibly cancelling) result
        scale = float(e.abs().max()) + 1.0
        assert_close(a.float() / scale, e.float() / scale, tol=GRAD_TOL[dtype], name=name)
    # dropped slots get no weight gradient
    dropped = plan.slot_to_row < 0
    assert (got[3][dropped] == 0).all()


# (T, D, F, E, K, dtype, logits, router overrides, edge covered)
CASES = [
    (13, 40, 24, 5, 2, torch.float32, "random", {}, "dropless, E odd"),
    (1, 24, 20, 4, 2, torch.float32, "random", {}, "T=1"),
    (17, 33, 19, 6, 1, torch.bfloat16, "random", {}, "k=1, odd D and F, bf16"),
    (9, 32, 16, 4, 4, torch.float32, "random", {}, "k=E"),
    (40, 24, 16, 4, 1, torch.float32, "ties", {}, "exact ties: one expert takes all, 3 tiles"),
    (21, 32, 20, 8, 2, torch.bfloat16, "few", {}, "empty experts, bf16"),
    (20, 32, 24, 7, 2, torch.float32, "random", dict(pad_to_multiple=4), "ragged padded to 4"),
    (24, 32, 16, 4, 2, torch.bfloat16, "random", dict(capacity_factor=0.75),
     "capacity with drops, bf16"),
    (24, 40, 24, 4, 2, torch.float32, "random", dict(capacity_factor=1.5, drop_policy="priority"),
     "capacity with empty slack rows"),
    (18, 32, 16, 4, 2, torch.float16, "random", {}, "fp16"),
    (10, 24, 16, 4, 2, torch.float32, "random",
     dict(routing="expert_choice", capacity_factor=1.0), "expert choice (S = E)"),
]


@pytest.mark.parametrize("T, D, F, E, K, dtype, logits, router, why", CASES,
                         ids=[c[-1] for c in CASES])
def test_fused_experts_match_reference(T, D, F, E, K, dtype, logits, router, why, device):
    check_against_reference(*make_case(T, D, F, E, K, dtype, logits, device, **router))


# the layouts the library (torch._grouped_mm) weight gradients must handle: slack and padding
# rows, empty experts; forced on here (on CUDA it serves bf16 by default)
LIBRARY_CASES = [CASES[i] for i in (3, 4, 6, 7, 8)]  # D, F multiples of 8


@pytest.mark.parametrize("T, D, F, E, K, dtype, logits, router, why", LIBRARY_CASES,
                         ids=[c[-1] for c in LIBRARY_CASES])
def test_library_wgrad_matches_reference(T, D, F, E, K, dtype, logits, router, why, device,
                                         monkeypatch):
    monkeypatch.setattr(kx, "library_wgrad", lambda x, w_down: True)
    monkeypatch.setattr(_rowmap, "POISON_OUTPUTS", True)  # unset rows would show up as NaN
    check_against_reference(*make_case(T, D, F, E, K, dtype, logits, device, **router))


def test_other_tile_config_same_result(device):
    case = make_case(37, 40, 24, 3, 2, torch.float32, device=device)
    tile = kx.TileConfig(32, 16, 16, 2, 4, 1)
    check_against_reference(*case, config=kx.ExpertsConfig(tile, tile, tile))


def test_buffers_outside_the_tile_map_are_never_read(monkeypatch, device):
    # every intermediate buffer starts as NaN: a padding row or a capacity slack row that leaked
    # into y or a gradient would show up
    monkeypatch.setattr(_rowmap, "POISON_OUTPUTS", True)
    check_against_reference(*make_case(24, 32, 16, 4, 2, torch.float32, device=device,
                                       capacity_factor=1.5, pad_to_multiple=1))
    check_against_reference(*make_case(19, 32, 16, 5, 2, torch.float32, device=device,
                                       pad_to_multiple=8))


def test_deterministic(device):
    x, plan, w, wgu, wd = make_case(33, 32, 16, 3, 2, torch.bfloat16, device=device)
    runs = []
    for _ in range(2):
        y = kx.fused_experts(x, plan, w, wgu, wd)
        grads = torch.autograd.grad(y.float().square().sum(), (x, wgu, wd, w))
        runs.append((y, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_no_grad_forward_equals_training_forward(device):
    x, plan, w, wgu, wd = make_case(15, 32, 16, 4, 2, torch.float32, device=device)
    y = kx.fused_experts(x, plan, w, wgu, wd)
    with torch.no_grad():
        y0 = kx.fused_experts(x, plan, w, wgu, wd)
    assert torch.equal(y, y0)


def test_custom_op_matches_function(device):
    x, plan, w, wgu, wd = make_case(11, 24, 16, 4, 2, torch.float32, device=device)
    args = (plan.slot_to_row, plan.row_to_slot, plan.kept_counts, plan.expert_offsets,
            x.shape[0])
    y, pre = torch.ops.routerlib.experts(x, wgu, wd, w, *args, True)
    assert pre.shape == (plan.num_rows, 32)
    y_fn = kx.fused_experts(x, plan, w, wgu, wd)
    assert_close(y, y_fn.detach(), name="custom op y")
    grads = torch.autograd.grad(y.sum(), (x, wgu, wd, w))
    want = torch.autograd.grad(y_fn.sum(), (x, wgu, wd, w))
    for a, b in zip(grads, want):
        assert_close(a, b, name="custom op grad")
    # what torch.compile relies on: the schema, the fake (meta) kernel, the autograd registration
    checks = torch.library.opcheck(
        torch.ops.routerlib.experts.default, (x, wgu, wd, w, *args, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    assert set(checks.values()) == {"SUCCESS"}, checks


def test_tile_bound_and_padding_waste():
    # the static bound covers the tiles of any plan of those shapes
    for logits in ("random", "ties", "few"):
        for router in ({}, dict(capacity_factor=1.25), dict(pad_to_multiple=8)):
            _, plan, *_ = make_case(50, 8, 8, 6, 2, torch.float32, logits, **router)
            for bm in (16, 64):
                tiles = int(((plan.kept_counts + bm - 1) // bm).sum())
                per = plan.capacity if plan.capacity is not None else 50
                assert tiles <= kx.tile_bound(50, 2, 6, plan.num_rows, per, bm)
    counts = torch.tensor([0, 5, 16, 17], dtype=torch.int32)
    # rows computed: 0 + 16 + 16 + 32 = 64 over 38 used
    assert kx.padding_waste(counts, 16).item() == pytest.approx(64 / 38)


def test_regimes_and_configs():
    assert kx.regime(64 * 8, 128) == "decode" and kx.regime(32768 * 8, 128) == "prefill"
    cfg = kx.default_config(32768 * 8, 128, torch.bfloat16)
    assert cfg.up.block_m == 128 and cfg.up.num_warps == 8
    assert kx.default_config(64 * 8, 128, torch.bfloat16).up.block_m == 16
    assert kx.default_config(32768 * 8, 128, torch.float32).up.num_stages == 2
    for name in ("decode", "middle", "prefill"):
        cands = kx.candidates(name)
        assert cands[0] == kx._REGIMES[name] and len(set(cands)) == len(cands) >= 2


@pytest.mark.parametrize("bad, exc, msg", [
    (dict(x_shape=(5, 24)), ValueError, "x has 5 tokens but the plan routes 11"),
    (dict(wd_dtype=torch.bfloat16), TypeError, "w_down has dtype torch.bfloat16"),
    (dict(wgu_shape=(4, 24, 30)), ValueError, "w_gate_up must be (4, 24, 32)"),
    (dict(w_shape=(11, 3)), ValueError, "weights must have shape (11, 2)"),
])
def test_bad_input_is_named(bad, exc, msg, device):
    x, plan, w, wgu, wd = make_case(11, 24, 16, 4, 2, torch.float32, device=device)
    if "x_shape" in bad:
        x = torch.randn(*bad["x_shape"], device=device)
    if "wd_dtype" in bad:
        wd = wd.detach().to(bad["wd_dtype"])
    if "wgu_shape" in bad:
        wgu = torch.randn(*bad["wgu_shape"], device=device)
    if "w_shape" in bad:
        w = torch.rand(*bad["w_shape"], device=device)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        kx.fused_experts(x, plan, w, wgu, wd)


# ---------------------------------------------------------------------------------------------
# MoELayer's fused path


def make_layers(D=32, F=16, shared=0, dtype=torch.float32, device="cpu", **router):
    rc = RouterConfig(num_experts=4, top_k=2, aux_loss_coef=0.01, **router)
    fused = MoELayer(MoEConfig(hidden_size=D, ffn_size=F, router=rc, shared_expert_size=shared,
                               backend="triton"), device=device, dtype=dtype)
    loop = MoELayer(MoEConfig(hidden_size=D, ffn_size=F, router=rc, shared_expert_size=shared,
                              backend="torch", expert_path="loop"), device=device, dtype=dtype)
    loop.load_state_dict(fused.state_dict())
    return fused, loop


@pytest.mark.parametrize("router, shared", [
    (dict(), 0), (dict(capacity_factor=1.0, pad_to_multiple=1), 12), (dict(pad_to_multiple=8), 0),
], ids=["dropless", "capacity + shared expert", "padded to 8"])
def test_layer_fused_path_trains_like_the_loop_path(router, shared, device):
    fused, loop = make_layers(shared=shared, device=device, **router)
    assert fused.cfg.expert_path == "auto"  # -> fused with the triton backend
    x = torch.randn(2, 9, 32, device=device)
    grads = []
    for layer in (fused, loop):
        layer.train()
        xi = x.clone().requires_grad_()
        y, out = layer(xi)
        (y.square().mean() + out.aux_loss).backward()
        grads.append((y.detach(), xi.grad, *(p.grad for p in layer.parameters())))
    for a, b in zip(*grads):
        assert_close(a, b, tol=1e-4, name="fused vs loop")


# ---------------------------------------------------------------------------------------------
# GPU: full model shapes (bf16), CUDA graphs


def model_case(shape, T: int, dtype=torch.bfloat16, device="cuda"):
    from routerlib.bench.configs import SHAPES

    s = SHAPES[shape]
    cfg = s.router_config()
    bias = torch.randn(s.num_experts, device=device) * 0.1 if cfg.expert_bias else None
    sel = ref.select(torch.randn(T, s.num_experts, device=device), cfg, bias)
    plan = ref.build_plan(sel, cfg)
    D, F, E = s.hidden, s.ffn, s.num_experts
    x = torch.randn(T, D, device=device).to(dtype).requires_grad_()
    wgu = (torch.randn(E, D, 2 * F, device=device) / D**0.5).to(dtype).requires_grad_()
    wd = (torch.randn(E, F, D, device=device) / F**0.5).to(dtype).requires_grad_()
    return x, plan, sel.topk_weights.clone().requires_grad_(), wgu, wd


@pytest.mark.gpu
# each regime: decode (DeepSeek-V3 T=64), middle (Mixtral T=1024, OLMoE), prefill (Qwen3 T=16384:
# 1024 rows an expert, its backward on the library path)
@pytest.mark.parametrize("shape, T", [("qwen3-30b-a3b", 16384), ("deepseek-v3", 64),
                                      ("mixtral-8x7b", 1024), ("olmoe-1b-7b", 333)])
def test_gpu_full_shapes_match_reference(shape, T):
    case = model_case(shape, T)
    check_against_reference(*case, experts=busiest_and_least_used(case[1]))


def busiest_and_least_used(plan) -> torch.Tensor:
    """The experts whose weight gradients a full-shape check compares: the busiest and the least
    used (often empty). All of them would cost minutes of host-side comparison, and DeepSeek-V3's
    full fp32 copies ~30 GB each."""
    return plan.kept_counts.argsort(descending=True)[[0, -1]]


@pytest.mark.gpu
@pytest.mark.parametrize("logits, router", [
    ("few", dict(capacity_factor=0.75)), ("few", dict(pad_to_multiple=8)), ("ties", {}),
], ids=["capacity, empty experts", "padded to 8, empty experts", "one expert takes all"])
def test_gpu_library_wgrad_layouts(logits, router):
    # torch._grouped_mm's per-expert A^T B on CUDA with empty groups, slack and padding rows
    case = make_case(300, 256, 128, 16, 2, torch.bfloat16, logits, "cuda", **router)
    assert kx.library_wgrad(case[0], case[4])
    check_against_reference(*case)


@pytest.mark.gpu
def test_gpu_fp32_is_fp32_accurate():
    case = model_case("olmoe-1b-7b", 256, dtype=torch.float32)
    check_against_reference(*case, experts=busiest_and_least_used(case[1]))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    x, plan, w, wgu, wd = model_case("qwen3-30b-a3b", 64)
    with torch.no_grad():
        kx.fused_experts(x, plan, w, wgu, wd)  # compiles and autotunes outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = kx.fused_experts(x, plan, w, wgu, wd)
        x.copy_(torch.randn_like(x))  # new tokens, same plan: the replay must see them
        g.replay()
        want = kx.fused_experts(x, plan, w, wgu, wd)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


def test_benchmark_quick_writes_rows(tmp_path):
    # the benchmark's plumbing at tiny shapes: every variant timed, routerlib's y agrees with the
    # torch composition, the decode target evaluated
    from routerlib.bench import experts as bx
    from routerlib.bench.results import load

    bx.main(["--quick", "--shapes", "olmoe-1b-7b", "--modes", "decode", "--out", str(tmp_path)])
    _, rows = load(tmp_path / "experts.json")
    timed = {r.variant for r in rows if r.metric == "time_us"}
    assert timed == {"routerlib", "routerlib_batched", "torch_composition", "hf_loop",
                     "routerlib_experts", "grouped_mm_experts"}
    assert all(r.value > 0 for r in rows if r.metric == "time_us")
    rel = [r.value for r in rows if r.metric == "rel_err"]
    assert len(rel) == 1 and rel[0] < 3e-2
    waste = [r.value for r in rows if r.metric == "padding_waste"]
    assert len(waste) == 1 and waste[0] >= 1
    assert any(r.variant == "target" and r.metric == "met" for r in rows)


def test_torch_select_matches_reference():
    # the benchmark's torch variants route as routerlib does (DeepSeek-V3 rules: groups, bias)
    from routerlib.bench import experts as bx
    from routerlib.bench.configs import SHAPES

    cfg = SHAPES["deepseek-v3"].router_config()
    logits, bias = torch.randn(37, 256), torch.randn(256) * 0.1
    ids, w = bx.torch_select(logits, cfg, bias)
    sel = ref.select(logits, cfg, bias)
    assert torch.equal(ids.int(), sel.topk_ids)
    assert_close(w, sel.topk_weights, name="weights")
