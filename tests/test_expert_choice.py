"""Expert-choice kernels (routerlib.kernels.expert_choice) against the reference
select_expert_choice + build_plan: ranks and every plan field exactly, scores / weights / loss
sums within fp32 rounding, gradients against torch autograd through the reference.

On CPU the kernels run under TRITON_INTERPRET=1 (small shapes); on CUDA the same tests run on the
GPU, plus the large-shape tests marked gpu.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PLAN_FIELDS, assert_close, assert_equal_int, assert_route_matches_reference

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.kernels import route
from routerlib.kernels.expert_choice import capacity, expert_choice, expert_choice_forward

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # scores are fp32 math


def _cfg(E: int, K: int, cf: float, **kw) -> RouterConfig:
    return RouterConfig(num_experts=E, top_k=K, routing="expert_choice", capacity_factor=cf,
                        **kw)


def _own_contract(sel, plan, cfg: RouterConfig, bias: torch.Tensor | None) -> None:
    """The picks are the stable top-C of the kernel's own scores (+ bias), exactly, and the plan
    is build_plan of the kernel's selection: holds whatever the last ulp of the softmax."""
    T, E = sel.scores.shape
    key = sel.scores if bias is None else sel.scores + bias.float()
    _, picked = ref.stable_topk(key.t(), cfg.capacity(T))  # [E, C]
    want = torch.full((T, E), -1, dtype=torch.int32, device=key.device)
    C = picked.shape[1]
    want[picked, torch.arange(E, device=key.device)[:, None].expand(E, C)] = torch.arange(
        C, dtype=torch.int32, device=key.device).expand(E, C)
    assert_equal_int(sel.expert_rank, want, "expert_rank (own scores)")
    want_plan = ref.build_plan(sel, cfg)
    assert plan.capacity == want_plan.capacity and plan.num_rows == want_plan.num_rows
    for f in PLAN_FIELDS:
        assert_equal_int(getattr(plan, f), getattr(want_plan, f), f)


def _check(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None) -> None:
    sel, plan = route(logits, cfg, bias)
    assert_route_matches_reference(sel, plan, logits, cfg, bias, tol=TOL[logits.dtype])
    want = ref.select(logits, cfg, bias)
    assert_equal_int(sel.expert_rank, want.expert_rank, "expert_rank")
    assert_close(sel.scores, want.scores, 1e-5, "scores")
    _own_contract(sel, plan, cfg, bias)


@pytest.mark.parametrize("T,E,K,cf,dtype,kw", [
    (37, 5, 2, 1.0, torch.float32, {}),  # odd T, E not a power of two
    (1, 4, 1, 1.0, torch.float32, {}),  # one token: C = 1
    (50, 3, 1, 8.0, torch.float32, {}),  # C capped at T: every expert takes every token
    (64, 16, 2, 1.0, torch.bfloat16, {}),  # bf16 logits (many equal values)
    (45, 6, 2, 1.25, torch.float16, {}),  # fp16 logits
    (9, 17, 1, 1.0, torch.float32, {}),  # E padded to 32 columns; C = ceil(9/17) = 1
    (40, 8, 2, 1.5, torch.float32, dict(score_func="sigmoid", routed_scaling_factor=2.5)),
    (30, 7, 1, 1.0, torch.float32, dict(min_capacity=9)),  # min_capacity above cf*T*K/E
], ids=["odd", "T1", "C_eq_T", "bf16", "fp16", "E17", "sigmoid_scaled", "min_capacity"])
def test_matches_reference(T, E, K, cf, dtype, kw, device):
    _check(torch.randn(T, E, device=device).to(dtype), _cfg(E, K, cf, **kw))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_of_both_signs(score_func, device):
    """The bias ranks (keys of both signs: the sign flip of the sortable keys) but does not
    weigh."""
    E = 6
    bias = torch.tensor([0.3, -0.4, 0.0, -1.5, 0.05, 1.0], device=device)
    _check(torch.randn(33, E, device=device), _cfg(E, 2, 1.0, score_func=score_func,
                                                   expert_bias=True), bias)


def test_exact_ties_go_to_lower_token(device):
    """Equal rows give equal scores in every expert: the lower token wins, in both the pick and
    its rank; all-equal logits make every key a tie (the first C tokens)."""
    E = 5
    rows = torch.randn(4, E, device=device)
    logits = rows[torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2, 0, 1, 0] * 3, device=device)]
    _check(logits, _cfg(E, 2, 1.0))
    sel, plan = route(torch.zeros(21, E, device=device), _cfg(E, 1, 1.0))
    C = plan.capacity
    assert_equal_int(plan.row_to_slot.view(E, C),
                     (torch.arange(C, device=device)[None, :] * E
                      + torch.arange(E, device=device)[:, None]).int(), "row_to_slot")
    _check(torch.zeros(21, E, device=device), _cfg(E, 1, 1.0))


def test_chunks_and_steps(device):
    """Several token chunks per expert and several steps per chunk (the GPU layout at T=65536,
    shrunk): the C-th key's ties spread over chunks are taken in token order."""
    E, T = 5, 100
    cfg = _cfg(E, 2, 1.5)
    base = torch.randn(10, E, device=device)
    logits = base[torch.randint(0, 10, (T,), device=device)]  # many exact ties in every column
    C = cfg.capacity(T)
    want_sel = ref.select(logits, cfg)
    want = ref.build_plan(want_sel, cfg)
    scores, rank, slot_to_row, row_to_slot, prob_sum, zsq_sum = expert_choice_forward(
        logits, None, C, num_splits=4, block=8)  # chunks of 32 tokens: 4 steps
    assert_equal_int(rank, want_sel.expert_rank, "expert_rank")
    assert_equal_int(slot_to_row, want.slot_to_row, "slot_to_row")
    assert_equal_int(row_to_slot, want.row_to_slot, "row_to_slot")
    assert_close(prob_sum, want_sel.prob_sum, 1e-5, "prob_sum")
    assert_close(zsq_sum, want_sel.zsq_sum, 1e-5, "zsq_sum")


def test_no_tokens(device):
    sel, plan = route(torch.randn(0, 4, device=device), _cfg(4, 1, 1.0))
    assert sel.topk_ids.shape == (0, 4) and plan.num_rows == 0
    assert float(sel.prob_sum.abs().sum()) == 0.0 and float(sel.zsq_sum) == 0.0


@pytest.mark.parametrize("score_func,dtype", [("softmax", torch.float32),
                                              ("sigmoid", torch.float32),
                                              ("softmax", torch.bfloat16)])
def test_backward_matches_autograd(score_func, dtype, device):
    """d(<g1, weights> + <g2, scores> + <g3, prob_sum> + g4 * zsq_sum)/d logits equals
    autograd through the reference (the weights scaled by routed_scaling_factor)."""
    T, E = 29, 7
    cfg = _cfg(E, 2, 1.0, score_func=score_func, routed_scaling_factor=1.5)
    x = torch.randn(T, E, device=device).to(dtype)
    g1, g2 = torch.randn(T, E, device=device), torch.randn(T, E, device=device)
    g3, g4 = torch.randn(E, device=device), torch.randn((), device=device)
    grads = []
    for fn in (lambda t: route(t, cfg), lambda t: (ref.select(t, cfg), None)):
        t = x.clone().requires_grad_(True)
        sel, _ = fn(t)
        loss = ((sel.topk_weights * g1).sum() + (sel.scores * g2).sum()
                + (sel.prob_sum * g3).sum() + sel.zsq_sum * g4)
        loss.backward()
        grads.append(t.grad.float())
    assert_close(grads[0], grads[1], 1e-5 if dtype == torch.float32 else 2e-2, "grad_logits")


def test_layer_trains_with_expert_choice(device):
    """The Router with expert choice on the triton backend: plan counts and a gradient step."""
    from routerlib.router import Router

    cfg = _cfg(6, 2, 1.0, z_loss_coef=1e-2)
    r = Router(16, cfg, backend="triton", device=device).train()
    out = r(torch.randn(24, 16, device=device))
    C = cfg.capacity(24)
    assert_equal_int(out.plan.kept_counts, torch.full((6,), C, dtype=torch.int32), "kept_counts")
    (out.selection.topk_weights.sum() + out.z_loss).backward()
    assert r.gate.weight.grad is not None and bool(r.gate.weight.grad.abs().sum() > 0)


def test_torch_compile(device):
    """The custom op stays in one graph (fullgraph), forward and backward, and gives the eager
    results."""
    cfg = _cfg(5, 2, 1.0, routed_scaling_factor=2.0)

    def run(x):
        sel, plan = expert_choice(x, cfg)
        loss = (sel.topk_weights * x.detach()).sum() + sel.prob_sum.square().sum() + sel.zsq_sum
        return sel.expert_rank, plan.row_to_slot, loss

    torch._dynamo.reset()
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(run, backend=backend, fullgraph=True)
    for T in (11, 17):  # the second token count recompiles with a symbolic T (and C)
        logits = torch.randn(T, 5, device=device)
        x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        rank1, rows1, loss1 = run(x1)
        rank2, rows2, loss2 = compiled(x2)
        loss1.backward()
        loss2.backward()
        assert_equal_int(rank2, rank1, "expert_rank")
        assert_equal_int(rows2, rows1, "row_to_slot")
        assert_close(loss2, loss1, 1e-6, "loss")
        assert_close(x2.grad, x1.grad, 1e-6, "grad_logits")


def test_opcheck(device):
    """torch.library's consistency checks of the custom op: schema, fake tensor, autograd."""
    x = torch.randn(7, 4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.routerlib.expert_choice.default, (x, None, 2, "softmax"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_capacity_in_integers():
    """The traceable capacity (integer arithmetic) equals RouterConfig.capacity everywhere."""
    for E, K, cf, min_cap in [(5, 2, 1.0, 1), (7, 1, 1.1, 1), (64, 1, 1.25, 4), (3, 3, 8.0, 1),
                              (10, 1, 0.3, 2)]:
        cfg = _cfg(E, K, cf, min_capacity=min_cap)
        got = [capacity(cfg, T) for T in range(0, 300)]
        assert got == [cfg.capacity(T) for T in range(0, 300)], (E, K, cf, min_cap)


def test_benchmark_rows(tmp_path):
    """The benchmark at a toy size on the CPU: one row per variant and pass, in the shared
    schema, written to a results file that loads back."""
    from routerlib.bench import results
    from routerlib.bench.expert_choice import run

    rs = run([8], [2], [1.0], "cpu", [], 60.0, rep_ms=1.0, out=str(tmp_path),
             log=lambda *_: None)
    got = {(r.variant, r.config["pass"]) for r in rs.rows}
    assert got == {("triton", "fwd"), ("triton", "fwd+bwd"), ("torch", "fwd"),
                   ("torch", "fwd+bwd")}
    assert all(r.metric == "time_us" and r.value > 0 and r.config["C"] == 4 for r in rs.rows)
    _, rows = results.load(tmp_path / "expert_choice.json")  # written after the case
    assert len(rows) == 4


# --------------------------------------------------------------------------------------------
# GPU only: the benchmark's sizes, CUDA graphs

@pytest.mark.gpu
@pytest.mark.parametrize("T,E,cf,distinct", [
    (16384, 64, 1.0, None), (65536, 256, 2.0, None), (65536, 128, 1.0, None),
    (65536, 64, 2.0, 40),  # 40 distinct rows: tie groups of ~1600 tokens across every chunk
])
def test_gpu_large(T, E, cf, distinct):
    torch.manual_seed(T + E)
    cfg = _cfg(E, 1, cf)
    logits = torch.randn(T, E, device="cuda")
    if distinct is not None:
        logits = logits[:distinct][torch.randint(0, distinct, (T,), device="cuda")]
    sel, plan = route(logits, cfg)
    _own_contract(sel, plan, cfg, None)
    want = ref.select(logits, cfg)
    assert_close(sel.scores, want.scores, 1e-5, "scores")
    # torch's softmax and the kernel's (approximate exp and division on the GPU) may round a
    # score a few ulps apart: neighbours in a pick list may swap, a boundary pick may change
    picked, want_picked = sel.expert_rank >= 0, want.expert_rank >= 0
    same_set = (picked & want_picked).sum().item() / want_picked.sum().item()
    same_rank = (sel.expert_rank == want.expert_rank)[want_picked].float().mean().item()
    assert same_set > 0.999 and same_rank > 0.9, (same_set, same_rank)


@pytest.mark.gpu
def test_gpu_cuda_graph():
    E, T = 64, 4096
    cfg = _cfg(E, 1, 1.0)
    logits = torch.randn(T, E, device="cuda")
    eager = route(logits, cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, plan = expert_choice(logits, cfg)
    logits.copy_(torch.randn(T, E, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    _own_contract(sel, plan, cfg, None)
    assert not torch.equal(sel.expert_rank, eager[0].expert_rank)  # the replay saw new logits
