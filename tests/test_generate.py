"""Inference with the MoE LM: cached decode equals full-sequence forwards, seeded sampling is
reproducible, top-p keeps exactly the nucleus, the CUDA graph step equals the eager one (GPU)."""

from __future__ import annotations

import pytest
import torch

from routerlib import RouterConfig
from routerlib.models import LMConfig, MoETransformer
from routerlib.models.generate import Generator, Sampling, generate, nucleus_probs, sample_next
from tests.helpers import assert_close


def _model(backend: str = "torch", device: str = "cpu", E: int = 5, K: int = 2,
           dense_first: bool = True) -> MoETransformer:
    # E=5 (not a power of two); a dense first layer as in the trained model
    cfg = LMConfig(vocab_size=61, max_seq_len=40, num_layers=3, hidden_size=32, num_heads=2,
                   ffn_size=16, router=RouterConfig(num_experts=E, top_k=K, renormalize=True),
                   first_layer_dense=dense_first, backend=backend, init_std=0.2)
    torch.manual_seed(0)
    return MoETransformer(cfg).to(device).eval()


def _prompt(B: int, S: int, V: int = 61, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (B, S), generator=g).to(device)


@pytest.mark.parametrize("B,S,N,K", [(1, 1, 6, 1),    # T=1 prompt, K=1
                                     (3, 7, 6, 2),    # odd batch and prompt
                                     (2, 5, 4, 5)])   # K=E
def test_greedy_cache_equals_full_forward(B, S, N, K):
    model = _model(K=K)
    prompt = _prompt(B, S)
    gen = Generator(model, B, S + N)
    out = gen.generate(prompt, N)
    seq = prompt
    with torch.no_grad():
        for i in range(N):
            full = model(seq).logits  # [B, S+i, V] without a cache
            nxt = full[:, -1].argmax(-1)
            assert torch.equal(out.tokens[:, S + i], nxt), f"step {i}"
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        # the cached logits themselves, not only their argmax
        gen2 = Generator(model, B, S + N)
        assert_close(gen2.prefill(prompt), model(prompt).logits[:, -1], tol=1e-5)
        assert_close(gen2.decode_step(seq[:, S], S), model(seq[:, :S + 1]).logits[:, -1],
                     tol=1e-5)
    assert torch.equal(out.tokens, seq)
    assert len(out.step_s) == N - 1
    # a generator is reused: the keys/values left from the last call are masked or overwritten
    assert torch.equal(gen.generate(prompt.flip(0), N).tokens.flip(0)[:, :S], prompt)
    assert torch.equal(gen.generate(prompt, N).tokens, seq)


def test_sampling_seeded_and_reproducible():
    model = _model()
    prompt = _prompt(2, 3)
    s = Sampling(temperature=1.5, top_p=0.95, seed=11)
    a = generate(model, prompt, 6, s)
    b = generate(model, prompt, 6, s)
    c = generate(model, prompt, 6, Sampling(temperature=1.5, top_p=0.95, seed=12))
    greedy = generate(model, prompt, 6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)


def test_top_p_keeps_the_nucleus():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
    logits = p.log()
    q = nucleus_probs(logits, 1.0, 0.7)
    # row 0: 0.5 and 0.3 reach 0.8 >= 0.7; row 1: exact ties, the lower ids first: 3 of 4
    assert_close(q[0], torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    assert_close(q[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    assert_close(nucleus_probs(logits, 1.0, 1.0), p)
    # a tiny nucleus is greedy
    tiny = Sampling(temperature=1.0, top_p=1e-6)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits[:1].repeat(50, 1), tiny, g), torch.full((50,), 1))
    # draws stay inside the nucleus and follow its weights
    draws = sample_next(logits[:1].repeat(4000, 1), Sampling(1.0, 0.7, 0), g)
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.04


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    gen = Generator(model, 2, 8)
    with pytest.raises(ValueError, match="fit the cache"):
        gen.generate(_prompt(2, 5), 4)
    with pytest.raises(ValueError, match="sequences"):
        gen.prefill(_prompt(3, 2))
    with pytest.raises(ValueError, match="CUDA"):
        if not torch.cuda.is_available():
            Generator(model, 1, 8, graph=True)
        else:
            raise ValueError("CUDA present: nothing to refuse")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8, 32])
def test_graph_equals_eager_gpu(B):
    """The captured decode step (triton routing, bf16 grouped-GEMM experts) gives the eager
    step's tokens; the torch reference route cannot be captured and falls back, saying why."""
    model = _model("triton", "cuda", E=8, K=2).to(torch.bfloat16)
    prompt = _prompt(B, 9, device="cuda")
    eager = Generator(model, B, 30, graph=False).generate(prompt, 20).tokens
    gen = Generator(model, B, 30, graph=True)
    graphed = gen.generate(prompt, 20).tokens
    assert gen.uses_graph, gen.graph_error
    assert torch.equal(graphed, eager)
    ref = Generator(_model("torch", "cuda", E=8, K=2).to(torch.bfloat16), B, 30, graph=True)
    ref.generate(prompt, 3)
    assert not ref.uses_graph and ref.graph_error


def test_checkpoint_and_decode_bench(tmp_path):
    """A saved checkpoint is found and loaded as "trained"; the decode benchmark writes one row
    per metric in the shared schema, p99 >= p50 > 0."""
    from routerlib.bench.inference import bench_decode, find_checkpoint, load_lm
    from routerlib.bench.results import ResultSet, load
    from routerlib.models.train import save_checkpoint

    cfg = LMConfig(vocab_size=4096, max_seq_len=32, num_layers=2, hidden_size=32, num_heads=2,
                   ffn_size=16, router=RouterConfig(num_experts=4, top_k=2))
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    path = save_checkpoint(model, tmp_path / "run" / "model.pt", step=5)
    assert find_checkpoint(tmp_path) == path and find_checkpoint(tmp_path / "none") is None
    loaded, label = load_lm(path)
    assert label.startswith("trained") and "step 5" in label
    rs = ResultSet("inference")
    bench_decode(loaded, label, rs, backends=("torch",), batches=(2,), prompt_len=4,
                 new_tokens=5, log=lambda s: None)
    _, rows = load(rs.write(tmp_path / "out"))
    by_metric = {r.metric: r for r in rows}
    assert set(by_metric) == {"latency_p50_us", "latency_p99_us", "tokens_per_s", "prefill_ms"}
    assert by_metric["latency_p99_us"].value >= by_metric["latency_p50_us"].value > 0
    assert all(r.config["B"] == 2 and r.config["model"] == label for r in rows)
    _, toy = load_lm(None)
    assert toy == "toy-untrained"
