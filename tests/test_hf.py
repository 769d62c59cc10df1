"""The Hugging Face drop-in: a patched model's logits equal the original's, the weights are
shared (no copies), checkpoints keep their names, and bad input is refused clearly.

Tiny random-initialised configs (routerlib.integrations.hf.small_config, no downloads); the
init std is raised so the MoE blocks move the logits (a wrong routing map fails the check)."""

from __future__ import annotations

import copy

import pytest
import torch

from routerlib.integrations import hf
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")

MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
# E not a power of two (6), K=1, K=E and a multi-group DeepSeek (E=8: 4 groups, top-2)
CASES = [("mixtral", 6, 2), ("qwen2_moe", 6, 3), ("qwen3_moe", 7, 2), ("olmoe", 5, 5),
         ("olmoe", 6, 1), ("deepseek_v3", 8, 3)]


def _model(model_type: str, E: int = 6, K: int = 2, dtype=torch.float32, device="cpu"):
    try:
        cfg = hf.small_config(model_type, num_experts=E, top_k=K, init_std=0.15)
    except (ValueError, AttributeError) as e:
        pytest.skip(f"transformers {transformers.__version__} lacks {model_type}: {e}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if model_type == "deepseek_v3":  # a non-zero selection bias: it must steer the top-K
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return model.to(device=device, dtype=dtype)


def _tokens(model, B=2, S=11, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (B, S), generator=g).to(device)


@pytest.mark.parametrize("model_type,E,K", CASES)
def test_logits_equal(model_type, E, K):
    model = _model(model_type, E, K)
    idx = _tokens(model)
    with torch.no_grad():
        expected = model(idx).logits
        before = {k: v.data_ptr() for k, v in model.state_dict().items()}
        hf.apply_routerlib(model, backend="torch")
        actual = model(idx).logits
    assert hf.count_routerlib_blocks(model) >= 1
    assert_close(actual, expected, tol=1e-5, name=f"{model_type} logits")
    after = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert after == before  # same names, same storage: no copy of any weight


def test_wrong_routing_is_caught():
    """The check can fail: Mixtral routed with plain softmax weights (no top-K normalisation)
    gives different logits."""
    model = _model("mixtral")
    idx = _tokens(model)
    with torch.no_grad():
        expected = model(idx).logits
        hf.apply_routerlib(model)
        for m in model.modules():
            if isinstance(m, hf.RouterlibMoEBlock):
                m.gate.cfg = hf.RouterConfig(num_experts=6, top_k=2)
        actual = model(idx).logits
    assert (actual - expected).abs().max() > 1e-3


def test_generate_equal():
    """HF generate (greedy, with its KV cache) gives the same tokens after patching."""
    model = _model("qwen2_moe")
    idx = _tokens(model, B=2, S=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(idx, **kw)
        hf.apply_routerlib(model)
        actual = model.generate(idx, **kw)
    assert torch.equal(actual, expected)


def test_triton_backend_interpreted():
    """backend='triton' (kernels under TRITON_INTERPRET=1 on CPU) gives the same logits."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model("deepseek_v3", 8, 3, device=device)
    idx = _tokens(model, B=1, S=7, device=device)
    with torch.no_grad():
        expected = model(idx).logits
        hf.apply_routerlib(model, backend="triton")
        actual = model(idx).logits
    assert_close(actual, expected, tol=1e-4, name="deepseek_v3 triton logits")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_bf16_block_close(model_type, device="cpu", backend="torch"):
    """bf16, one block on the same input: transformers rounds the K weights to bf16 and sums in
    bf16, routerlib combines in fp32; bf16 logits tie often and the tie rules differ (routerlib:
    the lower expert). Tokens routed to the same experts agree to bf16 tolerance; that is nearly
    all of them."""
    E, K = (8, 3) if model_type == "deepseek_v3" else (6, 2)
    model = _model(model_type, E, K, dtype=torch.bfloat16, device=device)
    name, block = next((n, m) for n, m in model.named_modules()
                       if type(m).__name__ == hf.MOE_BLOCKS[model_type])
    original = copy.deepcopy(block)
    hf.apply_routerlib(model, backend=backend)
    patched = model.get_submodule(name)
    x = torch.randn(1, 257, model.config.hidden_size, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        expected = original(x)[0].float()  # [T, D]
        actual = patched(x)[0].float()
        ids_hf = original.gate(x)[2].sort(dim=-1).values  # [T, K]
        ids_rl = patched.gate(x[0]).topk_ids.long().sort(dim=-1).values
    same = (ids_hf == ids_rl).all(dim=-1)  # [T]
    assert same.float().mean() >= 0.9, f"only {same.float().mean():.0%} tokens routed alike"
    err = (actual - expected).abs()[same].max()
    assert err <= 0.02 * (1 + expected.abs().max()), err


def test_state_dict_round_trip():
    """A patched model loads the original's checkpoint (the parameter names are unchanged)."""
    src = _model("deepseek_v3", 8, 3)
    sd = copy.deepcopy(src.state_dict())
    dst = _model("deepseek_v3", 8, 3)
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(1.0)
    hf.apply_routerlib(dst)
    dst.load_state_dict(sd)
    idx = _tokens(src)
    with torch.no_grad():
        assert_close(dst(idx).logits, src(idx).logits, tol=1e-5, name="reloaded logits")


def test_errors():
    with pytest.raises(ValueError, match="backend"):
        hf.apply_routerlib(_model("olmoe"), backend="cuda")
    with pytest.raises(TypeError, match="not a transformers model"):
        hf.apply_routerlib(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not supported"):
        cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=16)
        hf.apply_routerlib(transformers.AutoModelForCausalLM.from_config(cfg))
    cfg = hf.small_config("mixtral")
    with pytest.raises(ValueError, match="transformers >= 5.0"):  # 4.x: one module per expert
        hf._fused_experts(torch.nn.ModuleList([torch.nn.Linear(2, 2)]), cfg)
    experts = _model("mixtral").model.layers[0].mlp.experts
    experts.is_concatenated = False
    with pytest.raises(ValueError, match="interleaved"):
        hf._fused_experts(experts, cfg)
    experts.is_concatenated = True
    cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match="silu"):
        hf._fused_experts(experts, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_equal_gpu(model_type, backend):
    """On the GPU in fp32 (bf16: test_bf16_block_close_gpu), both backends."""
    E, K = (8, 3) if model_type == "deepseek_v3" else (6, 2)
    model = _model(model_type, E, K, device="cuda")
    idx = _tokens(model, B=2, S=33, device="cuda")
    with torch.no_grad():
        expected = model(idx).logits
        hf.apply_routerlib(model, backend=backend)
        actual = model(idx).logits
    assert_close(actual, expected, tol=1e-4, name=f"{model_type} {backend} logits")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_block_close_gpu(backend):
    test_bf16_block_close("qwen3_moe", device="cuda", backend=backend)


def test_dropin_bench_rows():
    """The drop-in benchmark at a toy shape on the CPU: every variant times a forward and a
    generate; speedups are ratios to the transformers model."""
    from routerlib.bench.inference import bench_hf
    from routerlib.bench.results import ResultSet

    rs = ResultSet("hf_dropin")
    bench_hf(rs, shapes={"qwen3_moe": (32, 6, 2, 24, 4, 2, 8)}, tokens=16, gen_batch=2,
             gen_prompt=4, gen_new=3, device="cpu", vocab_size=97, backends=("torch",),
             log=lambda s: None)
    got = {(r.variant, r.metric): r.value for r in rs.rows}
    assert set(got) == {("hf", "forward_ms"), ("hf", "generate_tokens_per_s"),
                        ("routerlib-torch", "forward_ms"),
                        ("routerlib-torch", "generate_tokens_per_s"),
                        ("routerlib-torch", "forward_speedup"),
                        ("routerlib-torch", "generate_speedup")}
    ratio = got[("hf", "forward_ms")] / got[("routerlib-torch", "forward_ms")]
    assert got[("routerlib-torch", "forward_speedup")] == pytest.approx(ratio)
    assert all(v > 0 for v in got.values())
