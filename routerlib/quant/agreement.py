"""The routing-agreement harness: how far apart two routers (or two Selections) route the same
tokens, and what that does to the MoE layer's output.

For token choice with K of E experts, over T tokens (router a is the reference, b the candidate):
    flip_rate    fraction of tokens whose top-K *set* differs (order inside the set ignored)
    jaccard      mean over tokens of |A ∩ B| / |A ∪ B| (1 = identical sets)
    weight_l1    mean over tokens of sum_e |w_a[t, e] - w_b[t, e]| (weights as dense [T, E]; an
                 expert outside a token's set has weight 0)
    margins      [T] the gap between the K-th and (K+1)-th selection key of router a (the score
                 top-K ranks: the logits, or the scores + bias with a bias or groups); near-ties
                 are where a rounding flips a choice. NaN when K = E (nothing to flip).
    load_a/b     [E] slots routed to each expert; load_shift = sum_e |load_a - load_b| / (2 T K):
                 the fraction of slots that moved to another expert, net
    output_error ||y_b - y_a|| / ||y_a|| (Frobenius) of the layer outputs, when a layer is given
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.types import RouterOutput, Selection


@dataclass(frozen=True)
class Agreement:
    """Agreement of router b with router a on the same T tokens (see the module docstring)."""

    num_tokens: int
    top_k: int
    flip_rate: float
    jaccard: float
    weight_l1: float
    load_shift: float
    margins: np.ndarray   # [T] float64, K-th minus (K+1)-th key of router a
    flipped: np.ndarray   # [T] bool, the token's set differs
    load_a: np.ndarray    # [E] int64
    load_b: np.ndarray    # [E] int64
    output_error: float | None = None

    def summary(self) -> dict[str, float]:
        """The scalar metrics, and the margin's 1st/50th percentile, as one dict (a table row)."""
        finite = self.margins[np.isfinite(self.margins)]
        p1, p50 = np.percentile(finite, [1, 50]) if finite.size else (math.nan, math.nan)
        out = {"tokens": self.num_tokens, "flip_rate": self.flip_rate, "jaccard": self.jaccard,
               "weight_l1": self.weight_l1, "load_shift": self.load_shift,
               "margin_p1": float(p1), "margin_p50": float(p50)}
        if self.output_error is not None:
            out["output_error"] = self.output_error
        return out

    def flips_by_margin(self, edges: list[float] | np.ndarray) -> pd.DataFrame:
        """Tokens and flip rate per margin bin [edges[i], edges[i+1]): where flips happen."""
        edges = np.asarray(edges, dtype=np.float64)
        idx = np.digitize(self.margins, edges) - 1
        rows = []
        for i in range(len(edges) - 1):
            inb = idx == i
            n = int(inb.sum())
            rows.append({"margin_lo": edges[i], "margin_hi": edges[i + 1], "tokens": n,
                         "flips": int(self.flipped[inb].sum()),
                         "flip_rate": float(self.flipped[inb].mean()) if n else math.nan})
        return pd.DataFrame(rows)


def _dense(ids: torch.Tensor, values: torch.Tensor, E: int) -> torch.Tensor:
    """[T, K] ids and values -> [T, E] with values at the ids, 0 elsewhere (fp64)."""
    out = torch.zeros(ids.shape[0], E, dtype=torch.float64, device=ids.device)
    return out.scatter_(1, ids.long(), values.double())


def selection_margin(key: torch.Tensor, k: int) -> torch.Tensor:
    """[T] fp64: key[t]'s K-th largest minus its (K+1)-th largest (NaN when K = E)."""
    T, E = key.shape
    if k >= E:
        return torch.full((T,), math.nan, dtype=torch.float64, device=key.device)
    top = torch.topk(key.double(), k + 1, dim=1).values  # [T, K+1] descending
    return top[:, k - 1] - top[:, k]


def router_key(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The [T, E] key top-K ranks for these logits (groups applied: masked experts at -inf)."""
    scores = ref.score(logits, cfg)
    return ref.group_limit(ref.selection_key(logits, scores, cfg, bias), cfg)


def compare_selections(a: Selection, b: Selection, num_experts: int,
                       key_a: torch.Tensor | None = None) -> Agreement:
    """Agreement of selection b with selection a (token choice: [T, K] ids and weights).
    key_a: router a's selection key [T, E] for the margins (router_key); NaN margins without."""
    if a.topk_ids.shape != b.topk_ids.shape:
        raise ValueError(f"selections differ in shape: {tuple(a.topk_ids.shape)} vs "
                         f"{tuple(b.topk_ids.shape)}")
    if a.expert_rank is not None or b.expert_rank is not None:
        raise ValueError("compare_selections handles token choice; expert-choice selections "
                         "pick every (token, expert) pair")
    T, K = a.topk_ids.shape
    E = num_experts
    ones = torch.ones(T, K, device=a.topk_ids.device)
    ma, mb = _dense(a.topk_ids, ones, E) > 0, _dense(b.topk_ids, ones, E) > 0  # [T, E]
    inter = (ma & mb).sum(1)
    union = (ma | mb).sum(1)
    flipped = inter < K
    jac = inter.double() / union.clamp(min=1).double()
    wl1 = (_dense(a.topk_ids, a.topk_weights, E) - _dense(b.topk_ids, b.topk_weights, E)).abs()
    load_a = torch.bincount(a.topk_ids.reshape(-1).long(), minlength=E)
    load_b = torch.bincount(b.topk_ids.reshape(-1).long(), minlength=E)
    if key_a is None:
        margins = torch.full((T,), math.nan, dtype=torch.float64)
    else:
        margins = selection_margin(key_a, K)
    return Agreement(
        num_tokens=T, top_k=K,
        flip_rate=float(flipped.double().mean()) if T else 0.0,
        jaccard=float(jac.mean()) if T else 1.0,
        weight_l1=float(wl1.sum(1).mean()) if T else 0.0,
        load_shift=float((load_a - load_b).abs().sum()) / (2 * T * K) if T else 0.0,
        margins=margins.cpu().numpy(), flipped=flipped.cpu().numpy(),
        load_a=load_a.cpu().numpy(), load_b=load_b.cpu().numpy())


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref|| / ||y_ref|| (Frobenius, fp64)."""
    den = y_ref.double().norm()
    return float((y.double() - y_ref.double()).norm() / den) if den > 0 else math.nan


@torch.no_grad()
def compare_routers(router_a, router_b, x: torch.Tensor, layer=None) -> Agreement:
    """Run two routerlib Routers (eval mode, no noise) on the same tokens x [T, D] and compare
    (router a is the reference). With an MoELayer, output_error compares the layer's output
    routed by b with its output routed by a (same experts, same dispatch)."""
    from routerlib.quant.payload import moe_forward_quantized

    ra, rb = router_a.training, router_b.training
    router_a.eval()
    router_b.eval()
    try:
        out_a: RouterOutput = router_a(x)
        out_b: RouterOutput = router_b(x)
    finally:
        router_a.train(ra)
        router_b.train(rb)
    cfg = router_a.cfg
    key = router_key(out_a.logits, cfg, router_a.expert_bias)
    agr = compare_selections(out_a.selection, out_b.selection, cfg.num_experts, key)
    if layer is None:
        return agr
    y_a = moe_forward_quantized(layer, x, fmt=None, routed=out_a)
    y_b = moe_forward_quantized(layer, x, fmt=None, routed=out_b)
    return Agreement(**{**agr.__dict__, "output_error": relative_error(y_b, y_a)})


def gate_inputs(kind: str, T: int, D: int, E: int, seed: int = 0, n_hot: int = 4,
                delta: float = 2.0, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded router inputs (x [T, D], gate weight [E, D]) whose logits have unit spread:
        random   x ~ N(0, 1), W ~ N(0, 1/D): every expert equally likely
        skewed   x shares a direction u; n_hot experts' weight rows lean on u so their logits sit
                 `delta` higher: a skewed load (as a trained router's hot experts)"""
    if kind not in ("random", "skewed"):
        raise ValueError(f"kind={kind!r}: must be 'random' or 'skewed' (real routing: pass a "
                         "trained model's tokens and router)")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(E, D, generator=g) / math.sqrt(D)
    if kind == "skewed":
        u = torch.randn(D, generator=g)
        u = u / u.norm()
        mu = 0.5 * math.sqrt(D)
        x = x + mu * u  # x . u ~ mu
        hot = torch.randperm(E, generator=g)[:min(n_hot, E)]
        w[hot] += (delta / mu) * u
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
