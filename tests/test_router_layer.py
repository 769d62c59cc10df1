"""Router (gate + noise + route + losses + bias update) and MoELayer (loop vs batched expert
paths, shared expert, [B, S, D] input, backward, expert choice), against the naive loops."""

from __future__ import annotations

import dataclasses

import naive
import pytest
import torch
from helpers import TOL, assert_close

from routerlib import reference as ref
from routerlib.config import MoEConfig, RouterConfig
from routerlib.layer import MoELayer
from routerlib.router import Router

D = 16  # hidden size used throughout (a multiple of 8: the bf16 grouped-GEMM path applies)


def make_router(**overrides) -> Router:
    base = dict(num_experts=4, top_k=2)
    base.update(overrides)
    return Router(D, RouterConfig(**base))


# ---------------------------------------------------------------------------------------------
# Router


def test_router_forward_is_gate_then_reference():
    router = make_router(capacity_factor=1.0, drop_policy="priority")
    x = torch.randn(9, D)
    out = router(x)
    logits = x @ router.gate.weight.t()  # [T, E]: a bias-free linear gate
    assert_close(out.logits, logits)
    sel = ref.select(out.logits, router.cfg)
    plan = ref.build_plan(sel, router.cfg)
    assert torch.equal(out.topk_ids, sel.topk_ids)
    assert torch.equal(out.topk_weights, sel.topk_weights)
    assert torch.equal(out.plan.slot_to_row, plan.slot_to_row)
    assert torch.equal(out.plan.row_to_slot, plan.row_to_slot)
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0  # coefficients are 0


def test_router_eval_is_deterministic_despite_noise_settings():
    router = make_router(jitter_eps=0.5, noise_std=1.0).eval()
    x = torch.randn(8, D)
    a, b = router(x), router(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.topk_ids, b.topk_ids)
    assert torch.equal(a.logits, router.gate(x))  # no jitter, no noise


@pytest.mark.parametrize("noise", [dict(jitter_eps=0.5), dict(noise_std=1.0)],
                         ids=["jitter", "logit noise"])
def test_router_training_noise_changes_logits(noise):
    router = make_router(**noise).train()
    x = torch.randn(8, D)
    clean = router.gate(x)
    a = router(x, generator=torch.Generator().manual_seed(1))
    b = router(x, generator=torch.Generator().manual_seed(1))
    c = router(x, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a.logits, clean)  # noise is applied in training mode
    assert torch.equal(a.logits, b.logits)  # and it follows the generator
    assert not torch.equal(a.logits, c.logits)
    if "jitter_eps" in noise:
        # jitter multiplies the input by U(0.5, 1.5): each logit is a mix of those scaled terms
        lo = (x.abs() * 0.5) @ router.gate.weight.abs().t()
        assert ((a.logits - clean).abs() <= lo + 1e-5).all()


def test_router_training_without_noise_is_clean():
    router = make_router().train()
    x = torch.randn(8, D)
    assert torch.equal(router(x).logits, router.gate(x))


def test_router_losses_scaled_by_coefficients():
    coefs = dict(aux_loss_coef=0.01, seq_aux_loss_coef=0.003, z_loss_coef=0.002)
    router = make_router(**coefs, score_func="sigmoid", renormalize=True)
    x = torch.randn(12, D)
    out = router(x, seq_len=4)
    scores = ref.score(out.logits, router.cfg)
    ids = out.topk_ids
    lbl = ref.load_balancing_loss(scores, ids, "sigmoid")
    seq = ref.sequence_load_balancing_loss(scores, ids, 4, "sigmoid")
    assert_close(out.aux_loss, 0.01 * lbl + 0.003 * seq, name="aux_loss")
    assert_close(out.z_loss, 0.002 * ref.z_loss(out.logits), name="z_loss")
    # the naive loops agree on the unscaled values
    srows = scores.double().tolist()
    expected = 0.01 * naive.load_balancing_loss(srows, ids.tolist(), 4, "sigmoid") + \
        0.003 * naive.sequence_load_balancing_loss(srows, ids.tolist(), 4, 4, "sigmoid")
    assert_close(out.aux_loss, torch.tensor(expected), name="aux_loss vs naive")
    # doubling a coefficient doubles its loss
    router2 = make_router(**{**coefs, "z_loss_coef": 0.004}, score_func="sigmoid",
                          renormalize=True)
    router2.load_state_dict(router.state_dict())
    assert_close(router2(x, seq_len=4).z_loss, 2 * out.z_loss)


def test_router_losses_backpropagate_to_gate():
    router = make_router(aux_loss_coef=0.1, z_loss_coef=0.1)
    out = router(torch.randn(10, D))
    (out.aux_loss + out.z_loss).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().max() > 0


def test_router_expert_choice_has_no_aux_loss():
    router = make_router(routing="expert_choice", capacity_factor=1.0, aux_loss_coef=0.5)
    out = router(torch.randn(6, D))
    assert out.aux_loss.item() == 0.0 and out.plan.slot_to_row.shape == (6, 4)


def test_router_seq_aux_loss_needs_seq_len():
    router = make_router(seq_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match=r"seq_aux_loss_coef > 0 needs seq_len"):
        router(torch.randn(6, D))


def test_router_random_policy_dropless():
    # dropless with drop_policy="random": the router draws the keys that order rows inside an
    # expert (it used to pass None and the plan refused it)
    router = make_router(drop_policy="random", pad_to_multiple=4)
    out = router(torch.randn(7, D), generator=torch.Generator().manual_seed(0))
    assert int(out.plan.kept_counts.sum()) == 14 and int(out.plan.num_dropped()) == 0


def test_router_random_policy_with_capacity_uses_generator():
    router = make_router(drop_policy="random", capacity_factor=0.5)
    x = torch.randn(16, D)
    a = router(x, generator=torch.Generator().manual_seed(0)).plan
    b = router(x, generator=torch.Generator().manual_seed(0)).plan
    assert torch.equal(a.slot_to_row, b.slot_to_row)
    assert int(a.num_dropped()) > 0


def test_update_bias_by_hand():
    router = make_router(expert_bias=True, bias_update_rate=0.1)
    assert router.expert_bias.tolist() == [0.0] * 4
    router.update_bias(torch.tensor([5, 1, 3, 3]))  # mean 3: expert 0 over, expert 1 under
    assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_update_bias_moves_toward_balance():
    # a gate that sends almost every token to expert 0; the bias update must pull load off it
    router = make_router(expert_bias=True, bias_update_rate=0.05, score_func="sigmoid",
                         top_k=1).eval()
    with torch.no_grad():
        router.gate.weight.mul_(0.1)
        router.gate.weight[0] += 0.1
    x = torch.randn(64, D).abs()
    first = router(x).plan.expert_counts.clone()
    assert first[0] > 32  # expert 0 overloaded at the start
    bias0 = router.expert_bias[0].item()
    for _ in range(30):
        router.update_bias(router(x).plan.expert_counts)
    last = router(x).plan.expert_counts
    assert router.expert_bias[0].item() < bias0  # the overloaded expert's bias went down
    assert last.max() < first.max()  # and the worst load improved


def test_update_bias_needs_expert_bias():
    with pytest.raises(RuntimeError, match=r"update_bias needs RouterConfig.expert_bias=True"):
        make_router().update_bias(torch.ones(4))


def test_router_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"x must have shape \[T, 16\], got \(2, 3, 16\)"):
        make_router()(torch.zeros(2, 3, D))


def test_router_rejects_wrong_hidden_size():
    with pytest.raises(ValueError, match=r"x must have shape \[T, 16\], got \(3, 15\)"):
        make_router()(torch.zeros(3, 15))


def test_router_rejects_dtype_mismatch():
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but the router weight has "
                                        r"torch.float32"):
        make_router()(torch.zeros(3, D, dtype=torch.bfloat16))


def test_router_rejects_device_mismatch():
    with pytest.raises(ValueError, match=r"x is on meta but the router weight is on cpu"):
        make_router()(torch.zeros(3, D, device="meta"))


def test_router_rejects_non_tensor():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        make_router()([[0.0] * D])


def test_router_rejects_non_finite_input():
    x = torch.zeros(3, D)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logits contain NaN or inf"):
        make_router()(x)


# ---------------------------------------------------------------------------------------------
# MoELayer


def make_layer(ffn: int = 8, shared: int = 0, path: str = "batched", dtype=torch.float32,
               **router) -> MoELayer:
    base = dict(num_experts=4, top_k=2)
    base.update(router)
    cfg = MoEConfig(hidden_size=D, ffn_size=ffn, router=RouterConfig(**base),
                    shared_expert_size=shared, expert_path=path)
    return MoELayer(cfg, dtype=dtype)


def naive_layer(layer: MoELayer, x: torch.Tensor, out) -> torch.Tensor:
    """The layer's output token by token in float64, from the router's own decisions."""
    y = naive.moe(x, out.plan.slot_to_row.tolist(), out.topk_ids.tolist(), out.topk_weights,
                  layer.experts.w_gate_up.detach(), layer.experts.w_down.detach())
    if layer.shared is not None:
        for t in range(x.shape[0]):
            y[t] += naive.swiglu(x[t], layer.shared.w_gate_up[0].detach(),
                                 layer.shared.w_down[0].detach())
    return y


# (router overrides, ffn width, edge covered)
LAYOUTS = [
    (dict(), 8, "dropless"),
    (dict(pad_to_multiple=4), 8, "dropless padded to 4"),
    (dict(pad_to_multiple=3), 4, "padded to 3, F=4 (no grouped GEMM in bf16)"),
    (dict(capacity_factor=0.75), 8, "capacity with drops"),
    (dict(capacity_factor=1.5, drop_policy="priority"), 8, "capacity, priority"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("overrides, ffn, why", LAYOUTS, ids=[c[2] for c in LAYOUTS])
def test_loop_path_equals_batched_path(overrides, ffn, why, dtype):
    batched = make_layer(ffn, dtype=dtype, **overrides)
    loop = make_layer(ffn, path="loop", dtype=dtype, **overrides)
    loop.load_state_dict(batched.state_dict())
    x = torch.randn(11, D).to(dtype)
    y_b, out_b = batched(x)
    y_l, out_l = loop(x)
    assert y_b.dtype == dtype and y_b.shape == x.shape
    assert torch.equal(out_b.plan.slot_to_row, out_l.plan.slot_to_row)
    assert_close(y_l, y_b, tol=TOL[dtype], name="loop vs batched")
    # and both equal the token-by-token naive MoE (bf16: bf16 intermediates in the experts,
    # measured ~4e-3 on CPU)
    expected = naive_layer(batched, x, out_b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(y_b.double(), expected, tol=tol, name="batched vs naive")


def test_dropped_tokens_get_zero_output():
    layer = make_layer(capacity_factor=0.25, top_k=1)
    x = torch.randn(16, D)
    y, out = layer(x)
    dropped = (out.plan.slot_to_row < 0).all(1)  # tokens whose every slot was dropped
    assert dropped.any() and (y[dropped] == 0).all() and (y[~dropped] != 0).any()


def test_shared_expert_adds_its_mlp():
    layer = make_layer(shared=12, capacity_factor=1.0)
    plain = make_layer(capacity_factor=1.0)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if not k.startswith("shared.")})
    x = torch.randn(10, D)
    y, out = layer(x)
    y_plain, _ = plain(x)
    shared = torch.stack([naive.swiglu(x[t], layer.shared.w_gate_up[0].detach(),
                                       layer.shared.w_down[0].detach()) for t in range(10)])
    assert_close(y - y_plain, shared.float(), name="shared expert contribution")
    assert_close(y.double(), naive_layer(layer, x, out), tol=1e-5, name="layer vs naive")


def test_three_dim_input():
    layer = make_layer(seq_aux_loss_coef=0.01)
    x = torch.randn(2, 5, D)  # [B, S, D]
    y, out = layer(x)
    assert y.shape == (2, 5, D) and out.plan.slot_to_row.shape == (10, 2)
    layer_nocoef = make_layer()
    layer_nocoef.load_state_dict(layer.state_dict())
    y2, _ = layer_nocoef(x.reshape(10, D))  # same tokens flattened
    assert_close(y.reshape(10, D), y2)
    # the sequence length reaches the per-sequence balance loss
    scores = ref.score(out.logits, layer.cfg.router)
    assert_close(out.aux_loss, 0.01 * ref.sequence_load_balancing_loss(scores, out.topk_ids, 5))
    with pytest.raises(ValueError, match=r"needs seq_len"):
        layer(x.reshape(10, D))  # 2-D input: no sequence length


@pytest.mark.parametrize("path", ["batched", "loop"])
@pytest.mark.parametrize("overrides", [dict(), dict(capacity_factor=1.25)],
                         ids=["dropless", "capacity"])
def test_backward_gives_finite_grads_to_every_parameter(path, overrides):
    layer = make_layer(shared=8, path=path, aux_loss_coef=0.01, z_loss_coef=0.001, **overrides)
    x = torch.randn(32, D, requires_grad=True)
    y, out = layer(x)
    assert (out.plan.kept_counts > 0).all()  # every expert has rows, so every weight is used
    (y.square().mean() + out.aux_loss + out.z_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert torch.isfinite(x.grad).all()


def test_gate_gradient_flows_through_combine_weights():
    # with no loss coefficient the router gate still learns, through the combine weights
    layer = make_layer()
    y, _ = layer(torch.randn(12, D))
    y.sum().backward()
    assert layer.router.gate.weight.grad.abs().max() > 0


@pytest.mark.parametrize("path", ["batched", "loop"])
def test_expert_choice_layer(path):
    layer = make_layer(path=path, routing="expert_choice", capacity_factor=1.0)
    x = torch.randn(10, D)
    y, out = layer(x)
    C = layer.cfg.router.capacity(10)  # ceil(1 * 10 * 2 / 4) = 5 tokens per expert
    assert C == 5 and out.plan.kept_counts.tolist() == [5] * 4
    assert_close(y.double(), naive_layer(layer, x, out), tol=1e-5,
                 name="expert choice vs naive")
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_layer_config_is_respected():
    layer = make_layer(shared=4)
    assert layer.experts.w_gate_up.shape == (4, D, 16) and layer.experts.w_down.shape == (4, 8, D)
    assert layer.shared.w_gate_up.shape == (1, D, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.cfg.ffn_size = 3  # type: ignore[misc]
