"""routerlib.reference.gating: scores, token-choice and expert-choice selection, weights, the
loss statistics of the selection stage, training-time noise, input checks, gradients."""

from __future__ import annotations

import math

import naive
import pytest
import torch
from helpers import assert_close, assert_equal_int
from hypothesis import given
from hypothesis import strategies as st

from routerlib import reference as ref
from routerlib.config import RouterConfig

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _position_independent(values: list[float]) -> list[float]:
    """The values whose sigmoid torch computes bit-identically at every position of a tensor.

    On CPU, torch's vectorised body and scalar tail of an elementwise op can round differently
    (seen for ~4% of sigmoid inputs with AVX512): two equal logits then get scores an ulp apart,
    and the tie they should form is broken by position. Tie tests draw only from values that
    really tie (also once rounded to bf16 or fp16, as the logits of those dtypes are)."""
    kept = []
    for v in values:
        ok = True
        for dt in LOW_PRECISION:
            r = torch.tensor([v]).to(dt).float()
            ok &= bool((torch.sigmoid(r.expand(259).contiguous()) == torch.sigmoid(r)).all())
        if ok:
            kept.append(v)
    return kept


# a coarse grid with frequent equal values; the 0.1 offset avoids x = -y pairs, whose sigmoids
# sum to exactly one (equal group top-2 sums from different experts)
TIE_GRID = _position_independent([k / 2 + 0.1 for k in range(-6, 7)])
# random values for whole duplicated rows (expert choice compares tokens: grid rows that differ
# by a shift have mathematically equal softmax scores that fp32 rounds apart by an ulp)
ROW_VALUES = _position_independent(
    (torch.randn(96, generator=torch.Generator().manual_seed(0)) * 2).tolist())


def make_logits(T: int, E: int, dtype: torch.dtype = torch.float32, ties: bool = False,
                seed: int = 0, token_ties: bool = False) -> torch.Tensor:
    """[T, E] logits. ties=True draws from TIE_GRID, so equal values within a token are frequent;
    token_ties=True (for expert choice) repeats whole rows of ROW_VALUES instead."""
    g = torch.Generator().manual_seed(seed)
    if ties and token_ties:
        vals = torch.tensor(ROW_VALUES)
        rows = vals[torch.randint(0, len(vals), ((T + 1) // 2, E), generator=g)]
        x = rows[torch.randint(0, rows.shape[0], (T,), generator=g)]
    elif ties:
        x = torch.tensor(TIE_GRID)[torch.randint(0, len(TIE_GRID), (T, E), generator=g)]
    else:
        x = torch.randn(T, E, generator=g) * 2
    return x.to(dtype)


def make_bias(E: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(E, generator=torch.Generator().manual_seed(seed)) * 0.3


def check_against_naive(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None
                        ) -> None:
    """The reference selection equals the naive loops: ids and ranks exactly, floats closely."""
    sel = ref.select(logits, cfg, bias)
    nsel = naive.select(logits, cfg, bias)
    T = logits.shape[0]
    S = cfg.slots_per_token
    assert sel.topk_ids.shape == (T, S) and sel.topk_ids.dtype == torch.int32
    assert_equal_int(sel.topk_ids, nsel.ids_tensor(), "topk_ids")
    assert_close(sel.topk_weights, nsel.weights_tensor().float(), tol=1e-5, name="topk_weights")
    assert_close(sel.scores, torch.tensor(nsel.scores).reshape(T, -1).float(), tol=1e-5,
                 name="scores")
    assert_close(sel.prob_sum, torch.tensor(nsel.prob_sum).float(), tol=1e-5, name="prob_sum")
    assert_close(sel.zsq_sum, torch.tensor(nsel.zsq_sum).float(), tol=1e-5, name="zsq_sum")
    if cfg.routing == "expert_choice":
        assert_equal_int(sel.expert_rank, torch.tensor(nsel.expert_rank).reshape(T, -1),
                         "expert_rank")
    else:
        assert sel.expert_rank is None


# ---------------------------------------------------------------------------------------------
# hand-checked cases


def test_softmax_top2_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    sel = ref.select(logits, RouterConfig(num_experts=4, top_k=2))
    z = math.e ** 0 + math.e ** 1 + math.e ** 2 + math.e ** 3
    # the two largest logits are 3 (expert 1) and 2 (expert 2), best first
    assert sel.topk_ids.tolist() == [[1, 2]]
    # weights are the full softmax probabilities e^3/z and e^2/z (no renormalisation)
    assert_close(sel.topk_weights, torch.tensor([[math.e ** 3 / z, math.e ** 2 / z]]))
    assert_close(sel.scores, torch.tensor([[math.e / z, math.e ** 3 / z, math.e ** 2 / z, 1 / z]]))
    # z-loss statistic: logsumexp = log z
    assert_close(sel.zsq_sum, torch.tensor(math.log(z) ** 2))


def test_renormalize_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    cfg = RouterConfig(num_experts=4, top_k=2, renormalize=True, routed_scaling_factor=2.0)
    sel = ref.select(logits, cfg)
    # renormalised over the selected two: e^3/(e^3+e^2), e^2/(e^3+e^2); then times 2
    a, b = math.e ** 3, math.e ** 2
    assert sel.topk_ids.tolist() == [[1, 2]]
    assert_close(sel.topk_weights, torch.tensor([[2 * a / (a + b), 2 * b / (a + b)]]))


def test_softmax_after_topk_by_hand():
    # logits ln(1), ln(3), ln(2), -10: the top two are experts 1 and 2, and the softmax over just
    # those two logits gives 3/5 and 2/5
    logits = torch.tensor([[0.0, math.log(3.0), math.log(2.0), -10.0]])
    sel = ref.select(logits, RouterConfig(num_experts=4, top_k=2, softmax_after_topk=True))
    assert sel.topk_ids.tolist() == [[1, 2]]
    assert_close(sel.topk_weights, torch.tensor([[0.6, 0.4]]))


def test_ties_go_to_lower_expert_by_hand():
    # experts 1, 2, 3 tie at the top; K=2 takes the two lowest indices of the tie
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    for score_func in ("softmax", "sigmoid"):
        sel = ref.select(logits, RouterConfig(num_experts=4, top_k=2, score_func=score_func))
        assert sel.topk_ids.tolist() == [[1, 2], [0, 1]], score_func


def test_bias_selects_but_does_not_weight_by_hand():
    # sigmoid scores: expert 2 is best, but a bias of +2 on expert 0 makes it selected;
    # the weight stays the unbiased sigmoid(0) = 0.5
    logits = torch.tensor([[0.0, 0.5, 1.0, -1.0]])
    cfg = RouterConfig(num_experts=4, top_k=1, score_func="sigmoid", expert_bias=True)
    sel = ref.select(logits, cfg, torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert sel.topk_ids.tolist() == [[0]]
    assert_close(sel.topk_weights, torch.tensor([[0.5]]))
    sel0 = ref.select(logits, cfg, torch.zeros(4))
    assert sel0.topk_ids.tolist() == [[2]]
    assert_close(sel0.topk_weights, torch.tensor([[1 / (1 + math.exp(-1.0))]]))


def test_sigmoid_prob_sum_by_hand():
    # sigmoid scores are normalised per token for the balance loss statistic
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # sigmoids .5,.5 and .5,.75
    sel = ref.select(logits, RouterConfig(num_experts=2, top_k=1, score_func="sigmoid"))
    assert_close(sel.prob_sum, torch.tensor([0.5 + 0.4, 0.5 + 0.6]))


@pytest.mark.parametrize("group_score, expected", [
    # group maxima: .993, .881, .818, .269 -> groups 0 and 1 -> experts 0 (sigma 5) and 2
    # (the tie 2 vs 3 goes to the lower expert)
    ("max", [0, 2]),
    # group top-2 sums: 1.000, 1.762, 1.635, .538 -> groups 1 and 2 -> experts 2 and 3 (tie)
    ("top2_sum", [2, 3]),
])
def test_group_limit_by_hand(group_score, expected):
    logits = torch.tensor([[5.0, -5.0, 2.0, 2.0, 1.5, 1.5, -1.0, -1.0]])
    cfg = RouterConfig(num_experts=8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=2,
                       group_score=group_score)
    sel = ref.select(logits, cfg)
    assert sel.topk_ids.tolist() == [expected]
    # weights are sigmoid scores of the picked experts
    assert_close(sel.topk_weights, torch.sigmoid(logits[:, expected]))


def test_group_limit_masks_other_groups_by_hand():
    sel = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.3, 0.4]])  # 3 groups of 2, max: .9, .8, .4
    cfg = RouterConfig(num_experts=6, top_k=2, n_groups=3, topk_groups=2)
    out = ref.group_limit(sel, cfg)
    inf = float("-inf")
    assert out.tolist()[0][:4] == pytest.approx([0.1, 0.9, 0.8, 0.2])
    assert out.tolist()[0][4:] == [inf, inf]


def test_expert_choice_by_hand():
    # T=4, E=2, K=1, cf=1: C = ceil(1*4*1/2) = 2 tokens per expert
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0]])
    cfg = RouterConfig(num_experts=2, top_k=1, routing="expert_choice", capacity_factor=1.0)
    sel = ref.select(logits, cfg)
    # softmax scores of expert 0: s(2)=.881, s(-2)=.119, s(1)=.731, .5 -> picks tokens 0 then 2;
    # expert 1 (the complement): .119, .881, .269, .5 -> picks token 1 then 3
    assert sel.expert_rank.tolist() == [[0, -1], [-1, 0], [1, -1], [-1, 1]]
    assert sel.topk_ids.tolist() == [[0, 1]] * 4
    assert_close(sel.topk_weights, logits.softmax(-1))


def test_expert_choice_ties_to_lower_token():
    logits = torch.zeros(5, 3)  # every token ties for every expert
    cfg = RouterConfig(num_experts=3, top_k=1, routing="expert_choice", capacity_factor=1.0)
    sel = ref.select(logits, cfg)  # C = ceil(5/3) = 2: tokens 0 and 1 for every expert
    assert sel.expert_rank.tolist() == [[0] * 3, [1] * 3] + [[-1] * 3] * 3


def test_stable_topk_keeps_index_order():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    vals, idx = ref.stable_topk(x, 3)
    assert idx.tolist() == [[1, 2, 4]] and vals.tolist() == [[3.0, 3.0, 3.0]]


def test_selection_key_rule():
    # raw logits when nothing else matters; scores with groups or bias; logits (+bias) for
    # softmax_after_topk
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    scores = logits.sigmoid()
    bias = torch.tensor([0.0, 1.0, 0.0, 0.0])
    plain = RouterConfig(num_experts=4, top_k=1, score_func="sigmoid")
    grouped = RouterConfig(num_experts=4, top_k=1, score_func="sigmoid", n_groups=2)
    after = RouterConfig(num_experts=4, top_k=1, softmax_after_topk=True)
    assert torch.equal(ref.selection_key(logits, scores, plain, None), logits)
    assert torch.equal(ref.selection_key(logits, scores, plain, bias), scores + bias)
    assert torch.equal(ref.selection_key(logits, scores, grouped, None), scores)
    assert torch.equal(ref.selection_key(logits, scores, after, bias), logits + bias)


def test_logit_key_keeps_order_that_scores_round_away():
    # two logits so close that their softmax scores round to the same fp32 value: ranking raw
    # logits keeps the larger one first (no bias, no groups)
    logits = torch.tensor([[0.0, 1e-7, 30.0]])
    assert logits.softmax(-1)[0, 0] == logits.softmax(-1)[0, 1]
    sel = ref.select(logits, RouterConfig(num_experts=3, top_k=2))
    assert sel.topk_ids.tolist() == [[2, 1]]


def test_tie_inputs_are_plentiful():
    # the filters above keep enough values to make ties and varied rows
    assert len(TIE_GRID) >= 8 and len(ROW_VALUES) >= 64


# ---------------------------------------------------------------------------------------------
# agreement with the naive loops on random inputs

# (T, E, K, config overrides, edge covered)
CASES = [
    (1, 4, 2, {}, "a single token"),
    (7, 5, 2, {}, "odd T, E not a power of two"),
    (16, 6, 1, {}, "k=1"),
    (5, 6, 6, {}, "k=E"),
    (9, 1, 1, {}, "one expert"),
    (13, 10, 2, dict(renormalize=True), "renormalised softmax"),
    (11, 7, 3, dict(softmax_after_topk=True), "softmax after top-k"),
    (11, 7, 3, dict(softmax_after_topk=True, expert_bias=True), "after top-k with bias"),
    (12, 8, 2, dict(score_func="sigmoid", renormalize=True, routed_scaling_factor=2.5,
                    expert_bias=True), "DeepSeek-style sigmoid + bias + scale"),
    (6, 9, 3, dict(score_func="sigmoid"), "plain sigmoid, E=9"),
    (10, 8, 3, dict(n_groups=4, topk_groups=2), "groups by max (softmax key)"),
    (10, 12, 4, dict(score_func="sigmoid", n_groups=4, topk_groups=2, group_score="top2_sum",
                     expert_bias=True, renormalize=True), "groups by top2_sum + bias"),
    (8, 6, 3, dict(n_groups=6, topk_groups=3, group_score="top2_sum"), "groups of one expert"),
    (7, 6, 4, dict(n_groups=3, topk_groups=2, score_func="sigmoid"), "K fills the kept groups"),
    (9, 5, 2, dict(routing="expert_choice", capacity_factor=1.0), "expert choice"),
    (1, 3, 1, dict(routing="expert_choice", capacity_factor=2.0), "expert choice, one token"),
    (6, 4, 2, dict(routing="expert_choice", capacity_factor=1.5, score_func="sigmoid",
                   expert_bias=True, routed_scaling_factor=2.0), "expert choice sigmoid + bias"),
    (5, 3, 1, dict(routing="expert_choice", capacity_factor=8.0), "expert choice, C capped at T"),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("T, E, K, overrides, why", CASES, ids=[c[4] for c in CASES])
def test_select_matches_naive(T, E, K, overrides, why, ties, dtype):
    cfg = RouterConfig(num_experts=E, top_k=K, **overrides)
    bias = make_bias(E) if cfg.expert_bias else None
    ec = cfg.routing == "expert_choice"
    check_against_naive(make_logits(T, E, dtype, ties, T * 31 + E, token_ties=ec), cfg, bias)


def test_select_duplicated_logits_match_naive():
    # every token is a copy of one row, and inside a row experts come in equal pairs
    row = torch.tensor([0.3, 0.3, -1.2, 2.0, 2.0, -1.2, 0.7, 0.7])
    logits = row.expand(5, 8).contiguous()
    # plain: 2.0 (experts 3, 4) then the 0.7 tie (6 before 7). Grouped by top-2 sums of
    # sigmoids: 1.149, 1.112, 1.112 (a tie of groups 1 and 2), 1.336 -> groups 3 and 0 kept,
    # then 0.7, 0.7, 0.3 -> experts 6, 7, 0
    for overrides, expected in ((dict(), [3, 4, 6]),
                                (dict(score_func="sigmoid", n_groups=4, topk_groups=2,
                                      group_score="top2_sum"), [6, 7, 0]),
                                (dict(n_groups=4, topk_groups=3), [3, 4, 6])):
        cfg = RouterConfig(num_experts=8, top_k=3, **overrides)
        check_against_naive(logits, cfg, None)
        assert ref.select(logits, cfg).topk_ids.tolist() == [expected] * 5, overrides


def test_select_all_tokens_to_one_expert():
    logits = torch.randn(10, 6)
    logits[:, 4] += 50.0
    sel = ref.select(logits, RouterConfig(num_experts=6, top_k=1))
    assert (sel.topk_ids == 4).all()
    check_against_naive(logits, RouterConfig(num_experts=6, top_k=2), None)


def test_select_empty_batch():
    sel = ref.select(torch.zeros(0, 4), RouterConfig(num_experts=4, top_k=2))
    assert sel.topk_ids.shape == (0, 2) and sel.topk_weights.shape == (0, 2)
    assert sel.prob_sum.tolist() == [0.0] * 4 and sel.zsq_sum.item() == 0.0


def test_weights_sum_to_scale():
    logits = make_logits(9, 7)
    for overrides in (dict(renormalize=True), dict(softmax_after_topk=True),
                      dict(score_func="sigmoid", renormalize=True)):
        cfg = RouterConfig(num_experts=7, top_k=3, routed_scaling_factor=1.5, **overrides)
        w = ref.select(logits, cfg).topk_weights
        assert_close(w.sum(-1), torch.full((9,), 1.5), name=str(overrides))


def test_low_precision_logits_select_like_their_fp32_copy():
    # fp16/bf16 logits are upcast before anything: identical to selecting on the fp32 copy
    for dtype in (torch.bfloat16, torch.float16):
        logits = make_logits(12, 8, dtype)
        cfg = RouterConfig(num_experts=8, top_k=2, renormalize=True)
        a, b = ref.select(logits, cfg), ref.select(logits.float(), cfg)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)


@st.composite
def router_configs(draw) -> RouterConfig:
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    kw: dict = dict(num_experts=E, top_k=K, score_func=score_func,
                    expert_bias=draw(st.booleans()),
                    routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
    if draw(st.booleans()):
        kw.update(routing="expert_choice", capacity_factor=draw(st.sampled_from([0.5, 1.0, 2.0])))
        return RouterConfig(**kw)
    if score_func == "softmax" and draw(st.booleans()):
        kw["softmax_after_topk"] = True
    else:
        kw["renormalize"] = draw(st.booleans())
    G = draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
    if G > 1:
        per = E // G
        tg = draw(st.integers(-(-K // per), G))  # enough kept groups for K experts
        kw.update(n_groups=G, topk_groups=tg, group_score=draw(st.sampled_from(["max",
                                                                                "top2_sum"])))
    return RouterConfig(**kw)


@given(cfg=router_configs(), T=st.integers(1, 9), ties=st.booleans(), seed=st.integers(0, 999),
       dtype=st.sampled_from(LOW_PRECISION))
def test_select_property_matches_naive(cfg, T, ties, seed, dtype):
    ec = cfg.routing == "expert_choice"
    logits = make_logits(T, cfg.num_experts, dtype, ties, seed, token_ties=ec)
    bias = make_bias(cfg.num_experts, seed + 1) if cfg.expert_bias else None
    check_against_naive(logits, cfg, bias)
    sel = ref.select(logits, cfg, bias)
    if cfg.routing == "token_choice":  # K distinct experts per token, weights >= 0
        assert all(len(set(r)) == cfg.top_k for r in sel.topk_ids.tolist())
        assert (sel.topk_weights >= 0).all()
    else:  # every expert picks exactly C tokens
        C = cfg.capacity(T)
        assert ((sel.expert_rank >= 0).sum(0) == C).all()


# ---------------------------------------------------------------------------------------------
# bad inputs


def _cfg4(**kw) -> RouterConfig:
    return RouterConfig(num_experts=4, top_k=2, **kw)


def test_rejects_logits_of_wrong_rank():
    with pytest.raises(ValueError, match=r"logits must be 2-D \[T, E\], got shape \(2, 3, 4\)"):
        ref.select(torch.zeros(2, 3, 4), _cfg4())


def test_rejects_logits_with_wrong_expert_count():
    with pytest.raises(ValueError, match=r"logits has 5 experts .* but num_experts=4"):
        ref.select(torch.zeros(3, 5), _cfg4())


def test_rejects_integer_logits():
    with pytest.raises(TypeError, match=r"logits dtype must be one of .*, got torch.int64"):
        ref.select(torch.zeros(3, 4, dtype=torch.long), _cfg4())


def test_rejects_non_tensor_logits():
    with pytest.raises(TypeError, match=r"logits must be a torch.Tensor, got list"):
        ref.select([[0.0] * 4], _cfg4())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_logits(bad):
    logits = torch.zeros(3, 4)
    logits[2, 1] = bad
    with pytest.raises(ValueError, match=r"logits contain NaN or inf \(first at \[token, "
                                         r"expert\]=\[2, 1\]\)"):
        ref.select(logits, _cfg4())


def test_non_finite_check_can_be_switched_off():
    logits = torch.zeros(2, 4)
    logits[0, 0] = float("nan")
    sel = ref.select(logits, _cfg4(check_finite=False))  # no error: the caller opted out
    assert sel.topk_ids.shape == (2, 2)


def test_rejects_missing_bias():
    with pytest.raises(ValueError, match=r"expert_bias=True but no bias tensor was given"):
        ref.select(torch.zeros(3, 4), _cfg4(expert_bias=True))


def test_rejects_bias_of_wrong_shape():
    with pytest.raises(ValueError, match=r"expert bias must have shape \(4,\), got \(5,\)"):
        ref.select(torch.zeros(3, 4), _cfg4(expert_bias=True), torch.zeros(5))


def test_rejects_bias_on_another_device():
    with pytest.raises(ValueError, match=r"expert bias is on meta but logits are on cpu"):
        ref.select(torch.zeros(3, 4), _cfg4(expert_bias=True), torch.zeros(4, device="meta"))


# ---------------------------------------------------------------------------------------------
# gradients


def _separated_logits(T: int, E: int, seed: int) -> torch.Tensor:
    """float64 logits whose values inside a token are >= 0.25 apart: no tie within eps."""
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).double() * 0.5
    return (base + 0.1 * torch.rand(T, E, generator=g, dtype=torch.float64) - 1.0)


GRAD_CASES = [
    dict(),
    dict(renormalize=True),
    dict(softmax_after_topk=True, routed_scaling_factor=2.0),
    dict(score_func="sigmoid"),
    dict(score_func="sigmoid", renormalize=True, routed_scaling_factor=2.5),
    dict(score_func="sigmoid", n_groups=3, topk_groups=2, group_score="top2_sum"),
]


@pytest.mark.parametrize("overrides", GRAD_CASES, ids=[str(o) for o in GRAD_CASES])
def test_weights_gradcheck(overrides):
    # The selection stage computes in fp32 by contract (Selection.topk_weights is fp32), so the
    # float64 input is checked with a step and tolerance sized for fp32 outputs: a wrong or
    # missing gradient term is O(1e-2) off, rounding stays below 1e-4.
    cfg = RouterConfig(num_experts=6, top_k=3, **overrides)
    logits = _separated_logits(4, 6, seed=len(str(overrides))).requires_grad_()

    def weights(lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sel = ref.select(lg, cfg)
        return sel.topk_weights, sel.prob_sum

    assert torch.autograd.gradcheck(weights, (logits,), eps=1e-3, atol=1e-4, rtol=1e-3)


def test_weights_gradient_matches_naive_float64():
    # the autograd gradient of sum(w * c) through the reference equals the float64 gradient of
    # the same expression written directly (softmax Jacobian, renormalised)
    logits = _separated_logits(5, 6, seed=3)
    cfg = RouterConfig(num_experts=6, top_k=2, renormalize=True, routed_scaling_factor=2.0)
    c = torch.randn(5, 2, dtype=torch.float64)
    lg = logits.clone().requires_grad_()
    sel = ref.select(lg, cfg)
    (sel.topk_weights.double() * c).sum().backward()
    lg64 = logits.clone().requires_grad_()
    p = lg64.softmax(-1).gather(1, sel.topk_ids.long())
    (2.0 * p / p.sum(-1, keepdim=True) * c).sum().backward()
    assert_close(lg.grad, lg64.grad, tol=1e-5, name="dlogits")


def test_bias_gets_no_gradient_and_does_not_change_weights():
    logits = _separated_logits(6, 4, seed=5).float()
    cfg = RouterConfig(num_experts=4, top_k=2, score_func="sigmoid", expert_bias=True)
    bias = torch.full((4,), 0.01, requires_grad=True)
    sel = ref.select(logits, cfg, bias)
    assert not sel.topk_weights.requires_grad  # the bias only moves the selection
    assert_close(sel.topk_weights, logits.sigmoid().gather(1, sel.topk_ids.long()))


# ---------------------------------------------------------------------------------------------
# training-time noise


def test_input_jitter_range_and_identity():
    x = torch.ones(200, 8)
    assert ref.input_jitter(x, 0.0) is x
    y = ref.input_jitter(x, 0.1, torch.Generator().manual_seed(0))
    assert (y >= 0.9).all() and (y <= 1.1).all() and y.std() > 0.03
    assert ref.input_jitter(x.bfloat16(), 0.1).dtype == torch.bfloat16
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ref.input_jitter(x, 0.2, g1), ref.input_jitter(x, 0.2, g2))


def test_logit_noise_std_and_identity():
    logits = torch.zeros(400, 8)
    assert ref.logit_noise(logits, 0.0) is logits
    noisy = ref.logit_noise(logits, 0.5, torch.Generator().manual_seed(0))
    assert abs(noisy.std().item() - 0.5) < 0.05 and abs(noisy.mean().item()) < 0.05
