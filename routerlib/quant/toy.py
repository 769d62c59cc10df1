"""A toy model to measure what precision costs in validation loss, when no trained language model
is at hand: one MoE layer (with a residual) and a linear head classifying points of a seeded
Gaussian mixture. It trains in seconds on a CPU; its losses are a toy's, not a language model's.

    train_toy(cfg) -> ToyModel (layer, head, validation set)
    toy_loss(model, router=, payload=, experts=): validation cross-entropy with the router's gate
        in a precision (routerlib.quant.router), the dispatched payload in fp8/int8, and/or the
        experts in fp8
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from routerlib.config import MoEConfig, RouterConfig
from routerlib.layer import MoELayer
from routerlib.quant.payload import moe_forward_quantized
from routerlib.quant.router import set_router_precision


@dataclass(frozen=True)
class ToyConfig:
    """hidden D and expert width F are multiples of 128 (the fp8 experts' blocks)."""

    hidden: int = 128
    ffn: int = 128
    num_experts: int = 8
    top_k: int = 2
    classes: int = 16
    noise: float = 4.0
    steps: int = 60
    batch: int = 256
    val_size: int = 2048
    lr: float = 3e-3
    seed: int = 0


@dataclass
class ToyModel:
    cfg: ToyConfig
    layer: MoELayer
    head: nn.Linear
    x_val: torch.Tensor  # [N, D]
    y_val: torch.Tensor  # [N] int64
    train_loss: list[float]


def _sample(means: torch.Tensor, n: int, noise: float, g: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, means.shape[0], (n,), generator=g)
    return means[y] + noise * torch.randn(n, means.shape[1], generator=g), y


def _logits(layer: MoELayer, head: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    y, out = layer(x)
    return head(x + y), out


def train_toy(cfg: ToyConfig = ToyConfig()) -> ToyModel:
    """Train the toy (fp32, Adam, the balance loss on) and keep a held-out validation set."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    means = torch.randn(cfg.classes, cfg.hidden, generator=g)
    router = RouterConfig(num_experts=cfg.num_experts, top_k=cfg.top_k, renormalize=True,
                          aux_loss_coef=1e-2)
    layer = MoELayer(MoEConfig(hidden_size=cfg.hidden, ffn_size=cfg.ffn, router=router))
    head = nn.Linear(cfg.hidden, cfg.classes)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=cfg.lr)
    losses = []
    for _ in range(cfg.steps):
        x, y = _sample(means, cfg.batch, cfg.noise, g)
        logits, out = _logits(layer, head, x)
        loss = F.cross_entropy(logits, y)
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    x_val, y_val = _sample(means, cfg.val_size, cfg.noise, g)
    return ToyModel(cfg, layer.eval(), head.eval(), x_val, y_val, losses)


@torch.no_grad()
def toy_loss(model: ToyModel, router: str = "fp32", payload: str | None = None,
             experts: str = "fp32") -> float:
    """Validation cross-entropy with the gate in `router` precision, the dispatched tokens in
    `payload` ("fp8" / "int8" with 1 x 128 groups, None: as they are) and the experts in
    `experts` ("fp32", or "fp8": e4m3 weights in 128 x 128 blocks and activations in 1 x 128
    groups, computed by the fp8 experts' reference)."""
    layer = copy.deepcopy(model.layer)
    set_router_precision(layer, router)
    x = model.x_val
    routed = layer.router(x)
    if experts == "fp8":
        from routerlib.kernels.experts_fp8 import Fp8ExpertWeights, fp8_experts_reference

        fw = Fp8ExpertWeights.from_weights(layer.experts.w_gate_up, layer.experts.w_down)
        y = fp8_experts_reference(x, routed.plan, routed.topk_weights, fw)
    elif experts == "fp32":
        y = moe_forward_quantized(layer, x, payload, 128 if payload else None, "torch",
                                  routed=routed)
    else:
        raise ValueError(f"experts={experts!r}: must be 'fp32' or 'fp8'")
    return float(F.cross_entropy(model.head(x + y), model.y_val))
