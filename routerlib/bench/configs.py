"""The standard benchmark configurations (DESIGN.md) and token-count presets.

Each `ModelShape` is one MoE layer of a published model, reduced to what routing cost depends on:
D hidden, E experts, K top-k, F expert FFN width, and the scoring rules. All use routerlib's SwiGLU
experts (Switch's FFN is a plain ReLU MLP in the paper: only the expert FLOPs differ, by 3/2).
Shared experts (DeepSeek-V3 has one, F=2048) are left out: the benchmarks time the routed path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from routerlib.config import Backend, DropPolicy, GroupScore, MoEConfig, RouterConfig, ScoreFunc


@dataclass(frozen=True)
class ModelShape:
    """One MoE layer shape. hidden D, num_experts E, top_k K, ffn F; the rest as RouterConfig."""

    name: str
    hidden: int
    num_experts: int
    top_k: int
    ffn: int
    score_func: ScoreFunc = "softmax"
    softmax_after_topk: bool = False
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = "max"
    expert_bias: bool = False
    capacity_factor: float | None = None
    drop_policy: DropPolicy = "position"
    pad_to_multiple: int = 1
    note: str = ""

    def __post_init__(self) -> None:
        for f in ("hidden", "num_experts", "top_k", "ffn"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelShape.{f}={v!r}: must be an int >= 1")
        self.router_config()  # validates the routing fields with RouterConfig's own errors

    # the shape vocabulary of the rest of the code
    @property
    def D(self) -> int:
        return self.hidden

    @property
    def E(self) -> int:
        return self.num_experts

    @property
    def K(self) -> int:
        return self.top_k

    @property
    def F(self) -> int:
        return self.ffn

    def router_config(self, **overrides) -> RouterConfig:
        """The RouterConfig of this shape (inference: no noise, no losses)."""
        kw = dict(num_experts=self.num_experts, top_k=self.top_k, score_func=self.score_func,
                  softmax_after_topk=self.softmax_after_topk, renormalize=self.renormalize,
                  routed_scaling_factor=self.routed_scaling_factor, n_groups=self.n_groups,
                  topk_groups=self.topk_groups, group_score=self.group_score,
                  expert_bias=self.expert_bias, capacity_factor=self.capacity_factor,
                  drop_policy=self.drop_policy, pad_to_multiple=self.pad_to_multiple,
                  check_finite=False)  # a host sync per call: not what a benchmark should time
        kw.update(overrides)
        return RouterConfig(**kw)

    def moe_config(self, backend: Backend = "torch", expert_path: str = "batched",
                   **router_overrides) -> MoEConfig:
        """The MoEConfig of this shape with the given routing backend ("torch" or "triton")."""
        return MoEConfig(hidden_size=self.hidden, ffn_size=self.ffn,
                         router=self.router_config(**router_overrides), expert_path=expert_path,
                         backend=backend)

    def replace(self, **changes) -> ModelShape:
        return dataclasses.replace(self, **changes)


MIXTRAL_8X7B = ModelShape(
    "mixtral-8x7b", hidden=4096, num_experts=8, top_k=2, ffn=14336, score_func="softmax",
    softmax_after_topk=True,  # softmax over all then renormalise the top 2 = softmax of the top 2
    note="Mixtral-8x7B: softmax over the 2 selected logits")
OLMOE = ModelShape(
    "olmoe-1b-7b", hidden=2048, num_experts=64, top_k=8, ffn=1024, score_func="softmax",
    renormalize=False, note="OLMoE-1B-7B: softmax, no renormalisation")
QWEN3_30B_A3B = ModelShape(
    "qwen3-30b-a3b", hidden=2048, num_experts=128, top_k=8, ffn=768, score_func="softmax",
    renormalize=True, note="Qwen3-30B-A3B: softmax then renormalise the top 8")
DEEPSEEK_V3 = ModelShape(
    "deepseek-v3", hidden=7168, num_experts=256, top_k=8, ffn=2048, score_func="sigmoid",
    n_groups=8, topk_groups=4, group_score="top2_sum", expert_bias=True, renormalize=True,
    routed_scaling_factor=2.5,
    note="DeepSeek-V3: sigmoid + bias, best 4 of 8 groups by top-2 sum, renormalise, x2.5")
SWITCH_BASE_128 = ModelShape(
    "switch-base-128", hidden=768, num_experts=128, top_k=1, ffn=3072, score_func="softmax",
    capacity_factor=1.25,
    note="Switch-Base-128 (top-1, capacity factor 1.25); SwiGLU experts here")
TINY = ModelShape(
    "tiny", hidden=64, num_experts=8, top_k=2, ffn=128, score_func="softmax", renormalize=True,
    note="tiny shape for tests and CPU notebooks")

SHAPES: dict[str, ModelShape] = {s.name: s for s in
                                 (MIXTRAL_8X7B, OLMOE, QWEN3_30B_A3B, DEEPSEEK_V3,
                                  SWITCH_BASE_128, TINY)}
# what 'all' means: the published shapes, not the test shape
STANDARD = ("mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3", "switch-base-128")
_ALIASES = {"mixtral": "mixtral-8x7b", "olmoe": "olmoe-1b-7b", "qwen3": "qwen3-30b-a3b",
            "qwen": "qwen3-30b-a3b", "deepseek": "deepseek-v3", "switch": "switch-base-128"}

TOKEN_PRESETS: dict[str, tuple[int, ...]] = {
    "decode": (1, 8, 64, 256),
    "prefill": (4096, 16384, 65536),
    "cpu_small": (16, 128, 512),
}
TOKEN_PRESETS["all"] = TOKEN_PRESETS["decode"] + TOKEN_PRESETS["prefill"]


def get_shape(name: str) -> ModelShape:
    """A shape by name or alias (any case): mixtral, olmoe, qwen3, deepseek, switch, tiny."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SHAPES:
        raise ValueError(f"config={name!r}: unknown; choose from {sorted(SHAPES)} "
                         f"or aliases {sorted(_ALIASES)}")
    return SHAPES[key]


def parse_shapes(spec: str) -> list[ModelShape]:
    """'all' or a comma list of names -> shapes."""
    names = [s for s in (p.strip() for p in spec.split(",")) if s]
    if not names:
        raise ValueError(f"configs={spec!r}: empty")
    out: list[ModelShape] = []
    for n in names:
        if n.lower() == "all":
            out.extend(SHAPES[s] for s in STANDARD)
        else:
            out.append(get_shape(n))
    return out


def parse_tokens(spec: str) -> list[int]:
    """A preset name (decode, prefill, cpu_small, all) or a comma list of ints, or a mix."""
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.lower() in TOKEN_PRESETS:
            out.extend(TOKEN_PRESETS[part.lower()])
            continue
        try:
            T = int(part)
        except ValueError:
            raise ValueError(f"tokens={spec!r}: {part!r} is neither an int nor a preset "
                             f"{sorted(TOKEN_PRESETS)}") from None
        if T < 1:
            raise ValueError(f"tokens={spec!r}: token counts must be >= 1, got {T}")
        out.append(T)
    if not out:
        raise ValueError(f"tokens={spec!r}: empty")
    return out
