"""Peers measured beside routerlib, when their wheels are importable (GPU runs carry them):

  torchtitan 0.3.0  TokenChoiceTopKRouter (after the gate) + histc counts + its LocalTokenDispatcher
                    (argsort reorder, x[idx] gather, deterministic scatter-add combine)
  deepspeed 0.19.8  sharded_moe.topkgating (softmax, top-k, capacity, locations) with sparse routes,
                    and its index-based encode (dispatch) / decode (combine)

Each builder returns {"route": fn, "dispatch": fn, "combine": fn} closures over fixed inputs, or
raises ImportError with the reason. Only their public or module-level functions are called; nothing
of theirs is copied here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Fns = dict[str, Callable[[], object]]


def torchtitan_fns(logits: torch.Tensor, x: torch.Tensor, top_k: int,
                   score_func: str = "softmax", route_norm: bool = True) -> Fns:
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    T, E = logits.shape
    cfg = TokenChoiceTopKRouter.Config(
        num_experts=E, gate=Linear.Config(in_features=E, out_features=E), top_k=top_k,
        score_func=score_func, route_norm=route_norm)
    router = cfg.build().to(logits.device)
    router.gate = torch.nn.Identity()  # time the routing, not a gate GEMM: feed logits directly
    disp = LocalTokenDispatcher(LocalTokenDispatcher.Config(num_experts=E, top_k=top_k))
    logits3 = logits.float().view(1, T, E)

    def route():
        scores, ids, _ = router(logits3)
        counts = torch.histc(ids.view(-1).float(), bins=E, min=0, max=E)
        order = torch.argsort(ids.view(-1), stable=True)
        return scores.view(T, top_k), ids.view(T, top_k), counts, order

    scores, ids, counts, _ = route()
    routed, _, meta = disp.dispatch(x, scores, ids, counts)

    def dispatch():
        return disp.dispatch(x, scores, ids, counts)[0]

    def combine():
        return disp.combine(routed, meta, x)

    return {"route": route, "dispatch": dispatch, "combine": combine}


def deepspeed_fns(logits: torch.Tensor, x: torch.Tensor, top_k: int,
                  capacity_factor: float = 1.25, min_capacity: int = 4) -> Fns:
    from deepspeed.moe import sharded_moe as sm

    T, E = logits.shape
    logits32 = logits.float()

    def route():
        return sm.topkgating(logits32, top_k, capacity_factor, min_capacity, drop_tokens=True,
                             drop_policy="position", sparse_routes=True)

    _, capacity, _, idx, loc, gates, _ = route()
    capacity = int(capacity)
    slots = sm._route_slots(idx, loc, E, capacity)  # [K, T]
    buf = sm._sparse_encode(x, slots, E, capacity).reshape(E * capacity, -1)

    def dispatch():
        return sm._sparse_encode(x, slots, E, capacity)

    def combine():
        return sm._sparse_decode(buf, slots, gates, T)

    return {"route": route, "dispatch": dispatch, "combine": combine}


PEERS: dict[str, Callable[..., Fns]] = {"torchtitan": torchtitan_fns, "deepspeed": deepspeed_fns}


def available() -> dict[str, str]:
    """{peer: "ok" or the import error} without building anything."""
    status = {}
    for name, mod in (("torchtitan", "torchtitan.models.common.moe"),
                      ("deepspeed", "deepspeed.moe.sharded_moe")):
        try:
            __import__(mod)
            status[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means the peer is unavailable
            status[name] = f"{type(exc).__name__}: {exc}"
    return status
