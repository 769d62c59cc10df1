"""Routing quality metrics: per-expert load, drops, imbalance, entropy; and a tracker over steps.

Shape vocabulary: T tokens, E experts, S slots per token (K for token choice).

`RoutingStats` is a host-side summary of one routing plan (it copies a few [E] vectors to the
host: call it outside the hot path). `ExpertLoadTracker` is meant for the hot path: `update` only
clones the plan's [E] count vectors on their device (no host sync); they are copied to the host in
one go when `history()` or `summary()` is asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from routerlib.types import RouterOutput, RoutingPlan


def _as_plan(plan: RoutingPlan | RouterOutput) -> RoutingPlan:
    if isinstance(plan, RouterOutput):
        return plan.plan
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan or RouterOutput, got {type(plan).__name__}")
    return plan


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().long().numpy()
    return np.array(x, dtype=np.int64)


def _load_stats(load: np.ndarray) -> tuple[float, float, float]:
    """(imbalance max/mean, coefficient of variation std/mean, normalised entropy) of a load [E].

    With no routed slot at all the three are NaN (there is no distribution to judge). The entropy
    is H(load/sum) / log(E): 1 for a perfectly uniform load, 0 when one expert takes everything;
    with E = 1 it is defined as 1 (a single expert is trivially balanced)."""
    E = load.shape[0]
    total = float(load.sum())
    if total <= 0:
        return math.nan, math.nan, math.nan
    mean = total / E
    imbalance = float(load.max()) / mean
    cv = float(load.std()) / mean  # population std: a uniform load gives exactly 0
    if E == 1:
        return imbalance, cv, 1.0
    p = load[load > 0] / total
    entropy = float(-(p * np.log(p)).sum()) / math.log(E)
    return imbalance, cv, entropy


@dataclass(frozen=True)
class RoutingStats:
    """Summary of one routing decision.

    load:          [E] int64 slots routed to each expert (before capacity)
    kept:          [E] int64 slots each expert keeps (= load when dropless)
    num_tokens:    T
    num_slots:     slots with an expert (T*K for token choice; for expert choice, the picked pairs)
    dropped:       slots routed but not kept (sum(load - kept))
    drop_rate:     dropped / num_slots (0 when there is no slot)
    tokens_dropped: tokens whose every slot was dropped (only the residual carries them); None
                   when built from topk ids alone
    imbalance:     max(load) / mean(load); 1 = perfectly balanced, E = one expert takes all
    cv:            std(load) / mean(load) (coefficient of variation, population std)
    entropy:       normalised entropy of load / sum(load), in [0, 1]; 1 = uniform
    empty_experts: experts that received no slot
    capacity:      C, or None for dropless
    """

    load: np.ndarray
    kept: np.ndarray
    num_tokens: int
    num_slots: int
    dropped: int
    drop_rate: float
    tokens_dropped: int | None
    imbalance: float
    cv: float
    entropy: float
    empty_experts: int
    capacity: int | None

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[0])

    @classmethod
    def from_plan(cls, plan: RoutingPlan | RouterOutput,
                  topk_ids: torch.Tensor | None = None) -> RoutingStats:
        """Stats of a plan. topk_ids [T, K] (optional) is used to cross-check the plan's counts:
        a mismatch means the plan and the ids do not belong together (a ValueError)."""
        plan = _as_plan(plan)
        load = plan.expert_counts.detach().to("cpu", torch.int64).numpy()
        kept = plan.kept_counts.detach().to("cpu", torch.int64).numpy()
        if topk_ids is not None:
            from_ids = torch.bincount(topk_ids.detach().reshape(-1).long().cpu(),
                                      minlength=load.shape[0]).numpy()
            # expert choice plans count only the picked pairs, so compare token choice only
            if topk_ids.shape[1] != load.shape[0] and not np.array_equal(from_ids, load):
                raise ValueError("topk_ids do not match plan.expert_counts: "
                                 f"{from_ids.tolist()} vs {load.tolist()}")
        slot_to_row = plan.slot_to_row.detach().cpu()  # [T, S]
        T = int(slot_to_row.shape[0])
        tokens_dropped = int((slot_to_row < 0).all(dim=1).sum()) if T else 0
        return cls._build(load, kept, T, plan.capacity, tokens_dropped)

    @classmethod
    def from_topk(cls, topk_ids: torch.Tensor, num_experts: int) -> RoutingStats:
        """Stats of a dropless token-choice selection from its ids [T, K] alone."""
        if topk_ids.dim() != 2:
            raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids.shape)}")
        load = torch.bincount(topk_ids.detach().reshape(-1).long().cpu(),
                              minlength=num_experts).numpy()
        if load.shape[0] != num_experts:
            raise ValueError(f"topk_ids hold expert ids >= num_experts={num_experts}")
        return cls._build(load, load.copy(), int(topk_ids.shape[0]), None, None)

    @classmethod
    def from_load(cls, load: np.ndarray | torch.Tensor | list[int], kept=None,
                  capacity: int | None = None, num_tokens: int | None = None) -> RoutingStats:
        """Stats from per-expert counts (e.g. a tracker row). kept defaults to load."""
        load = _to_numpy(load)
        kept = load.copy() if kept is None else _to_numpy(kept)
        return cls._build(load, kept, -1 if num_tokens is None else num_tokens, capacity, None)

    @classmethod
    def _build(cls, load: np.ndarray, kept: np.ndarray, T: int, capacity: int | None,
               tokens_dropped: int | None) -> RoutingStats:
        if load.shape != kept.shape or load.ndim != 1:
            raise ValueError(f"load {load.shape} and kept {kept.shape} must both be [E]")
        if (kept > load).any():
            raise ValueError("kept counts exceed routed counts")
        num_slots = int(load.sum())
        dropped = int((load - kept).sum())
        imbalance, cv, entropy = _load_stats(load)
        return cls(load=load, kept=kept, num_tokens=T, num_slots=num_slots, dropped=dropped,
                   drop_rate=dropped / num_slots if num_slots else 0.0,
                   tokens_dropped=tokens_dropped, imbalance=imbalance, cv=cv, entropy=entropy,
                   empty_experts=int((load == 0).sum()), capacity=capacity)

    def as_dict(self) -> dict[str, float | int | None]:
        """The scalar fields (for a DataFrame row)."""
        return {"num_tokens": self.num_tokens, "num_slots": self.num_slots,
                "dropped": self.dropped, "drop_rate": self.drop_rate,
                "tokens_dropped": self.tokens_dropped, "imbalance": self.imbalance,
                "cv": self.cv, "entropy": self.entropy, "empty_experts": self.empty_experts,
                "capacity": self.capacity}


def routing_stats(plan: RoutingPlan | RouterOutput, topk_ids: torch.Tensor | None = None
                  ) -> RoutingStats:
    """Shorthand for RoutingStats.from_plan."""
    return RoutingStats.from_plan(plan, topk_ids)


class ExpertLoadTracker:
    """Per-(step, layer) expert load over a run, kept on the device until asked for.

    update(layer, plan) records plan.expert_counts and plan.kept_counts (two [E] int32 clones, no
    host sync, safe under CUDA graph replay since the clone happens outside the graph's buffers).
    The step of an update defaults to the number of earlier updates of that layer, so calling
    update once per layer per training step numbers the steps 0, 1, 2, ...
    """

    def __init__(self, num_layers: int, num_experts: int):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r}: must be an int >= 1")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r}: must be an int >= 1")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._steps: list[int] = []
        self._layers: list[int] = []
        self._load: list[torch.Tensor] = []  # each [E] int32, on the plan's device
        self._kept: list[torch.Tensor] = []
        self._updates = [0] * num_layers

    def __len__(self) -> int:
        return len(self._load)

    def update(self, layer: int, plan: RoutingPlan | RouterOutput, step: int | None = None
               ) -> None:
        """Record one layer's routing at one step (no host sync)."""
        plan = _as_plan(plan)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer}: must be in [0, {self.num_layers})")
        if plan.num_experts != self.num_experts:
            raise ValueError(f"plan has {plan.num_experts} experts, the tracker "
                             f"num_experts={self.num_experts}")
        self._steps.append(self._updates[layer] if step is None else int(step))
        self._updates[layer] += 1
        self._layers.append(layer)
        self._load.append(plan.expert_counts.detach().clone())
        self._kept.append(plan.kept_counts.detach().clone())

    def reset(self) -> None:
        self.__init__(self.num_layers, self.num_experts)

    def history(self) -> pd.DataFrame:
        """Long table, one row per (step, layer, expert): load, kept, dropped."""
        cols = ["step", "layer", "expert", "load", "kept", "dropped"]
        if not self._load:
            return pd.DataFrame({c: pd.Series(dtype="int64") for c in cols})
        # one device->host copy for everything recorded so far
        load = torch.stack([t.to(self._load[0].device) for t in self._load]).cpu().long().numpy()
        kept = torch.stack([t.to(self._load[0].device) for t in self._kept]).cpu().long().numpy()
        n, E = load.shape
        return pd.DataFrame({
            "step": np.repeat(np.asarray(self._steps, dtype=np.int64), E),
            "layer": np.repeat(np.asarray(self._layers, dtype=np.int64), E),
            "expert": np.tile(np.arange(E, dtype=np.int64), n),
            "load": load.reshape(-1),
            "kept": kept.reshape(-1),
            "dropped": (load - kept).reshape(-1),
        })

    def load_matrix(self, layer: int | None = None) -> pd.DataFrame:
        """Pivot of the load: [steps x experts] for one layer, or [layers x experts] summed over
        steps when layer is None (what plot_load_heatmap draws)."""
        h = self.history()
        if layer is None:
            return h.pivot_table(index="layer", columns="expert", values="load", aggfunc="sum")
        return h[h.layer == layer].pivot_table(index="step", columns="expert", values="load",
                                               aggfunc="sum")

    def summary(self) -> pd.DataFrame:
        """Per layer, across steps: steps, mean/max imbalance, mean cv, mean entropy, mean drop
        rate, total slots and dropped slots, mean empty experts."""
        h = self.history()
        rows = []
        for (layer, step), g in h.groupby(["layer", "step"], sort=True):
            s = RoutingStats.from_load(g["load"].to_numpy(), g["kept"].to_numpy())
            rows.append({"layer": layer, "step": step, **s.as_dict()})
        cols = ["steps", "imbalance_mean", "imbalance_max", "cv_mean", "entropy_mean",
                "drop_rate_mean", "slots", "dropped", "empty_experts_mean"]
        if not rows:
            return pd.DataFrame(columns=cols).rename_axis("layer")
        per = pd.DataFrame(rows).groupby("layer")
        out = pd.DataFrame({
            "steps": per["step"].nunique(),
            "imbalance_mean": per["imbalance"].mean(),
            "imbalance_max": per["imbalance"].max(),
            "cv_mean": per["cv"].mean(),
            "entropy_mean": per["entropy"].mean(),
            "drop_rate_mean": per["drop_rate"].mean(),
            "slots": per["num_slots"].sum(),
            "dropped": per["dropped"].sum(),
            "empty_experts_mean": per["empty_experts"].mean(),
        })
        return out[cols]
