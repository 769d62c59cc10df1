"""Seeded benchmark inputs: router logits with a controlled load skew, and token activations.

Input kinds (the --inputs option of the CLI):
    uniform            logits ~ N(0, 1): every expert equally likely (the load is near uniform)
    zipf[:s]           N(0, 1) + log of a Zipf law over a seeded permutation of the experts,
                       bias_e = -s * log(rank_e): expert ranked r gets ~r^-s of the traffic
                       (s = 1.2 by default; s = 0 is uniform)
    hot[:n[:delta]]    N(0, 1) + delta on n seeded "hot" experts (n = 2, delta = 3.0 by default)
    recorded:PATH      a .pt file with a [T', E] float tensor of logits, a [T', K] int tensor of
                       expert ids, or a dict with key "logits" or "topk_ids"; rows are cycled or
                       cut to T. Ids become logits where the chosen experts lead in their order.

Inputs are never zero (exact zeros of a draw are replaced; tests check it), since zeros would
hide indexing bugs in the kernels being timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputSpec:
    """A parsed input kind; see the module docstring."""

    kind: str = "uniform"
    zipf_s: float = 1.2
    n_hot: int = 2
    hot_delta: float = 3.0
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "zipf", "hot", "recorded"):
            raise ValueError(f"inputs kind={self.kind!r}: must be uniform, zipf, hot or recorded")
        if not math.isfinite(self.zipf_s) or self.zipf_s < 0:
            raise ValueError(f"zipf exponent s={self.zipf_s!r}: must be finite and >= 0")
        if self.n_hot < 1:
            raise ValueError(f"hot experts n={self.n_hot!r}: must be >= 1")
        if self.kind == "recorded" and not self.path:
            raise ValueError("inputs 'recorded' needs a path: recorded:PATH")

    @property
    def label(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{self.zipf_s:g}"
        if self.kind == "hot":
            return f"hot:{self.n_hot}:{self.hot_delta:g}"
        if self.kind == "recorded":
            return f"recorded:{self.path}"
        return "uniform"


def parse_inputs(spec: str | InputSpec) -> InputSpec:
    """'uniform', 'zipf', 'zipf:1.5', 'hot', 'hot:4', 'hot:4:2.5', 'recorded:path.pt'."""
    if isinstance(spec, InputSpec):
        return spec
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    try:
        if kind == "zipf":
            return InputSpec("zipf", zipf_s=float(rest) if rest else 1.2)
        if kind == "hot":
            parts = rest.split(":") if rest else []
            n = int(parts[0]) if parts else 2
            delta = float(parts[1]) if len(parts) > 1 else 3.0
            return InputSpec("hot", n_hot=n, hot_delta=delta)
        if kind == "recorded":
            return InputSpec("recorded", path=rest)
        if kind == "uniform" and not rest:
            return InputSpec("uniform")
    except ValueError as e:
        raise ValueError(f"inputs={spec!r}: {e}") from None
    raise ValueError(f"inputs={spec!r}: expected uniform, zipf[:s], hot[:n[:delta]] or "
                     "recorded:PATH")


def _nonzero(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """x with its exact zeros (a large draw can hold a few) replaced by eps."""
    return torch.where(x == 0, eps, x)


def _cpu_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def expert_bias(spec: str | InputSpec, num_experts: int, seed: int = 0) -> torch.Tensor:
    """[E] fp32 (CPU) per-expert logit offset that makes the load skewed (zeros for uniform and
    recorded). The same for every device, so a CPU and a GPU run skew the same experts."""
    spec = parse_inputs(spec)
    E = num_experts
    bias = torch.zeros(E)
    if spec.kind == "zipf":
        rank = torch.randperm(E, generator=_cpu_gen(seed + 1)).float() + 1.0  # [E], 1 = hottest
        bias = -spec.zipf_s * rank.log()
    elif spec.kind == "hot":
        hot = torch.randperm(E, generator=_cpu_gen(seed + 1))[: min(spec.n_hot, E)]
        bias[hot] = spec.hot_delta
    return bias


def _recorded_logits(path: str, T: int, E: int, seed: int) -> torch.Tensor:
    """[T, E] fp32 CPU logits from a recorded file (see the module docstring)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = obj.get("logits", obj.get("topk_ids"))
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or obj.shape[0] == 0:
        raise ValueError(f"recorded:{path}: expected a [T, E] logits or [T, K] ids tensor (or a "
                         "dict with 'logits' / 'topk_ids')")
    rows = torch.arange(T) % obj.shape[0]  # cycle the recorded rows
    if obj.is_floating_point():
        if obj.shape[1] != E:
            raise ValueError(f"recorded:{path}: logits have {obj.shape[1]} experts, the config "
                             f"has E={E}")
        return obj[rows].float()
    ids = obj[rows].long()  # [T, K]
    K = ids.shape[1]
    if ids.min() < 0 or ids.max() >= E:
        raise ValueError(f"recorded:{path}: expert ids outside [0, {E})")
    # small noise below, the chosen experts on top in their recorded order
    logits = 0.1 * torch.randn(T, E, generator=_cpu_gen(seed))
    lead = 8.0 + torch.arange(K, 0, -1, dtype=torch.float32).expand(T, K)  # [T, K]
    return logits.scatter_(1, ids, lead)


def make_logits(spec: str | InputSpec, T: int, E: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """[T, E] router logits in dtype on device, deterministic for a (spec, seed, device)."""
    spec = parse_inputs(spec)
    device = torch.device(device)
    if T < 0 or E < 1:
        raise ValueError(f"T={T}, E={E}: need T >= 0 and E >= 1")
    if spec.kind == "recorded":
        return _recorded_logits(spec.path, T, E, seed).to(device=device, dtype=dtype)
    logits = _nonzero(torch.randn(T, E, generator=_gen(device, seed), device=device))  # [T, E]
    if spec.kind != "uniform":
        logits = _nonzero(logits + expert_bias(spec, E, seed).to(device))
    return logits.to(dtype)


def make_tokens(T: int, D: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """[T, D] activations ~ N(0, 1) in dtype on device, deterministic for (seed, device)."""
    device = torch.device(device)
    # a different stream from the logits of the same seed; drawn in fp32 (some half-precision
    # samplers round tiny values to exact zeros), zeros replaced, then cast
    x = torch.randn(T, D, generator=_gen(device, seed + 7919), device=device)
    return _nonzero(x).to(dtype)
