"""Fused score + top-K kernel (routerlib.kernels.topk) against the reference
select_token_choice: ids exactly, weights / prob_sum / zsq_sum within fp32 rounding, gradients
against torch autograd through the reference, the custom op under torch.compile.

On CPU the kernels run under TRITON_INTERPRET=1 (small shapes); on CUDA the same tests run on the
GPU, plus the large-shape tests marked gpu.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_equal_int, poison_like

from routerlib.config import RouterConfig
from routerlib.kernels._topk_kernels import topk_config
from routerlib.kernels.topk import fused_topk, fused_topk_forward
from routerlib.reference.gating import select_token_choice

# Scoring modes (RouterConfig overrides), each a distinct formula for the weights or the key.
MODES = {
    "softmax": dict(),
    "softmax_renorm": dict(renormalize=True),
    "softmax_scaled": dict(routed_scaling_factor=2.5),
    "softmax_after": dict(softmax_after_topk=True),
    "softmax_after_scaled": dict(softmax_after_topk=True, routed_scaling_factor=0.5),
    "sigmoid": dict(score_func="sigmoid"),
    "sigmoid_renorm_scaled": dict(score_func="sigmoid", renormalize=True,
                                  routed_scaling_factor=2.5),
}


def _cfg(E: int, K: int, **kw) -> RouterConfig:
    return RouterConfig(num_experts=E, top_k=K, **kw)


def _bias(E: int, device) -> torch.Tensor:
    return (0.1 * torch.randn(E)).to(device)


def _check(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
           tol: float = 1e-5) -> None:
    """Kernel (writing into poisoned buffers) == reference."""
    exp = select_token_choice(logits, cfg, bias)
    T, K = logits.shape[0], cfg.top_k
    ids = poison_like(torch.empty(T, K, dtype=torch.int32, device=logits.device))
    w = poison_like(torch.empty(T, K, dtype=torch.float32, device=logits.device))
    ids, w, prob_sum, zsq_sum = fused_topk_forward(
        logits, bias, K, cfg.score_func, cfg.softmax_after_topk, cfg.renormalize,
        cfg.routed_scaling_factor, cfg.n_groups, cfg.topk_groups, cfg.group_score, out=(ids, w))
    assert not torch.isnan(w).any(), "some weights left unwritten"
    assert_equal_int(ids, exp.topk_ids, "topk_ids")
    assert_close(w, exp.topk_weights, tol, "topk_weights")
    assert_close(prob_sum, exp.prob_sum, tol, "prob_sum")
    assert_close(zsq_sum, exp.zsq_sum, tol, "zsq_sum")


def _shape_cases():
    for T in (1, 7, 33):  # a single token; fewer than a tile; several tiles with a ragged tail
        for E in (1, 3, 8, 13, 64, 160):  # E=1; non powers of two (padding); 160 > 128 padded
            for K in sorted({1, 2, E}):  # top-1; top-2; K = E (every expert)
                if K <= E:
                    yield T, E, K


@pytest.mark.parametrize("T,E,K", list(_shape_cases()))
def test_shapes(T, E, K, device):
    _check(torch.randn(T, E, device=device), _cfg(E, K))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T,E,K", [(33, 13, 3), (7, 64, 8)])
def test_modes(T, E, K, mode, with_bias, device):
    # with a bias the key becomes the scores + bias (logits + bias after softmax_after_topk)
    bias = _bias(E, device) if with_bias else None
    _check(torch.randn(T, E, device=device), _cfg(E, K, expert_bias=with_bias, **MODES[mode]),
           bias)


GROUP_CASES = [
    (8, 4, 2, 3),  # 4 groups of 2
    (12, 4, 2, 5),  # groups of 3, padded E
    (8, 8, 3, 2),  # groups of one expert (top2_sum degenerates to the max)
    (64, 8, 4, 8),  # DeepSeek-like proportions
    (160, 8, 3, 8),  # groups of 20 inside a padded 256-wide tile
]


def _group_params():
    for case in GROUP_CASES:
        for group_score in ("max", "top2_sum"):
            for mode in ("softmax", "sigmoid_renorm_scaled", "softmax_after"):
                for with_bias in (False, True):
                    # softmax_after ranks the logits: a few unbiased cases cover it
                    if mode != "softmax_after" or (not with_bias and case[0] <= 64):
                        yield (*case, group_score, mode, with_bias)


@pytest.mark.parametrize("E,G,TG,K,group_score,mode,with_bias", list(_group_params()))
def test_groups(E, G, TG, K, group_score, mode, with_bias, device):
    cfg = _cfg(E, K, n_groups=G, topk_groups=TG, group_score=group_score,
               expert_bias=with_bias, **MODES[mode])
    bias = _bias(E, device) if with_bias else None
    _check(torch.randn(19, E, device=device), cfg, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", ["softmax", "softmax_after", "sigmoid_bias_groups"])
@pytest.mark.parametrize("E,K", [(13, 2), (64, 8)])
def test_dtypes(E, K, case, dtype, device):
    # logits loaded in their own dtype and computed in fp32, exactly as reference's .float()
    logits = (3 * torch.randn(21, E, device=device)).to(dtype)
    if case == "sigmoid_bias_groups":
        G = 1 if E == 13 else 8
        cfg = _cfg(E, K, score_func="sigmoid", renormalize=True, n_groups=G, topk_groups=1 + G // 2,
                   group_score="top2_sum", expert_bias=True)
        _check(logits, cfg, _bias(E, device))
    else:
        _check(logits, _cfg(E, K, **MODES[case]))


TIE_CASES = {
    "softmax": dict(),
    "sigmoid_renorm": dict(score_func="sigmoid", renormalize=True),
    "softmax_after": dict(softmax_after_topk=True),
    "groups_max": dict(n_groups=4, topk_groups=2),
    "groups_top2": dict(n_groups=4, topk_groups=3, group_score="top2_sum", score_func="sigmoid"),
}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", list(TIE_CASES))
def test_ties(case, with_bias, device):
    # small integer logits: many equal keys (and equal group scores), the lower index must win;
    # a bias of a few distinct values keeps ties after it is added. Includes -0.0 vs +0.0.
    T, E, K = 33, 16, 5
    logits = torch.randint(-2, 3, (T, E), device=device).float()
    logits[0] = 0.0
    logits[0, ::2] = -0.0
    logits[1] = 1.0  # a whole row tied
    bias = (0.25 * torch.randint(-1, 2, (E,))).to(device) if with_bias else None
    _check(logits, _cfg(E, K, expert_bias=with_bias, **TIE_CASES[case]), bias)


def test_empty_tokens(device):
    # T = 0: no launch, empty ids/weights, zero sums
    sel = fused_topk(torch.empty(0, 8, device=device), _cfg(8, 2))
    assert sel.topk_ids.shape == (0, 2) and sel.topk_weights.shape == (0, 2)
    assert sel.scores is None
    assert_close(sel.prob_sum, torch.zeros(8), name="prob_sum")
    assert_close(sel.zsq_sum, torch.zeros(()), name="zsq_sum")


def test_persistent_tiles_and_pinned_config(monkeypatch, device):
    # pinned tiny tiles + 3 programs: each program walks several tiles (the persistent loop)
    cfg = _cfg(13, 3, score_func="sigmoid", renormalize=True)
    logits = torch.randn(33, 13, device=device)
    exp = select_token_choice(logits, cfg)
    monkeypatch.setenv("ROUTERLIB_TOPK_CONFIG", "4,1")
    assert topk_config(13) == (4, 1, 4)
    ids, w, prob_sum, zsq_sum = fused_topk_forward(
        logits, None, 3, "sigmoid", False, True, 1.0, max_programs=3)
    assert_equal_int(ids, exp.topk_ids, "topk_ids")
    assert_close(w, exp.topk_weights, name="topk_weights")
    assert_close(prob_sum, exp.prob_sum, name="prob_sum")
    assert_close(zsq_sum, exp.zsq_sum, name="zsq_sum")
    monkeypatch.setenv("ROUTERLIB_TOPK_CONFIG", "8,2,3")
    assert topk_config(13) == (8, 2, 3)
    for bad in ("3,4", "4", "x,4", "4,3", "4,4,0"):
        monkeypatch.setenv("ROUTERLIB_TOPK_CONFIG", bad)
        with pytest.raises(ValueError, match=f"ROUTERLIB_TOPK_CONFIG='{bad}'"):
            topk_config(13)


def test_many_programs(monkeypatch, device):
    # one token per program: P = 33 partial rows, more than one chunk of the stats kernel's loop
    monkeypatch.setenv("ROUTERLIB_TOPK_CONFIG", "1,1")
    _check(torch.randn(33, 64, device=device), _cfg(64, 4, score_func="sigmoid"))


def test_bitwise_reproducible(device):
    # no float atomics: the same input gives the same bits
    logits = torch.randn(33, 64, device=device)
    a = fused_topk(logits, _cfg(64, 8))
    b = fused_topk(logits, _cfg(64, 8))
    for name in ("topk_ids", "topk_weights", "prob_sum", "zsq_sum"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_strided_rows(device):
    # logits as a column slice of a wider tensor: row stride 20 != E
    wide = torch.randn(9, 20, device=device)
    logits = wide[:, :13]
    _check(logits, _cfg(13, 4, renormalize=True))
    sel = fused_topk(logits, _cfg(13, 4))
    assert_equal_int(sel.topk_ids, select_token_choice(logits, _cfg(13, 4)).topk_ids)


# ---------------------------------------------------------------------------------------------
# gradients: d(<gw, weights> + <gp, prob_sum> + gz * zsq_sum) / d logits vs reference autograd

def _grads(fn, logits, gw, gp, gz):
    x = logits.detach().clone().requires_grad_(True)
    sel = fn(x)
    loss = x.new_zeros((), dtype=torch.float32)
    if gw is not None:
        loss = loss + (sel.topk_weights * gw).sum()
    if gp is not None:
        loss = loss + (sel.prob_sum * gp).sum()
    if gz is not None:
        loss = loss + sel.zsq_sum * gz
    loss.backward()
    return x.grad


GRAD_MODES = dict(MODES, sigmoid_renorm=dict(score_func="sigmoid", renormalize=True),
                  groups_bias=dict(n_groups=4, topk_groups=2, score_func="sigmoid",
                                   renormalize=True, expert_bias=True))


@pytest.mark.parametrize("used", ["all", "weights", "stats"])
@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("T,E,K", [(7, 12, 3), (5, 8, 8)])
def test_grad(T, E, K, mode, used, device):
    # (5, 8, 8): K = E, every expert selected
    kw = dict(GRAD_MODES[mode])
    if "n_groups" in kw and K == E:
        kw["topk_groups"] = kw["n_groups"]  # K = E needs every group
    cfg = _cfg(E, K, **kw)
    bias = _bias(E, device) if cfg.expert_bias else None
    logits = torch.randn(T, E, device=device)
    gw = torch.randn(T, K, device=device) if used in ("all", "weights") else None
    gp = torch.randn(E, device=device) if used in ("all", "stats") else None
    gz = torch.tensor(0.7, device=device) if used in ("all", "stats") else None
    got = _grads(lambda x: fused_topk(x, cfg, bias), logits, gw, gp, gz)
    exp = _grads(lambda x: select_token_choice(x, cfg, bias), logits, gw, gp, gz)
    assert got.dtype == logits.dtype
    assert_close(got, exp, 2e-5, "grad_logits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_low_precision(dtype, device):
    # grad_logits comes back in the logits dtype, accumulated in fp32
    cfg = _cfg(12, 3, renormalize=True)
    logits = torch.randn(7, 12, device=device).to(dtype)
    gw, gp, gz = torch.randn(7, 3, device=device), torch.randn(12, device=device), None
    got = _grads(lambda x: fused_topk(x, cfg), logits, gw, gp, gz)
    exp = _grads(lambda x: select_token_choice(x, cfg), logits, gw, gp, gz)
    assert got.dtype == dtype
    assert_close(got, exp, name="grad_logits")


def test_torch_compile(device):
    # the custom op stays in one graph (fullgraph) and compiles forward and backward
    cfg = _cfg(12, 3, score_func="sigmoid", renormalize=True, routed_scaling_factor=2.5,
               n_groups=4, topk_groups=2, expert_bias=True)
    bias = _bias(12, device)
    logits = torch.randn(9, 12, device=device)
    gw = torch.randn(9, 3, device=device)

    def run(x):
        sel = fused_topk(x, cfg, bias)
        loss = (sel.topk_weights * gw).sum() + sel.prob_sum.square().sum() + sel.zsq_sum
        return sel.topk_ids, sel.topk_weights, loss

    torch._dynamo.reset()
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(run, backend=backend, fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ids1, w1, loss1 = run(x1)
    ids2, w2, loss2 = compiled(x2)
    loss1.backward()
    loss2.backward()
    assert_equal_int(ids2, ids1, "topk_ids")
    assert_close(w2, w1, name="topk_weights")
    assert_close(loss2, loss1, name="loss")
    assert_close(x2.grad, x1.grad, name="grad_logits")


def test_opcheck(device):
    # torch.library's own consistency checks: schema, fake tensor, autograd registration
    logits = torch.randn(5, 8, device=device, requires_grad=True)
    args = (logits, None, 2, "softmax", False, True, 1.0, 1, 1, "max")
    torch.library.opcheck(torch.ops.routerlib.fused_topk.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------
# GPU: production shapes (skipped without CUDA)

@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,kw", [
    (16384, 128, 8, dict()),  # Qwen3-30B-like
    (65536, 512, 8, dict()),
    (65536, 256, 8, dict(score_func="sigmoid", renormalize=True, routed_scaling_factor=2.5,
                         n_groups=8, topk_groups=4, group_score="top2_sum", expert_bias=True)),
    (4099, 8, 2, dict(softmax_after_topk=True)),  # Mixtral-like, ragged T
    (65537, 64, 8, dict(renormalize=True)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large(T, E, K, kw, dtype):
    cfg = _cfg(E, K, **kw)
    bias = _bias(E, "cuda") if cfg.expert_bias else None
    # well-separated random logits: near-ties of the scores are rare at these sizes
    _check((2 * torch.randn(T, E, device="cuda")).to(dtype), cfg, bias, tol=2e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph():
    # no host sync inside: the op can be captured and replayed in a CUDA graph
    cfg = _cfg(128, 8, renormalize=True)
    logits = torch.randn(16384, 128, device="cuda")
    fused_topk(logits, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel = fused_topk(logits, cfg)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    exp = select_token_choice(logits, cfg)
    assert_equal_int(sel.topk_ids, exp.topk_ids, "topk_ids")
    assert_close(sel.topk_weights, exp.topk_weights, name="topk_weights")
    assert_close(sel.prob_sum, exp.prob_sum, 1e-4, "prob_sum")


@pytest.mark.gpu
def test_gpu_grad_large():
    cfg = _cfg(256, 8, score_func="sigmoid", renormalize=True, n_groups=8, topk_groups=4)
    logits = torch.randn(8192, 256, device="cuda")
    gw, gp, gz = (torch.randn(8192, 8, device="cuda"), torch.randn(256, device="cuda"),
                  torch.tensor(0.3, device="cuda"))
    got = _grads(lambda x: fused_topk(x, cfg), logits, gw, gp, gz)
    exp = _grads(lambda x: select_token_choice(x, cfg), logits, gw, gp, gz)
    assert_close(got, exp, 1e-4, "grad_logits")
