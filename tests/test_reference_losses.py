"""routerlib.reference.losses: load-balancing loss (batch, from fused statistics, per sequence),
z-loss, expert load, the aux-loss-free bias update; hand cases, naive agreement, gradients."""

from __future__ import annotations

import math

import naive
import pytest
import torch
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

from routerlib import reference as ref
from routerlib.config import RouterConfig

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# hand-checked cases


def test_load_balancing_loss_by_hand():
    # both tokens to expert 0: f = [1, 0], P = [.75, .25] -> E * sum f*P = 2 * .75 = 1.5
    scores = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert_close(ref.load_balancing_loss(scores, torch.tensor([[0], [0]])), torch.tensor(1.5))


def test_load_balancing_loss_uniform_is_one():
    # perfectly uniform routing and probabilities: E * sum_e (1/E)(1/E) = 1
    scores = torch.full((4, 4), 0.25)
    ids = torch.tensor([[0], [1], [2], [3]])
    assert_close(ref.load_balancing_loss(scores, ids), torch.tensor(1.0))


def test_load_balancing_loss_top2_by_hand():
    # K=2: slots on experts 0,1,0,2 -> f = [2/4, 1/4, 1/4, 0]; P = [.4, .3, .2, .1]
    # E * sum f*P = 4 * (.2 + .075 + .05) = 1.3
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2)
    ids = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)
    assert_close(ref.load_balancing_loss(scores, ids), torch.tensor(1.3))


def test_load_balancing_loss_sigmoid_by_hand():
    # sigmoid scores are normalised per token: [.5, .5] and [.5, .75] -> [.4, .6]; P = [.45, .55]
    # both tokens on expert 1: f = [0, 1] -> 2 * .55 = 1.1
    scores = torch.tensor([[0.5, 0.5], [0.5, 0.75]])
    loss = ref.load_balancing_loss(scores, torch.tensor([[1], [1]]), "sigmoid")
    assert_close(loss, torch.tensor(1.1))


def test_sequence_loss_by_hand():
    # seq 0: both tokens on expert 0 with P = [.75, .25] -> 1.5
    # seq 1: one token each, P = [.5, .5] -> 2 * (.25 + .25) = 1.0; mean = 1.25
    # (the batch loss differs: f = [.75, .25], P = [.625, .375] -> 1.125)
    scores = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    ids = torch.tensor([[0], [0], [0], [1]])
    assert_close(ref.sequence_load_balancing_loss(scores, ids, seq_len=2), torch.tensor(1.25))
    assert_close(ref.load_balancing_loss(scores, ids), torch.tensor(1.125))


def test_z_loss_by_hand():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2: mean of squares 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert_close(ref.z_loss(logits), torch.tensor(2.5 * LN2 ** 2))
    assert ref.z_loss(logits.bfloat16()).dtype == torch.float32


def test_expert_load_by_hand():
    ids = torch.tensor([[0, 2], [2, 3]], dtype=torch.int32)
    assert ref.expert_load(ids, 5).tolist() == [1, 0, 2, 1, 0]


def test_update_expert_bias_by_hand():
    # load [3, 1, 2], mean 2: the overloaded expert 0 goes down, expert 1 up, expert 2 stays
    bias = torch.tensor([0.5, 0.5, 0.5])
    new = ref.update_expert_bias(bias, torch.tensor([3, 1, 2]), rate=0.1)
    assert_close(new, torch.tensor([0.4, 0.6, 0.5]))
    assert new.dtype == bias.dtype and torch.equal(bias, torch.tensor([0.5, 0.5, 0.5]))


def test_empty_batch_losses_are_zero():
    scores, ids = torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int32)
    assert ref.load_balancing_loss(scores, ids).item() == 0.0
    assert ref.sequence_load_balancing_loss(scores, ids, seq_len=3).item() == 0.0
    assert ref.z_loss(torch.zeros(0, 4)).item() == 0.0
    assert ref.load_balancing_loss_from_stats(torch.zeros(4), torch.zeros(4), 0, 2).item() == 0.0


# ---------------------------------------------------------------------------------------------
# agreement with the naive loops; the fused-statistics form equals the direct form

# (T, E, K, score_func, seq_len, edge covered)
CASES = [
    (1, 4, 2, "softmax", 1, "a single token"),
    (9, 5, 2, "softmax", 3, "odd T, E not a power of two"),
    (8, 6, 1, "sigmoid", 4, "k=1, sigmoid"),
    (6, 3, 3, "softmax", 2, "k=E"),
    (10, 1, 1, "softmax", 5, "one expert"),
    (12, 8, 3, "sigmoid", 12, "one sequence = the batch"),
]


@pytest.mark.parametrize("T, E, K, score_func, seq_len, why", CASES, ids=[c[5] for c in CASES])
def test_losses_match_naive(T, E, K, score_func, seq_len, why):
    cfg = RouterConfig(num_experts=E, top_k=K, score_func=score_func)
    logits = torch.randn(T, E) * 2
    sel = ref.select(logits, cfg)
    ids = sel.topk_ids.tolist()
    srows = sel.scores.double().tolist()
    lbl = ref.load_balancing_loss(sel.scores, sel.topk_ids, score_func)
    assert_close(lbl, torch.tensor(naive.load_balancing_loss(srows, ids, E, score_func)),
                 name="load_balancing_loss")
    seq = ref.sequence_load_balancing_loss(sel.scores, sel.topk_ids, seq_len, score_func)
    assert_close(seq, torch.tensor(naive.sequence_load_balancing_loss(srows, ids, E, seq_len,
                                                                      score_func)), name="seq")
    if seq_len == T:
        assert_close(seq, lbl, name="one sequence equals the batch loss")
    assert_close(ref.z_loss(logits), torch.tensor(naive.z_loss(logits)), name="z_loss")
    assert_close(ref.z_loss(logits), sel.zsq_sum / T, name="z_loss from zsq_sum")
    # the fused statistics of the selection stage give the same balance loss
    plan = ref.build_plan(sel, cfg)
    from_stats = ref.load_balancing_loss_from_stats(sel.prob_sum, plan.expert_counts, T, K)
    assert_close(from_stats, lbl, name="load_balancing_loss_from_stats")
    assert ref.expert_load(sel.topk_ids, E).tolist() == naive.expert_load(ids, E)


@given(T=st.integers(1, 10), E=st.integers(1, 6), K=st.integers(1, 3),
       score_func=st.sampled_from(["softmax", "sigmoid"]), n_seq=st.integers(1, 3),
       seed=st.integers(0, 999))
def test_losses_property(T, E, K, score_func, n_seq, seed):
    K = min(K, E)
    T = T * n_seq  # n_seq sequences of T tokens
    cfg = RouterConfig(num_experts=E, top_k=K, score_func=score_func)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    sel = ref.select(logits, cfg)
    srows, ids = sel.scores.double().tolist(), sel.topk_ids.tolist()
    lbl = ref.load_balancing_loss(sel.scores, sel.topk_ids, score_func)
    assert_close(lbl, torch.tensor(naive.load_balancing_loss(srows, ids, E, score_func)))
    load = ref.expert_load(sel.topk_ids, E)
    assert_close(ref.load_balancing_loss_from_stats(sel.prob_sum, load, T, K), lbl)
    seq = ref.sequence_load_balancing_loss(sel.scores, sel.topk_ids, T // n_seq, score_func)
    assert_close(seq, torch.tensor(naive.sequence_load_balancing_loss(srows, ids, E, T // n_seq,
                                                                      score_func)))
    # E * sum f*P with sum f = sum P = 1 lies in [0, E]
    assert 0.0 <= lbl.item() <= E + 1e-5
    bias = torch.randn(E, generator=torch.Generator().manual_seed(seed + 1))
    new = ref.update_expert_bias(bias, load, 0.01)
    assert_close(new, torch.tensor(naive.update_expert_bias(bias.tolist(), load.tolist(), 0.01)))


# ---------------------------------------------------------------------------------------------
# gradients (float64)


def _ids(T: int, E: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_load_balancing_loss_gradcheck(score_func):
    ids = _ids(6, 4, 2, seed=0)
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    act = (lambda x: x.softmax(-1)) if score_func == "softmax" else torch.sigmoid
    assert torch.autograd.gradcheck(
        lambda lg: ref.load_balancing_loss(act(lg), ids, score_func), (logits,))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_loss_gradcheck(score_func):
    ids = _ids(6, 4, 2, seed=1)
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    act = (lambda x: x.softmax(-1)) if score_func == "softmax" else torch.sigmoid
    assert torch.autograd.gradcheck(
        lambda lg: ref.sequence_load_balancing_loss(act(lg), ids, 3, score_func), (logits,))


def test_from_stats_gradcheck():
    load = torch.tensor([3, 0, 2, 1])
    prob_sum = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p: ref.load_balancing_loss_from_stats(p, load, 3, 2), (prob_sum,))


def test_z_loss_gradcheck():
    # z_loss computes logsumexp in fp32 (also for float64 input): step and tolerance sized for
    # fp32 outputs; a wrong gradient is O(1e-1) off here
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ref.z_loss, (logits,), eps=1e-3, atol=1e-4, rtol=1e-3)


def test_z_loss_gradient_by_formula():
    # d/dx mean(lse(x)^2) = 2 lse(x) softmax(x) / T
    logits = torch.randn(5, 4, requires_grad=True)
    ref.z_loss(logits).backward()
    x = logits.detach().double()
    expected = 2 * torch.logsumexp(x, -1, keepdim=True) * x.softmax(-1) / 5
    assert_close(logits.grad, expected.float())


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_fused_stats_loss_has_the_same_gradient(score_func):
    # the Router's balance loss (from Selection.prob_sum) back-propagates like the direct form
    cfg = RouterConfig(num_experts=5, top_k=2, score_func=score_func)
    base = torch.randn(7, 5)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    sa, sb = ref.select(a, cfg), ref.select(b, cfg)
    load = ref.expert_load(sa.topk_ids, 5)
    ref.load_balancing_loss_from_stats(sa.prob_sum, load, 7, 2).backward()
    ref.load_balancing_loss(sb.scores, sb.topk_ids, score_func).backward()
    assert a.grad.abs().max() > 0
    assert_close(a.grad, b.grad, name="dlogits")


# ---------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("seq_len", [0, 4, -2])
def test_sequence_loss_rejects_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match=rf"seq_len={seq_len} must be >= 1 and divide the token "
                                         r"count T=6"):
        ref.sequence_load_balancing_loss(torch.rand(6, 3), _ids(6, 3, 1, 0), seq_len)
