"""Hugging Face drop-in: `apply_routerlib(model, backend=...)` swaps the sparse MoE blocks of a
transformers model for routerlib's MoELayer, reusing the model's weights.

Supported (transformers 5.x, tested with 5.25; the fused-experts layout arrived with 5.0):

| model_type | routing mapped to RouterConfig | shared expert |
| --- | --- | --- |
| mixtral | softmax over the top-K logits (softmax_after_topk) | none |
| qwen2_moe | softmax then top-K, renormalize = norm_topk_prob | sigmoid-gated |
| qwen3_moe | softmax then top-K, renormalize = norm_topk_prob | none |
| olmoe | softmax then top-K, renormalize = norm_topk_prob | none |
| deepseek_v3 | sigmoid, bias for selection, top-2-sum groups, renormalize, scaling | ungated |

Weights are shared, never copied: the gate's [E, D] weight is the router's weight, and the
experts' gate_up_proj [E, 2F, D] / down_proj [E, D, F] are read through transposed views
([E, D, 2F] / [E, F, D], the layout SwiGLUExperts computes with). DeepSeek's selection bias is
the same buffer. A layout that cannot be viewed (gate and up interleaved, biases, an activation
other than SiLU, transformers 4.x's per-expert ModuleList) is refused with an error rather than
copied. The patched blocks keep the original parameter names, so state_dict(), save_pretrained
and load_state_dict keep working; the shared experts stay the model's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from routerlib import ops
from routerlib.config import Backend, MoEConfig, RouterConfig
from routerlib.layer import MoELayer, SwiGLUExperts
from routerlib.types import RouterOutput

# model_type -> class name of its sparse MoE block in transformers 5.x
MOE_BLOCKS: dict[str, str] = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
}
TESTED_TRANSFORMERS = "5.25.0"
_SHARED = ("shared_expert", "shared_expert_gate", "shared_experts")


@dataclass(frozen=True)
class HFRouting:
    """How one model family routes: the RouterConfig and the gate's precision."""

    router: RouterConfig
    logits_fp32: bool  # DeepSeek-V3 computes the gate in fp32 (its gate weight is kept fp32)


def routing_of(config) -> HFRouting:
    """RouterConfig of a transformers config (dropless, no losses: inference semantics)."""
    mt = config.model_type
    E = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if mt == "deepseek_v3":
        E = config.n_routed_experts
    common = dict(num_experts=int(E), top_k=int(config.num_experts_per_tok), check_finite=False)
    if mt == "mixtral":
        return HFRouting(RouterConfig(softmax_after_topk=True, **common), False)
    if mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return HFRouting(RouterConfig(renormalize=bool(config.norm_topk_prob), **common), False)
    if mt == "deepseek_v3":
        groups = int(config.n_group or 1)
        cfg = RouterConfig(score_func="sigmoid", expert_bias=True,
                           renormalize=bool(config.norm_topk_prob),
                           routed_scaling_factor=float(config.routed_scaling_factor),
                           n_groups=groups, topk_groups=int(config.topk_group or 1),
                           group_score="top2_sum", **common)
        return HFRouting(cfg, True)
    raise ValueError(f"model_type={mt!r} is not supported by apply_routerlib; supported: "
                     f"{sorted(MOE_BLOCKS)}")


class HFRouter(nn.Module):
    """routerlib's routing on a transformers gate's weight [E, D] (the same Parameter), named as
    in transformers (`weight`, DeepSeek's `e_score_correction_bias`) so checkpoints still load."""

    def __init__(self, weight: nn.Parameter, cfg: RouterConfig, logits_fp32: bool,
                 backend: Backend, bias: torch.Tensor | None = None):
        super().__init__()
        self.cfg, self.logits_fp32, self.backend = cfg, logits_fp32, backend
        self.weight = weight  # [E, D]
        if cfg.expert_bias:
            if bias is None:
                raise ValueError("this router selects with a bias but the gate has none")
            self.register_buffer("e_score_correction_bias", bias)  # [E] fp32, shared

    def forward(self, x: torch.Tensor, seq_len: int | None = None,
                generator: torch.Generator | None = None) -> RouterOutput:
        if self.logits_fp32:
            logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32
        else:
            logits = F.linear(x, self.weight)  # [T, E] in the model's dtype, as transformers
        bias = self.e_score_correction_bias if self.cfg.expert_bias else None
        sel, plan = ops.route(logits, self.cfg, bias, None, self.backend, need_stats=False)
        zero = logits.new_zeros((), dtype=torch.float32)
        return RouterOutput(logits=logits, selection=sel, plan=plan, aux_loss=zero, z_loss=zero)


class HFExperts(SwiGLUExperts):
    """SwiGLUExperts over transformers' fused expert weights, without a copy: gate_up_proj
    [E, 2F, D] (gate rows first, then up) and down_proj [E, D, F] are the stored Parameters;
    w_gate_up [E, D, 2F] and w_down [E, F, D] are transposed views of them."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, transposed: bool):
        nn.Module.__init__(self)  # no weights of its own: SwiGLUExperts.__init__ would allocate
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.transposed = transposed  # stored already as [E, D, 2F] / [E, F, D]

    @property
    def w_gate_up(self) -> torch.Tensor:  # [E, D, 2F]
        return self.gate_up_proj if self.transposed else self.gate_up_proj.transpose(1, 2)

    @property
    def w_down(self) -> torch.Tensor:  # [E, F, D]
        return self.down_proj if self.transposed else self.down_proj.transpose(1, 2)


class RouterlibMoEBlock(MoELayer):
    """A transformers sparse MoE block computed by routerlib: hidden_states [B, S, D] -> [B, S, D].

    The routed experts run through MoELayer.forward (routing, dispatch, experts, combine on the
    chosen backend); the model's shared expert (Qwen2-MoE: gated by sigmoid(x @ w), DeepSeek-V3:
    ungated) is the model's own module, added after."""

    def __init__(self, block: nn.Module, config, backend: Backend = "torch"):
        nn.Module.__init__(self)  # MoELayer.__init__ would allocate fresh weights
        routing = routing_of(config)
        experts = _fused_experts(block.experts, config)
        E, F2, D = experts.w_gate_up.shape[0], experts.w_gate_up.shape[2], config.hidden_size
        self.cfg = MoEConfig(hidden_size=D, ffn_size=F2 // 2, router=routing.router,
                             backend=backend)
        gate = HFRouter(block.gate.weight, routing.router, routing.logits_fp32, backend,
                        getattr(block.gate, "e_score_correction_bias", None))
        self.shared = None  # MoELayer's own (ungated) shared expert: unused, see forward
        for name, child in block.named_children():  # the block's order: same state_dict order
            if name not in ("gate", "experts", *_SHARED):
                raise ValueError(f"{type(block).__name__}.{name} is not understood by "
                                 "apply_routerlib")
            setattr(self, name, {"gate": gate, "experts": experts}.get(name, child))
        if E != routing.router.num_experts:
            raise ValueError(f"the experts hold {E} experts but the config routes to "
                             f"{routing.router.num_experts}")

    @property
    def router(self) -> HFRouter:  # MoELayer.forward calls self.router; transformers names it gate
        return self.gate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y, _ = super().forward(hidden_states)
        x = hidden_states
        if hasattr(self, "shared_expert"):  # Qwen2-MoE
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif hasattr(self, "shared_experts"):  # DeepSeek-V3
            y = y + self.shared_experts(x)
        return y


def _fused_experts(experts: nn.Module, config) -> HFExperts:
    """HFExperts over a transformers experts module, or a ValueError naming what cannot be
    viewed without a copy."""
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ValueError(f"{type(experts).__name__} does not hold fused gate_up_proj/down_proj "
                         "weights (transformers < 5.0 keeps one module per expert): upgrade to "
                         f"transformers >= 5.0 (tested: {TESTED_TRANSFORMERS})")
    if not getattr(experts, "is_concatenated", True):
        raise ValueError("gate and up projections are interleaved: routerlib's SwiGLU needs them "
                         "concatenated [gate; up] (a copy); not supported")
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ValueError("experts with biases or without a gate projection are not SwiGLU")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: routerlib's experts are SwiGLU "
                         "(silu)")
    transposed = bool(getattr(experts, "is_transposed", False))
    return HFExperts(experts.gate_up_proj, experts.down_proj, transposed)


def apply_routerlib(model: nn.Module, backend: Backend = "torch") -> nn.Module:
    """Replace every sparse MoE block of a transformers model (in place) by a RouterlibMoEBlock
    sharing its weights; returns the model. backend: "torch" (the reference) or "triton"."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend={backend!r}: must be 'torch' or 'triton'")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"{type(model).__name__} is not a transformers model (no config)")
    block_cls = MOE_BLOCKS.get(config.model_type)
    if block_cls is None:
        raise ValueError(f"model_type={config.model_type!r} is not supported by apply_routerlib;"
                         f" supported: {sorted(MOE_BLOCKS)}")
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ == block_cls]
    if not targets:
        raise ValueError(f"no {block_cls} found in {type(model).__name__}: nothing to replace")
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RouterlibMoEBlock(block, config, backend))
    return model


def count_routerlib_blocks(model: nn.Module) -> int:
    return sum(isinstance(m, RouterlibMoEBlock) for m in model.modules())


def small_config(model_type: str, hidden_size: int = 32, num_layers: int = 2,
                 num_experts: int = 6, top_k: int = 2, ffn_size: int = 24, vocab_size: int = 97,
                 num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                 init_std: float = 0.02, **overrides):
    """A transformers config of model_type at the given sizes (random weights, no download):
    for tests (toy sizes) and benchmarks (e.g. Qwen3-30B-A3B width, a few layers). Qwen2-MoE
    gets a shared expert of width 2*ffn_size, DeepSeek-V3 one shared expert, 4 groups (top-2) when
    E allows and its first layer dense."""
    import transformers as tf

    head_dim = head_dim or hidden_size // num_heads
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=4096, initializer_range=init_std,
                  num_experts_per_tok=top_k, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if model_type == "mixtral":
        kw = dict(intermediate_size=ffn_size, num_local_experts=num_experts, head_dim=head_dim)
        cls = tf.MixtralConfig
    elif model_type == "qwen2_moe":
        kw = dict(intermediate_size=2 * ffn_size, moe_intermediate_size=ffn_size,
                  shared_expert_intermediate_size=2 * ffn_size, num_experts=num_experts,
                  norm_topk_prob=False)
        cls = tf.Qwen2MoeConfig
    elif model_type == "qwen3_moe":
        kw = dict(intermediate_size=2 * ffn_size, moe_intermediate_size=ffn_size,
                  num_experts=num_experts, norm_topk_prob=True, head_dim=head_dim)
        cls = tf.Qwen3MoeConfig
    elif model_type == "olmoe":
        kw = dict(intermediate_size=ffn_size, num_experts=num_experts, norm_topk_prob=False)
        cls = tf.OlmoeConfig
    elif model_type == "deepseek_v3":
        groups = 4 if num_experts % 4 == 0 and num_experts // 4 >= 2 else 1
        common["num_key_value_heads"] = num_heads  # multi-head latent attention
        kw = dict(intermediate_size=2 * ffn_size, moe_intermediate_size=ffn_size,
                  n_routed_experts=num_experts, n_group=groups, topk_group=min(2, groups),
                  n_shared_experts=1, first_k_dense_replace=min(1, num_layers - 1),
                  kv_lora_rank=max(16, hidden_size // 4), q_lora_rank=None,
                  qk_rope_head_dim=head_dim // 2, qk_nope_head_dim=head_dim // 2,
                  v_head_dim=head_dim, routed_scaling_factor=2.5, norm_topk_prob=True)
        cls = getattr(tf, "DeepseekV3Config", None)
    else:
        raise ValueError(f"model_type={model_type!r}: one of {sorted(MOE_BLOCKS)}")
    if cls is None:
        raise ValueError(f"transformers {tf.__version__} has no {model_type} config")
    return cls(**{**common, **kw, **overrides})
