"""Quantization and mixed precision: the router precision paths against the fp32 reference, the
quantize-in-dispatch kernel against its reference (codes and scales exactly), the quantized layer
forward, and the agreement harness on hand-built cases with known answers.

Tolerances (documented here, derived from the formats, not fitted):
  bf16 / fp16 operands: |x_i - x'_i| <= u |x_i| with u = 2^-8 / 2^-11 (round to nearest), so a
      logit moves by at most sum_i |x_i w_i| (2u + u^2), plus fp32 summation slack;
  bf16 logits: also |logit| * 2^-8;
  int8 with scale s: |x - q s| <= s / 2;
  e4m3 with scale s: |x - q s| <= max(2^-4 |x|, 2^-10 s) (3 mantissa bits; subnormal step 2^-9 s).
The payload kernel runs under TRITON_INTERPRET=1 on the CPU for both formats: it rounds in fp32 to
values exact in the target type (the interpreter's own float8 cast mis-rounds; see
routerlib/kernels/quant.py), so codes and scales must match the torch reference bit for bit.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import HAS_GPU, INTERPRET
from helpers import assert_close, assert_equal_int

from routerlib import MoEConfig, MoELayer, Router, RouterConfig
from routerlib import reference as ref
from routerlib.quant import (
    PRECISIONS,
    QuantGate,
    compare_routers,
    compare_selections,
    dequantize_rows,
    gate_inputs,
    moe_forward_quantized,
    payload_bytes,
    quantize_dispatch,
    quantize_dispatch_reference,
    quantize_fp8,
    quantize_int8,
    quantize_tokens,
    selection_margin,
    set_router_precision,
)
from routerlib.quant import router as qrouter
from routerlib.quant.agreement import relative_error, router_key
from routerlib.types import Selection

CAN_RUN_KERNELS = HAS_GPU or INTERPRET
needs_kernels = pytest.mark.skipif(not CAN_RUN_KERNELS,
                                   reason="needs a GPU or TRITON_INTERPRET=1")

# ---------------------------------------------------------------- quantizers


@pytest.mark.parametrize("quant,qmax", [(quantize_int8, 127.0), (quantize_fp8, 448.0)])
def test_quantizer_round_trip_and_zero_row(quant, qmax):
    x = torch.randn(9, 200) * torch.logspace(-3, 2, 9)[:, None]  # rows of very different size
    x[4] = 0.0  # an all-zero row: scale 0, codes 0, no NaN
    q, s = quant(x)
    assert s.shape == (9, 1) and s.dtype == torch.float32
    assert s[4].item() == 0.0 and (q[4].float() == 0).all()
    back = q.float() * s
    assert torch.isfinite(back).all()
    # the row's amax maps to +-qmax exactly
    assert_close(q.float().abs().amax(1)[[0, 1, 2, 3, 5]], torch.full((5,), qmax), tol=0)
    if quant is quantize_int8:
        bound = s / 2
    else:
        bound = torch.maximum(x.abs() * 2.0**-4, s * 2.0**-10)
    assert ((back - x).abs() <= bound * (1 + 1e-6) + 1e-30).all()


def test_int8_rounds_ties_to_even():
    # amax 127 makes the scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.4]])
    q, s = quantize_int8(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 3]]


# ---------------------------------------------------------------- router precision paths

T, D, E = 61, 320, 24  # odd T, E not a power of two, D a multiple of 16 (the fp8 GEMM's need)


def _bound(x: torch.Tensor, w: torch.Tensor, precision: str) -> torch.Tensor:
    """Worst-case |logit_q - logit_fp32| [T, E] from the per-element error bounds above."""
    ax, aw = x.double().abs(), w.double().abs()
    prod = ax @ aw.t()
    slack = prod * 2e-6  # fp32 sums in a different order
    if precision == "fp32":
        return slack
    if precision in ("bf16", "fp16", "bf16_logits"):
        u = 2.0**-8 if precision != "fp16" else 2.0**-11
        b = prod * (2 * u + u * u) + slack
        if precision == "bf16_logits":
            b = b + (x.double() @ w.double().t()).abs() * 2.0**-8 * 1.01
        return b
    if precision in ("int8", "int8_wo"):
        sw = w.double().abs().amax(1, keepdim=True) / 127  # [E, 1]
        dw = (sw / 2).expand_as(w)
        if precision == "int8":
            dx = (x.double().abs().amax(1, keepdim=True) / 127 / 2).expand_as(x)
        else:
            dx = ax * 2.0**-11
    else:  # fp8
        sx = x.double().abs().amax(1, keepdim=True) / 448
        sw = w.double().abs().amax(1, keepdim=True) / 448
        dx = torch.maximum(ax * 2.0**-4, (sx * 2.0**-10).expand_as(x))
        dw = torch.maximum(aw * 2.0**-4, (sw * 2.0**-10).expand_as(w))
    return ax @ dw.t() + dx @ aw.t() + dx @ dw.t() + slack * 4


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gate_paths_within_their_bound(precision):
    x, w = gate_inputs("random", T, D, E, seed=1, dtype=torch.float32)
    want = x.double() @ w.double().t()
    gate = QuantGate(torch.nn.Parameter(w), precision)
    got = gate(x)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    err = (got.double() - want).abs()
    bound = _bound(x, w, precision)
    worst = int(torch.argmax(err - bound))
    assert (err <= bound).all(), (precision, err.flatten()[worst], bound.flatten()[worst])
    if precision != "fp32":
        assert err.max() > 0  # the path did round something (fp32 inputs)


def test_int8_gate_equals_its_dequantized_product():
    x, w = gate_inputs("skewed", T, D, E, seed=2, dtype=torch.float32)
    xq, sx = quantize_int8(x)
    wq, sw = quantize_int8(w)
    want = (xq.double() * sx.double()) @ (wq.double() * sw.double()).t()
    got = QuantGate(torch.nn.Parameter(w), "int8")(x)
    assert_close(got, want.float(), tol=1e-6, name="int8 logits")


def test_fp8_scaled_mm_equals_dequantizing_reference():
    # the CPU build of torch runs torch._scaled_mm too: the call (layouts, row-wise scale shapes)
    # is the one Hopper runs; the reference dequantizes and multiplies in fp32
    x, w = gate_inputs("random", 48, 256, 32, seed=3, dtype=torch.float32)
    xq, sx = quantize_fp8(x)
    wq, sw = quantize_fp8(w)
    got = qrouter._fp8_mm(xq, sx, wq, sw)
    want = qrouter.fp8_mm_reference(xq, sx, wq, sw)
    scale = (qrouter.dequantize(xq, sx).abs() @ qrouter.dequantize(wq, sw).abs().t())
    assert ((got - want).abs() <= scale * 1e-5 + 1e-12).all()


def test_fp8_gate_falls_back_where_shapes_do_not_fit_scaled_mm():
    x, w = gate_inputs("random", 5, 40, 6, seed=4, dtype=torch.float32)  # D, E not % 16
    got = QuantGate(torch.nn.Parameter(w), "fp8")(x)
    xq, sx = quantize_fp8(x)
    wq, sw = quantize_fp8(w)
    assert_close(got, qrouter.fp8_mm_reference(xq, sx, wq, sw), tol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "int8", "fp8"])
def test_straight_through_backward_uses_the_master_weight(precision):
    x, w = gate_inputs("random", 17, 64, 16, seed=5, dtype=torch.float32)
    g = torch.randn(17, 16)
    w1 = torch.nn.Parameter(w.clone())
    x1 = x.clone().requires_grad_()
    (QuantGate(w1, precision)(x1) * g).sum().backward()
    w2 = w.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ((x2 @ w2.t()) * g).sum().backward()
    assert_close(x1.grad, x2.grad, tol=1e-5, name="grad x")
    assert_close(w1.grad, w2.grad, tol=1e-5, name="grad w")


def test_quantized_weight_cache_follows_the_parameter():
    w = torch.nn.Parameter(torch.randn(8, 32))
    gate = QuantGate(w, "int8").eval()
    x = torch.randn(4, 32)
    y1 = gate(x)
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step: the version counter moves
    assert_close(gate(x), 2 * y1, tol=1e-5)


def test_set_router_precision_on_a_bf16_layer():
    cfg = RouterConfig(num_experts=12, top_k=3)
    layer = MoELayer(MoEConfig(hidden_size=64, ffn_size=32, router=cfg), dtype=torch.bfloat16)
    keys = set(layer.state_dict())
    assert set_router_precision(layer, "fp8") == 1
    assert isinstance(layer.router.gate, QuantGate) and set(layer.state_dict()) == keys
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16)
    y, out = layer(x)
    assert y.shape == x.shape and out.logits.dtype == torch.float32
    with pytest.raises(ValueError, match="precision='int4'"):
        set_router_precision(layer, "int4")
    with pytest.raises(ValueError, match="holds no routerlib Router"):
        set_router_precision(torch.nn.Linear(2, 2), "bf16")
    with pytest.raises(ValueError, match=r"x must be \[T, 64\]"):
        layer.router.gate(torch.randn(3, 65))


def test_mixed_precision_router_agrees_with_fp32_on_bf16_inputs():
    # with bf16 activations and weights (serving), bf16 operands are exact: only the fp32 sum
    # order differs, so the top-K sets match the fp32 router's; bf16 logits flip some
    T2, D2, E2 = 512, 256, 64
    x, w = gate_inputs("random", T2, D2, E2, seed=6, dtype=torch.bfloat16)
    cfg = RouterConfig(num_experts=E2, top_k=6)
    base = Router(D2, cfg, dtype=torch.bfloat16)
    base.gate.weight.data.copy_(w)
    routers = {}
    for p in ("fp32", "bf16", "bf16_logits"):
        routers[p] = copy.deepcopy(base)
        set_router_precision(routers[p], p)
    mixed = compare_routers(routers["fp32"], routers["bf16"], x)
    naive = compare_routers(routers["fp32"], routers["bf16_logits"], x)
    assert mixed.flip_rate <= 1e-3 and mixed.weight_l1 < 1e-5
    assert naive.flip_rate > mixed.flip_rate


# ---------------------------------------------------------------- payload: reference

def _plan(T, E, K, seed=0, capacity_factor=None, pad=1):
    cfg = RouterConfig(num_experts=E, top_k=K, capacity_factor=capacity_factor,
                       pad_to_multiple=pad)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    sel = ref.select(logits, cfg)
    return ref.build_plan(sel, cfg)


def _tokens(T, D, dtype, seed=0):
    """Tokens with exact ties: a row holding amax and amax/2 rounds a code at .5 (int8: 63.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g) * torch.logspace(-2, 1, T)[:, None]
    x[:, 1] = x[:, 0].abs() * 4 + 1  # the amax of every row
    x[:, 2] = x[:, 1] / 2            # a code exactly at qmax / 2 (a .5 tie for int8)
    if T > 3:
        x[3] = 0.0                   # a zero token: scale 0
    return x.to(dtype)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("group", [None, 128])
def test_reference_dispatch_dequantizes_to_the_tokens(fmt, group):
    plan = _plan(19, 6, 2, capacity_factor=1.0)  # drops and empty capacity rows
    x = _tokens(19, 256, torch.bfloat16)
    q, s = quantize_dispatch_reference(x, plan, fmt, group)
    assert q.shape == (plan.num_rows, 256) and s.shape == (plan.num_rows, 1 if group is None else 2)
    back = dequantize_rows(q, s, torch.float32)
    want = ref.dispatch(x.float(), plan)
    empty = plan.row_to_slot < 0
    assert empty.any() and (back[empty] == 0).all()
    rel = 2.0**-4 if fmt == "fp8" else 1 / 127
    amax = want.abs().amax(1, keepdim=True)
    assert ((back - want).abs() <= torch.maximum(want.abs() * rel, amax * rel)).all()


def test_payload_bytes_counts_the_formats():
    bf = payload_bytes(16384, 4096, 8, None)
    f8 = payload_bytes(16384, 4096, 8, "fp8")
    assert bf["written"] == 2 * 16384 * 8 * 4096
    assert f8["written"] == 16384 * 8 * (4096 + 4)
    assert 1.79 < bf["total"] / f8["total"] < 1.8  # x is read in bf16 by both
    assert 1.99 < bf["written"] / f8["written"] < 2.0


def test_payload_errors_name_the_problem():
    plan = _plan(4, 4, 2)
    x = torch.randn(4, 200)
    with pytest.raises(ValueError, match="fmt='int4'"):
        quantize_tokens(x, "int4")
    with pytest.raises(ValueError, match="D divisible"):
        quantize_dispatch(x, plan, "fp8", 128)
    with pytest.raises(ValueError, match="group=64"):
        quantize_dispatch(x, plan, "fp8", 64)
    with pytest.raises(ValueError, match="backend='cuda'"):
        quantize_dispatch(x, plan, "fp8", None, backend="cuda")


# ---------------------------------------------------------------- payload: the Triton kernel

KERNEL_CASES = [
    # (T, D, E, K, capacity_factor, pad, dtype): the edge each covers
    (1, 128, 4, 1, None, 1, torch.bfloat16),        # one token, k=1
    (37, 384, 12, 3, 1.0, 1, torch.bfloat16),       # drops + empty capacity rows, odd T
    (20, 256, 7, 7, None, 4, torch.float16),        # k = E, E not a power of two, padded rows
    (70, 200, 5, 2, None, 1, torch.float32),        # D not a multiple of 128 (per-token only)
]


@needs_kernels
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"T{c[0]}D{c[1]}E{c[2]}K{c[3]}")
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_kernel_matches_reference_exactly(case, fmt, device, monkeypatch):
    from routerlib.kernels import _rowmap
    from routerlib.kernels.quant import quantize_dispatch as kernel

    monkeypatch.setattr(_rowmap, "POISON_OUTPUTS", True)
    T_, D_, E_, K_, cf, pad, dtype = case
    plan = _plan(T_, E_, K_, seed=T_, capacity_factor=cf, pad=pad)
    plan = type(plan)(**{k: (v.to(device) if torch.is_tensor(v) else v)
                         for k, v in plan.__dict__.items()})
    x = _tokens(T_, D_, dtype, seed=D_).to(device)
    for group in ([None, 128] if D_ % 128 == 0 else [None]):
        q, s = kernel(x, plan, fmt, group)
        q_ref, s_ref = quantize_dispatch_reference(x, plan, fmt, group)
        codes = (lambda t: t.view(torch.uint8)) if fmt == "fp8" else (lambda t: t)
        assert_equal_int(codes(q), codes(q_ref), f"{fmt} codes group={group}")
        assert torch.equal(s, s_ref), f"{fmt} scales group={group}"


@needs_kernels
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_kernel_two_pass_rows_match_reference(fmt, device, monkeypatch):
    # a tile narrower than the row: per-token scales take the two-pass loop (amax, then codes)
    from routerlib.kernels.quant import quantize_dispatch as kernel

    monkeypatch.setattr("routerlib.kernels.quant._PIN", "BLOCK_T=2,BLOCK_D=128,num_warps=4")
    plan = _plan(9, 5, 2, seed=3, capacity_factor=1.0)
    plan = type(plan)(**{k: (v.to(device) if torch.is_tensor(v) else v)
                         for k, v in plan.__dict__.items()})
    x = _tokens(9, 320, torch.bfloat16, seed=4).to(device)
    q, s = kernel(x, plan, fmt)
    q_ref, s_ref = quantize_dispatch_reference(x, plan, fmt)
    codes = (lambda t: t.view(torch.uint8)) if fmt == "fp8" else (lambda t: t)
    assert_equal_int(codes(q), codes(q_ref), "codes")
    assert torch.equal(s, s_ref)
    monkeypatch.setattr("routerlib.kernels.quant._PIN", "BLOCK_T=2,BLOCK_D=64,num_warps=4")
    with pytest.raises(ValueError, match="multiple of the scale group"):
        kernel(torch.randn(9, 256, device=device), plan, fmt, 128)


@needs_kernels
def test_kernel_errors(device):
    from routerlib.kernels.quant import quantize_dispatch as kernel

    plan = _plan(4, 4, 2)
    plan = type(plan)(**{k: (v.to(device) if torch.is_tensor(v) else v)
                         for k, v in plan.__dict__.items()})
    x = torch.randn(4, 256, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="no backward"):
        kernel(x, plan, "fp8")
    with pytest.raises(ValueError, match="has 3 rows"):
        kernel(torch.randn(3, 256, device=device), plan, "fp8")
    with pytest.raises(ValueError, match="fmt='e5m2'"):
        kernel(x.detach(), plan, "e5m2")


# ---------------------------------------------------------------- quantized layer forward

@pytest.mark.parametrize("fmt,tol", [("fp8", 0.06), ("int8", 0.02)])
def test_layer_output_error_with_a_quantized_payload(fmt, tol):
    cfg = RouterConfig(num_experts=8, top_k=2, capacity_factor=1.5)
    layer = MoELayer(MoEConfig(hidden_size=128, ffn_size=64, router=cfg)).eval()
    x = torch.randn(3, 11, 128)
    with torch.no_grad():
        y0, _ = layer(x)
    assert torch.equal(moe_forward_quantized(layer, x, fmt=None), y0)
    err = relative_error(moe_forward_quantized(layer, x, fmt=fmt), y0)
    assert 0 < err < tol, err


@needs_kernels
def test_layer_forward_triton_payload_equals_torch(device):
    cfg = RouterConfig(num_experts=6, top_k=2)
    layer = MoELayer(MoEConfig(hidden_size=128, ffn_size=32, router=cfg), device=device).eval()
    x = torch.randn(13, 128, device=device)
    with torch.no_grad():
        routed = layer.router(x)
    y_t = moe_forward_quantized(layer, x, "fp8", 128, backend="triton", routed=routed)
    y_r = moe_forward_quantized(layer, x, "fp8", 128, backend="torch", routed=routed)
    assert_close(y_t, y_r, tol=1e-5)


# ---------------------------------------------------------------- agreement harness

def _sel(ids, weights):
    return Selection(topk_ids=torch.tensor(ids, dtype=torch.int32),
                     topk_weights=torch.tensor(weights, dtype=torch.float32))


def test_agreement_of_hand_built_selections():
    a = _sel([[0, 1], [2, 3]], [[0.6, 0.4], [0.5, 0.5]])
    b = _sel([[1, 0], [2, 0]], [[0.4, 0.6], [0.7, 0.3]])  # token 0: same set, other order
    key = torch.tensor([[3.0, 2.0, 1.0, 0.5], [0.0, 0.2, 2.0, 1.9]])
    agr = compare_selections(a, b, 4, key)
    assert agr.flip_rate == 0.5
    assert agr.flipped.tolist() == [False, True]
    assert math.isclose(agr.jaccard, (1 + 1 / 3) / 2)
    assert math.isclose(agr.weight_l1, (0 + (0.3 + 0.2 + 0.5)) / 2, rel_tol=1e-6)
    assert agr.load_a.tolist() == [1, 1, 1, 1] and agr.load_b.tolist() == [2, 1, 1, 0]
    assert agr.load_shift == 2 / (2 * 2 * 2)
    assert np.allclose(agr.margins, [1.0, 1.7])
    table = agr.flips_by_margin([0.0, 1.5, 10.0])
    assert table.tokens.tolist() == [1, 1] and table.flips.tolist() == [0, 1]
    same = compare_selections(a, a, 4)
    assert (same.flip_rate, same.jaccard, same.weight_l1, same.load_shift) == (0, 1, 0, 0)
    assert np.isnan(same.margins).all()  # no key given


def test_selection_margin_known_values_and_k_equals_e():
    key = torch.tensor([[5.0, 1.0, 3.0, 3.0], [0.0, 1.0, 2.0, 4.0]])
    assert selection_margin(key, 1).tolist() == [2.0, 2.0]
    assert selection_margin(key, 2).tolist() == [0.0, 1.0]  # an exact tie: margin 0
    assert np.isnan(selection_margin(key, 4).numpy()).all()


def test_router_key_follows_the_selection_rule():
    cfg = RouterConfig(num_experts=8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=2)
    logits = torch.randn(5, 8)
    key = router_key(logits, cfg)
    assert (torch.isinf(key).sum(1) == 4).all()  # two groups of two masked
    _, ids = ref.stable_topk(key, 2)
    assert torch.equal(ids.int(), ref.select(logits, cfg).topk_ids)


def test_compare_routers_with_itself_and_with_a_moved_router():
    cfg = RouterConfig(num_experts=8, top_k=2)
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_size=16, router=cfg))
    x = torch.randn(40, 32)
    same = compare_routers(layer.router, layer.router, x, layer)
    assert same.flip_rate == 0 and same.output_error == 0
    other = copy.deepcopy(layer.router)
    with torch.no_grad():
        other.gate.weight[0] += 10 * other.gate.weight[1]  # a very different expert 0
    moved = compare_routers(layer.router, other, x, layer)
    assert moved.flip_rate > 0.1 and moved.output_error > 0.05
    assert moved.summary()["flip_rate"] == moved.flip_rate


def test_agreement_rejects_mismatched_or_expert_choice_selections():
    a = _sel([[0, 1]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="differ in shape"):
        compare_selections(a, _sel([[0]], [[1.0]]), 4)
    ec = Selection(topk_ids=torch.tensor([[0, 1]], dtype=torch.int32),
                   topk_weights=torch.ones(1, 2), expert_rank=torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="token choice"):
        compare_selections(ec, ec, 2)


def test_gate_inputs_skewed_concentrates_the_load():
    loads = {}
    for kind in ("random", "skewed"):
        x, w = gate_inputs(kind, 2000, 64, 16, seed=7, n_hot=2, dtype=torch.float32)
        ids = (x @ w.t()).topk(2, dim=1).indices
        loads[kind] = torch.bincount(ids.flatten(), minlength=16).float()
    imb = {k: (v.max() / v.mean()).item() for k, v in loads.items()}
    assert imb["random"] < 1.5 < imb["skewed"]
    with pytest.raises(ValueError, match="kind='real'"):
        gate_inputs("real", 4, 4, 4)


# ---------------------------------------------------------------- GPU (full sizes)

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("group", [None, 128])
def test_kernel_full_size_gpu(fmt, group):
    from routerlib.kernels.quant import quantize_dispatch as kernel

    dev = torch.device("cuda")
    cfg = RouterConfig(num_experts=128, top_k=8)
    logits = torch.randn(4096, 128, device=dev)
    plan = ref.build_plan(ref.select(logits, cfg), cfg)
    x = _tokens(4096, 4096, torch.bfloat16).to(dev)
    q, s = kernel(x, plan, fmt, group)
    q_ref, s_ref = quantize_dispatch_reference(x, plan, fmt, group)
    # The GPU's fp32 -> e4m3 conversion writes +0 where torch writes -0 (code 0x80) for values
    # that round to zero: the same number, so -0 is compared as +0; every other code exactly.
    codes = ((lambda t: t.view(torch.uint8).masked_fill(t.view(torch.uint8) == 0x80, 0))
             if fmt == "fp8" else (lambda t: t))
    assert_equal_int(codes(q), codes(q_ref), "codes")
    assert torch.equal(s, s_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gate_paths_gpu(precision):
    x, w = gate_inputs("random", 4096, 2048, 128, seed=8, dtype=torch.float32, device="cuda")
    got = QuantGate(torch.nn.Parameter(w), precision)(x)
    err = (got.double() - x.double() @ w.double().t()).abs()
    assert (err <= _bound(x, w, precision)).all()


# ---------------------------------------------------------------- benchmark (CPU sizes)

def test_bench_quant_tiny_writes_every_part(tmp_path):
    from routerlib.bench import quant as bq
    from routerlib.bench.results import load

    bq.main(["--tiny", "--out", str(tmp_path)])
    _, rows = load(tmp_path / "quant.json")
    parts = {r.config["part"] for r in rows}
    assert parts == {"router", "payload", "layer", "experts"}
    by = {(r.variant, r.config.get("inputs"), r.config.get("group"), r.metric): r.value
          for r in rows}
    assert by[("fp32", "bf16", None, "flip_rate")] == 0.0
    assert by[("bf16", "bf16", None, "flip_rate")] <= 1e-3
    cfg = next(r.config for r in rows if r.variant == "fp8" and r.metric == "bytes")
    want = (bq.payload_bytes(cfg["T"], cfg["D"], cfg["K"], None)["total"]
            / bq.payload_bytes(cfg["T"], cfg["D"], cfg["K"], "fp8")["total"])
    assert by[("fp8", None, "token", "bytes_ratio_vs_bf16")] == want
    assert all(math.isfinite(r.value) and r.value >= 0 for r in rows)
    assert (tmp_path / "quant.csv").exists()
    # the notebook's tables and recommendation read these rows
    from routerlib.bench.results import to_frame
    from routerlib.quant import summary

    df = to_frame(tmp_path / "quant.json")
    rt = summary.router_table(df)
    assert set(rt["variant"]) == set(PRECISIONS)
    fp32 = rt[rt["variant"] == "fp32"].iloc[0]
    assert fp32["speedup_vs_fp32"] == 1.0 and fp32["flip_fp32_inputs"] == 0.0
    pt = summary.payload_table(df)
    assert len(pt) == 5 and pt["layer_output_error"].notna().sum() == 4
    assert len(summary.experts_table(df)) == 2
    lines = summary.recommendation(df)
    assert any(line.startswith("payload: ") for line in lines)
    assert any("experts tiny" in line for line in lines)


# ---------------------------------------------------------------- fp8 experts

def _expert_case(T_, D_, F_, E_, K_, cf, dtype, device, seed=0):
    from routerlib.kernels.experts_fp8 import Fp8ExpertWeights

    g = torch.Generator().manual_seed(seed)
    cfg = RouterConfig(num_experts=E_, top_k=K_, capacity_factor=cf)
    logits = torch.randn(T_, E_, generator=g)
    logits[:, -1] = -30.0  # the last expert gets no row: it owns no tile
    sel = ref.select(logits, cfg)
    plan = ref.build_plan(sel, cfg)
    plan = type(plan)(**{k: (v.to(device) if torch.is_tensor(v) else v)
                         for k, v in plan.__dict__.items()})
    x = torch.randn(T_, D_, generator=g).to(device=device, dtype=dtype)
    wgu = (torch.randn(E_, D_, 2 * F_, generator=g) / D_**0.5).to(device)
    wd = (torch.randn(E_, F_, D_, generator=g) / F_**0.5).to(device)
    return x, plan, sel.topk_weights.to(device), wgu, wd, Fp8ExpertWeights.from_weights(wgu, wd)


def test_fp8_block_weights_round_trip():
    from routerlib.kernels.experts_fp8 import Fp8ExpertWeights, quantize_blocks

    wgu = torch.randn(3, 256, 256) * torch.logspace(-2, 1, 256)[None, :, None]  # blocks differ
    wd = torch.randn(3, 128, 256)
    w = Fp8ExpertWeights.from_weights(wgu, wd, chunk=2)
    assert w.w_gate_up.shape == (3, 256, 256) and w.s_gate_up.shape == (3, 2, 2)
    assert w.w_down.shape == (3, 256, 128) and w.s_down.shape == (3, 2, 1)
    back_gu, back_d = w.dequantize()
    for back, orig in ((back_gu, wgu), (back_d, wd)):
        s = orig.abs().amax() / 448
        assert ((back - orig).abs() <= torch.maximum(orig.abs() * 2.0**-4, s * 2.0**-10)).all()
    q, s = quantize_blocks(torch.zeros(1, 128, 128))
    assert (s == 0).all() and (q.float() == 0).all()
    with pytest.raises(ValueError, match="multiples of 128"):
        Fp8ExpertWeights.from_weights(torch.randn(2, 100, 256), torch.randn(2, 128, 100))


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_fp8_experts_match_their_reference(dtype, tol, device):
    # capacity drops, an expert without rows, odd T; fp32 output: only the fp32 summation order
    # (and an e4m3 step of h it may move) separates kernel and reference
    from routerlib.kernels.experts_fp8 import fp8_experts, fp8_experts_reference
    from routerlib.reference.experts import experts as ref_experts

    x, plan, w, wgu, wd, fw = _expert_case(21, 256, 128, 5, 2, 1.25, dtype, device)
    with torch.no_grad():
        y = fp8_experts(x, plan, w, fw)
    assert y.dtype == dtype and y.shape == x.shape
    assert relative_error(y, fp8_experts_reference(x, plan, w, fw)) < tol
    # and what fp8 costs against the exact experts (e4m3: 3 mantissa bits, three roundings)
    assert relative_error(y, ref_experts(x, plan, w, wgu, wd)) < 0.1


@needs_kernels
def test_fp8_experts_read_a_quantized_payload(device):
    # the e4m3 rows of quantize-in-dispatch (1 x 128 scales) feed the up GEMM directly: the same
    # codes as gathering the tokens and quantizing them, so the same output bit for bit
    from routerlib.kernels.experts_fp8 import fp8_experts
    from routerlib.kernels.quant import quantize_dispatch as kernel

    x, plan, w, _, _, fw = _expert_case(13, 256, 128, 4, 2, None, torch.float32, device, seed=1)
    with torch.no_grad():
        y_gather = fp8_experts(x, plan, w, fw)
        y_payload = fp8_experts(x, plan, w, fw, payload=kernel(x, plan, "fp8", 128))
    assert torch.equal(y_gather, y_payload)
    with pytest.raises(ValueError, match="payload must be"):
        fp8_experts(x, plan, w, fw, payload=kernel(x, plan, "fp8", None))


@needs_kernels
def test_fp8_experts_errors(device):
    from routerlib.kernels.experts_fp8 import fp8_experts

    x, plan, w, _, _, fw = _expert_case(4, 128, 128, 3, 1, None, torch.float32, device)
    with pytest.raises(ValueError, match=r"x must be \[T, 128\]"):
        fp8_experts(x[:, :64], plan, w, fw)
    with pytest.raises(ValueError, match="no backward"):
        fp8_experts(x.requires_grad_(), plan, w, fw)


@pytest.mark.gpu
@pytest.mark.parametrize("T_", [64, 4096])
def test_fp8_experts_gpu(T_):
    from routerlib.kernels.experts_fp8 import fp8_experts, fp8_experts_reference

    x, plan, w, _, _, fw = _expert_case(T_, 2048, 768, 128, 8, None, torch.bfloat16, "cuda")
    with torch.no_grad():
        y = fp8_experts(x, plan, w, fw)
    assert relative_error(y, fp8_experts_reference(x, plan, w, fw)) < 2e-2
