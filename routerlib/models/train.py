"""Training loop of the MoE language model, its evaluation, per-step routing metrics, checkpoints.

Shape legend: N logged steps, L MoE layers, E experts.

    result = train(model, corpus, TrainConfig(steps=300), device="cuda")
    result.history          # per step: loss, cross-entropy, aux, z, lr, grad norm, step time
    result.routing          # per (step, layer): imbalance, cv, max_vio, drop rate, dead experts
    result.load             # [N, L, E] int32 slots routed to each expert (before capacity)
    result.evals            # per evaluation: validation loss and perplexity
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from routerlib.config import RouterConfig
from routerlib.models.data import BatchSampler, TextCorpus, eval_batches
from routerlib.models.lm import LMConfig, MoETransformer


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr; gradient clipping;
    bf16 autocast on CUDA (fp32 on the CPU)."""

    steps: int = 300
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100  # also evaluated after the last step
    eval_batches: int = 8
    seed: int = 0
    autocast: bool = True
    checkpoint_every: int = 0  # 0: only the final checkpoint (when a directory is given)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r}: must be an int >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps}: must be in "
                             f"[0, steps={self.steps}]")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip > 0):
            raise ValueError("TrainConfig: lr and grad_clip must be > 0, min_lr_ratio in [0, 1]")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate multiplier of a step (0-based): linear warmup, then cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_model(cfg: LMConfig, seed: int, device: torch.device | str = "cpu") -> MoETransformer:
    """The model initialised from seed (the same weights for every router configuration)."""
    torch.manual_seed(seed)
    return MoETransformer(cfg).to(device)


def make_optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _autocast(device: torch.device, cfg: TrainConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=cfg.autocast and device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def routing_frame(load: np.ndarray, kept: np.ndarray, steps: np.ndarray) -> pd.DataFrame:
    """Per (step, layer) metrics of load, kept [N, L, E]: imbalance max/mean, coefficient of
    variation std/mean, MaxVio = max/mean - 1 (the aux-loss-free paper's measure), drop rate,
    dead experts (no slot routed to them that step), normalised entropy of the load. train()
    adds tokens_unrouted: the fraction of tokens no expert processed (every slot dropped, or no
    expert picked them under expert choice): only the residual carries them."""
    N, L, E = load.shape
    lf = load.astype(np.float64)
    total = lf.sum(-1)  # [N, L]
    mean = total / E
    with np.errstate(invalid="ignore", divide="ignore"):
        imbalance = lf.max(-1) / mean
        cv = lf.std(-1) / mean
        p = lf / total[..., None]
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1) / max(math.log(E),
                                                                                   1e-12)
        drop = np.where(total > 0, (lf - kept).sum(-1) / total, 0.0)
    return pd.DataFrame({
        "step": np.repeat(steps, L), "layer": np.tile(np.arange(L), N),
        "imbalance": imbalance.reshape(-1), "cv": cv.reshape(-1),
        "max_vio": (imbalance - 1).reshape(-1), "drop_rate": drop.reshape(-1),
        "dead_experts": (load == 0).sum(-1).reshape(-1), "entropy": ent.reshape(-1)})


@dataclass
class TrainResult:
    history: pd.DataFrame  # one row per step
    routing: pd.DataFrame  # one row per (step, layer)
    load: np.ndarray  # [N, L, E] int32 slots routed to each expert
    kept: np.ndarray  # [N, L, E] int32 slots kept (capacity)
    evals: pd.DataFrame  # one row per evaluation: step, val_loss, val_ppl

    @property
    def final_val_loss(self) -> float:
        return float(self.evals.val_loss.iloc[-1])

    def summary(self, last: int = 50) -> dict[str, float]:
        """Final validation loss and perplexity; routing metrics averaged over the last `last`
        steps and the layers; median step time over the steps after the first 5 (warm-up)."""
        r = self.routing[self.routing.step >= self.routing.step.max() - last + 1]
        times = self.history.step_time_s.iloc[5:] if len(self.history) > 5 else \
            self.history.step_time_s
        return {"val_loss": self.final_val_loss, "val_ppl": math.exp(self.final_val_loss),
                "imbalance": float(r.imbalance.mean()), "cv": float(r.cv.mean()),
                "max_vio": float(r.max_vio.mean()), "drop_rate": float(r.drop_rate.mean()),
                "dead_experts": float(r.dead_experts.mean()),
                "tokens_unrouted": float(r.tokens_unrouted.mean()),
                "step_time_ms": 1e3 * float(times.median())}


@torch.no_grad()
def evaluate(model: MoETransformer, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, cfg: TrainConfig) -> float:
    """Mean next-token cross-entropy (nats) over the batches, in eval mode (no jitter)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, cfg):
            out = model(x)
        total += F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="sum")
        count += y.numel()
    model.train(was_training)
    return float(total) / count


def train(model: MoETransformer, corpus: TextCorpus, cfg: TrainConfig,
          device: torch.device | str | None = None, checkpoint_dir: str | Path | None = None,
          progress: bool = True, desc: str = "train") -> TrainResult:
    """Train the model on corpus.train and evaluate on corpus.val; returns the logs.

    Each step: forward under autocast, loss = cross-entropy + aux + z, backward, clip, AdamW,
    schedule; routers with expert_bias get their aux-loss-free bias update from the step's load.
    """
    device = torch.device(device or next(model.parameters()).device)
    model.to(device).train()
    if corpus.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the corpus has {corpus.vocab_size} token ids, the model's vocabulary "
                         f"only {model.cfg.vocab_size}")
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val = eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    moe = model.moe_layers
    rows, evals, loads, kepts, unrouted = [], [], [], [], []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        x, y = (t.to(device, non_blocking=True) for t in next(sampler))
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, cfg):
            out = model(x)
        ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        loss = ce + out.aux_loss + out.z_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        for layer, r in zip(moe, out.router):
            if layer.router.expert_bias is not None:
                layer.router.update_bias(r.plan.expert_counts)
        _sync(device)
        dt = time.perf_counter() - t0
        loads.append(torch.stack([r.plan.expert_counts for r in out.router]))  # [L, E]
        kepts.append(torch.stack([r.plan.kept_counts for r in out.router]))
        unrouted.append(torch.stack([(r.plan.slot_to_row < 0).all(1).float().mean()
                                     for r in out.router]))  # [L]
        rows.append({"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()),
                     "aux": float(out.aux_loss.detach()), "z": float(out.z_loss.detach()),
                     "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                     "step_time_s": dt, "tokens": (step + 1) * x.numel()})
        bar.set_postfix(ce=f"{rows[-1]['ce']:.3f}")
        last = step == cfg.steps - 1
        if (step + 1) % cfg.eval_every == 0 or last:
            vl = evaluate(model, val, device, cfg)
            evals.append({"step": step, "val_loss": vl, "val_ppl": math.exp(vl)})
        if checkpoint_dir is not None and (last or (cfg.checkpoint_every
                                                    and (step + 1) % cfg.checkpoint_every == 0)):
            save_checkpoint(model, Path(checkpoint_dir) / "model.pt", step=step)
    bar.close()
    load = torch.stack(loads).cpu().numpy().astype(np.int32)  # [N, L, E]
    kept = torch.stack(kepts).cpu().numpy().astype(np.int32)
    routing = routing_frame(load, kept, np.arange(cfg.steps))
    routing["tokens_unrouted"] = torch.stack(unrouted).cpu().numpy().reshape(-1)
    return TrainResult(history=pd.DataFrame(rows), routing=routing,
                       load=load, kept=kept, evals=pd.DataFrame(evals))


def config_dict(cfg: LMConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> LMConfig:
    d = dict(d)
    d["router"] = RouterConfig(**d["router"])
    return LMConfig(**d)


def save_checkpoint(model: MoETransformer, path: str | Path, step: int | None = None,
                    dtype: torch.dtype = torch.bfloat16, **meta) -> Path:
    """The config and the weights (floating tensors stored in dtype: bf16 halves the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() and k.split(".")[-1] != "expert_bias"
                 else v).cpu() for k, v in model.state_dict().items()}
    torch.save({"config": config_dict(model.cfg), "state_dict": state, "step": step, **meta}, path)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[MoETransformer, dict]:
    """(model in eval mode, the checkpoint's other entries)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = MoETransformer(config_from_dict(ck.pop("config")))
    state = {k: v.float() if v.is_floating_point() else v for k, v in ck.pop("state_dict").items()}
    model.load_state_dict(state)
    return model.to(device).eval(), ck
