"""The MoE language model (routerlib.models): cache decoding, training with every balancing
strategy, the text corpus, checkpoints, routing metrics and traces. Tiny shapes: CPU seconds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from routerlib import RouterConfig
from routerlib.metrics import RoutingStats
from routerlib.models.data import (
    BatchSampler,
    corpus_documents,
    eval_batches,
    is_validation,
    load_corpus,
)
from routerlib.models.lm import LMConfig, MoETransformer
from routerlib.models.study import Strategy, lm_config, steps_for_budget, strategies
from routerlib.models.traces import DEFAULT_TRACE, RoutingTrace, capture_trace, load_trace
from routerlib.models.train import (
    TrainConfig,
    build_model,
    load_checkpoint,
    lr_at,
    routing_frame,
    save_checkpoint,
    train,
)

TINY_ROUTER = RouterConfig(num_experts=6, top_k=2, renormalize=True, check_finite=False)


def tiny_lm(vocab: int = 97, **kw) -> LMConfig:
    base = dict(vocab_size=vocab, max_seq_len=32, num_layers=2, hidden_size=32, num_heads=2,
                ffn_size=16, router=TINY_ROUTER)
    return LMConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared CPU they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


# -- the model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dense_first, E, K, prefill", [
    (False, 6, 2, 5),    # E not a power of two, chunked prefill then one token at a time
    (True, 8, 1, 1),     # dense first layer, k=1, decoding from the first token
    (False, 5, 5, 11),   # k = E, the whole prompt in one prefill
])
def test_cache_decoding_matches_full_forward(dense_first, E, K, prefill):
    r = RouterConfig(num_experts=E, top_k=K, renormalize=True)
    model = MoETransformer(tiny_lm(num_layers=3, first_layer_dense=dense_first,
                                   router=r)).eval()
    idx = torch.randint(0, 97, (3, 13))
    full = model(idx)
    assert full.logits.shape == (3, 13, 97) and full.logits.dtype == torch.float32
    assert len(full.router) == 3 - int(dense_first)
    cache = model.new_cache(3, 20)
    steps = [model(idx[:, :prefill], cache=cache, input_pos=torch.arange(prefill)).logits]
    for t in range(prefill, 13):
        steps.append(model(idx[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=2e-5, rtol=1e-5)


def test_model_rejects_bad_input():
    model = MoETransformer(tiny_lm())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 64)
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="input_pos"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=model.new_cache(1, 8))
    with pytest.raises(ValueError, match="divisible"):
        tiny_lm(num_heads=3)


def test_active_parameters():
    model = MoETransformer(tiny_lm())
    per_expert = 3 * 32 * 16  # SwiGLU D -> F -> D
    assert model.num_params() - model.num_params(active=True) == 2 * per_expert * (6 - 2)


# -- the corpus ---------------------------------------------------------------------------------

def test_corpus_is_real_text_with_a_fixed_split(corpus):
    docs = corpus_documents()["docs"]
    assert [d["split"] for d in docs] == ["val" if is_validation(i) else "train"
                                          for i in range(len(docs))]
    assert docs[0]["name"].startswith("pydoc:") and "stdlib:" in docs[-1]["name"]
    assert len(corpus.train) > 10 ** 6 and len(corpus.val) > 5 * 10 ** 4
    assert corpus.train.dtype == np.uint16 and int(corpus.train.max()) < corpus.vocab_size
    # text, not random tokens: a few hundred distinct ids make up half of it
    counts = np.sort(np.bincount(corpus.train, minlength=corpus.vocab_size))[::-1]
    assert counts[:300].sum() > 0.5 * len(corpus.train)


def test_committed_tokens_are_the_tokenized_text(corpus):
    pytest.importorskip("tokenizers")
    from routerlib.models.data import load_tokenizer

    tok = load_tokenizer()
    val_docs = [d["text"] for d in corpus_documents()["docs"] if d["split"] == "val"]
    first = tok.encode(val_docs[0]).ids
    assert corpus.val[:len(first)].tolist() == first
    assert corpus.val[len(first)] == tok.token_to_id("<|endoftext|>")
    assert tok.decode(first) == val_docs[0]


def test_sampler_is_seeded(corpus):
    a = BatchSampler(corpus.train, 4, 16, seed=3)
    b = BatchSampler(corpus.train, 4, 16, seed=3)
    (x1, y1), (x2, y2) = next(a), next(b)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 16) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(next(a)[0], x1)
    ev = eval_batches(corpus.val, 4, 16, 2)
    assert len(ev) == 2 and torch.equal(ev[0][0].reshape(-1)[1:], ev[0][1].reshape(-1)[:-1])


# -- training -----------------------------------------------------------------------------------

def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


STUDY = strategies()


@pytest.mark.parametrize("s", STUDY, ids=[s.name for s in STUDY])
def test_each_strategy_trains(s: Strategy, corpus):
    base = tiny_lm(vocab=corpus.vocab_size)
    cfg = lm_config(base, s)
    model = build_model(cfg, seed=0)
    bias0 = [m.router.expert_bias.clone() for m in model.moe_layers
             if m.router.expert_bias is not None]
    tcfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=2,
                       eval_batches=1)
    res = train(model, corpus, tcfg, progress=False)
    h, r = res.history, res.routing
    assert len(h) == 2 and np.isfinite(h.loss).all() and np.isfinite(res.final_val_loss)
    assert res.load.shape == (2, 2, 6)
    assert (res.kept <= res.load).all()
    T = 2 * 16
    rc = cfg.router
    if rc.routing == "expert_choice":  # each expert takes exactly C tokens
        assert (res.load == rc.capacity(T)).all() and (r.imbalance == 1).all()
    else:
        assert (res.load.sum(-1) == T * rc.top_k).all()
    if rc.capacity_factor is None:
        assert (res.kept == res.load).all() and (r.drop_rate == 0).all()
    elif rc.routing == "token_choice":
        assert (res.kept <= rc.capacity(T)).all()
    assert (h.aux > 0).all() == (rc.aux_loss_coef > 0 or rc.seq_aux_loss_coef > 0)
    assert (h.z > 0).all() == (rc.z_loss_coef > 0)
    if bias0:  # the aux-loss-free bias moved by rate * sign(mean - load) after each step
        for layer, (b0, m) in enumerate(zip(bias0, model.moe_layers)):
            load = torch.from_numpy(res.load[:, layer]).double()  # [steps, E]
            moved = rc.bias_update_rate * torch.sign(load.mean(1, keepdim=True) - load).sum(0)
            torch.testing.assert_close(m.router.expert_bias - b0, moved.float())


def test_loss_decreases_on_real_text(corpus):
    from routerlib.models.train import evaluate

    cfg = tiny_lm(vocab=corpus.vocab_size, hidden_size=48, max_seq_len=64)
    model = build_model(cfg, seed=0)
    tcfg = TrainConfig(steps=40, batch_size=8, seq_len=48, lr=1e-2, warmup_steps=4,
                       eval_every=40, eval_batches=2)
    val0 = evaluate(model, eval_batches(corpus.val, 8, 48, 2), torch.device("cpu"), tcfg)
    res = train(model, corpus, tcfg, progress=False)
    assert val0 == pytest.approx(math.log(corpus.vocab_size), abs=0.5)  # uniform at the start
    assert res.final_val_loss < val0 - 0.7  # held-out text, 40 steps of 384 tokens
    assert res.history.ce.iloc[-5:].mean() < res.history.ce.iloc[:5].mean() - 1.0


def test_routing_metrics_match_routerlib_metrics():
    rng = np.random.default_rng(0)
    load = rng.integers(0, 50, size=(3, 2, 7)).astype(np.int32)
    load[1, 0] = 0
    load[1, 0, 3] = 40  # one expert takes all
    kept = np.minimum(load, 30)
    df = routing_frame(load, kept, np.arange(3))
    for row in df.itertuples():
        s = RoutingStats.from_load(load[row.step, row.layer], kept[row.step, row.layer])
        assert row.imbalance == pytest.approx(s.imbalance)
        assert row.cv == pytest.approx(s.cv)
        assert row.entropy == pytest.approx(s.entropy)
        assert row.drop_rate == pytest.approx(s.drop_rate)
        assert row.dead_experts == s.empty_experts
        assert row.max_vio == pytest.approx(s.imbalance - 1)


def test_steps_for_budget():
    runs = [Strategy("none", ""), Strategy("expert_choice", ""), Strategy("aux_1e-2", "")]
    tcfg = TrainConfig(steps=400)
    per = {"none": 0.01, "expert_choice": 0.02}
    n = steps_for_budget(10.0, per, runs, tcfg)
    assert n == int(10.0 / (0.04 * 1.15))
    assert steps_for_budget(1e6, per, runs, tcfg) == 400  # capped at the preset
    assert steps_for_budget(0.1, per, runs, tcfg) == 50  # a floor


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_lm(router=dataclasses.replace(TINY_ROUTER, expert_bias=True))
    model = build_model(cfg, seed=1).eval()
    model.moe_layers[0].router.expert_bias.copy_(torch.linspace(-1, 1, 6))
    idx = torch.randint(0, 97, (2, 9))
    path = save_checkpoint(model, tmp_path / "m.pt", step=3, dtype=torch.float32, strategy="x")
    loaded, meta = load_checkpoint(path)
    assert meta["step"] == 3 and meta["strategy"] == "x" and loaded.cfg == cfg
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits, atol=0, rtol=0)
    small = save_checkpoint(model, tmp_path / "b.pt")  # bf16 weights: half the bytes
    assert small.stat().st_size < 0.6 * path.stat().st_size
    torch.testing.assert_close(load_checkpoint(small)[0](idx).logits, model(idx).logits,
                               atol=0.05, rtol=0.05)


# -- traces -------------------------------------------------------------------------------------

def test_trace_round_trip(tmp_path, corpus):
    model = build_model(tiny_lm(vocab=corpus.vocab_size), seed=0)
    trace = capture_trace(model, corpus, seq_len=16, num_tokens=100, batch_size=3, label="t")
    L, T, K = trace.topk_ids.shape
    assert (L, T, K) == (2, 100, 2)
    ev = eval_batches(corpus.val, 3, 16, 3)
    assert trace.tokens.tolist() == torch.cat([x.reshape(-1) for x, _ in ev])[:100].tolist()
    # each token's K experts are distinct and their renormalised weights sum to 1
    assert (np.sort(trace.topk_ids, -1)[..., 1:] != np.sort(trace.topk_ids, -1)[..., :-1]).all()
    np.testing.assert_allclose(trace.topk_weights.sum(-1), 1.0, atol=1e-5)
    back = load_trace(trace.save(tmp_path / "t.npz"))
    np.testing.assert_array_equal(back.tokens, trace.tokens)
    np.testing.assert_array_equal(back.topk_ids, trace.topk_ids)
    np.testing.assert_array_equal(back.kept, trace.kept)
    np.testing.assert_allclose(back.topk_weights, trace.topk_weights, atol=1e-3)
    assert back.meta["label"] == "t" and back.num_experts == 6 and back.seq_len == 16
    assert back.load(0).sum() == T * K
    if len(back.vocab_pieces):
        assert "".join(back.pieces[:50]) in "".join(d["text"] for d in corpus_documents()["docs"]
                                                    if d["split"] == "val")


def test_trace_rejects_inconsistent_arrays():
    ids = np.zeros((1, 4, 2), dtype=np.int32)
    with pytest.raises(ValueError, match="num_experts"):
        RoutingTrace(np.zeros(4, np.int64), ids + 5, np.ones((1, 4, 2), np.float32),
                     np.ones((1, 4, 2), bool), num_experts=4, seq_len=4)
    with pytest.raises(ValueError, match="kept"):
        RoutingTrace(np.zeros(4, np.int64), ids, np.ones((1, 4, 2), np.float32),
                     np.ones((1, 3, 2), bool), num_experts=4, seq_len=4)


def test_committed_trace_loads():
    if not DEFAULT_TRACE.exists():
        pytest.fail(f"the committed trace {DEFAULT_TRACE} is missing")
    t = load_trace()
    assert t.meta["label"] and t.num_tokens >= 4096 and t.topk_ids.max() < t.num_experts
    assert t.kept.all() or t.meta.get("strategy", "").startswith("cap")
    assert len(t.vocab_pieces) == 0 or all(isinstance(p, str) for p in t.pieces[:10])


# -- on the GPU (scripts/gpu_steps/balance.sh) ---------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name, backend", [
    ("none", "torch"), ("aux_1e-2", "torch"), ("aux_free_bias", "torch"),
    ("expert_choice", "torch"), ("cap1_random", "torch"),
    ("aux_1e-2", "triton"), ("cap1_random", "triton"),  # the kernels' training path
])
def test_gpu_training_step_bf16_autocast(name, backend, corpus):
    s = {x.name: x for x in STUDY}[name]
    cfg = lm_config(tiny_lm(vocab=corpus.vocab_size), s, backend=backend)
    model = build_model(cfg, seed=0, device="cuda")
    tcfg = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
                       eval_batches=1)
    res = train(model, corpus, tcfg, progress=False)
    assert np.isfinite(res.history.loss).all() and np.isfinite(res.final_val_loss)
    assert (res.load.sum(-1) > 0).all()


@pytest.mark.gpu
def test_gpu_cache_decoding_matches_full_forward():
    model = MoETransformer(tiny_lm(num_layers=3)).cuda().eval()
    idx = torch.randint(0, 97, (2, 17), device="cuda")
    full = model(idx).logits
    cache = model.new_cache(2, 24)
    steps = [model(idx[:, :7], cache=cache, input_pos=torch.arange(7, device="cuda")).logits]
    for t in range(7, 17):
        steps.append(model(idx[:, t:t + 1], cache=cache,
                           input_pos=torch.tensor([t], device="cuda")).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
