"""Routing traces of the trained language model: which experts each validation token went to, in
every MoE layer, saved compactly so benchmarks, the quantization study and the explorer can
replay real routing distributions.

Shape legend: L MoE layers, T tokens, K top-k, E experts, V vocabulary.

    trace = load_trace()                 # the committed trace (results/traces/lm_trace.npz)
    trace.topk_ids[layer]                # [T, K] int32 experts of each token
    trace.load(layer)                    # [E] slots per expert

File format (npz, compressed): tokens uint16 [T]; topk_ids uint8 [L, T, K] (int16 when E > 256);
topk_weights fp16 [L, T, K]; kept bool [L, T, K] (False: the slot was dropped by capacity);
vocab_pieces str [V] (each token id's text); meta (JSON: model, strategy, provenance label).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from routerlib.models.data import TextCorpus, eval_batches, token_pieces
from routerlib.models.lm import MoETransformer

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = ROOT / "results" / "traces" / "lm_trace.npz"


@dataclass
class RoutingTrace:
    """Token -> experts per MoE layer over a stretch of validation text."""

    tokens: np.ndarray  # [T] int64 token ids
    topk_ids: np.ndarray  # [L, T, K] int32
    topk_weights: np.ndarray  # [L, T, K] fp32 (stored as fp16)
    kept: np.ndarray  # [L, T, K] bool
    num_experts: int
    seq_len: int  # the tokens are consecutive windows of seq_len, each routed in one batch
    vocab_pieces: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))  # [V]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        L, T, K = self.topk_ids.shape
        if self.tokens.shape != (T,):
            raise ValueError(f"tokens {self.tokens.shape} must be [T]=[{T}]")
        for name in ("topk_weights", "kept"):
            if getattr(self, name).shape != (L, T, K):
                raise ValueError(f"{name} {getattr(self, name).shape} must be [L, T, K]="
                                 f"{(L, T, K)}")
        if T and (self.topk_ids.min() < 0 or self.topk_ids.max() >= self.num_experts):
            raise ValueError(f"topk_ids must lie in [0, num_experts={self.num_experts})")

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    @property
    def pieces(self) -> list[str]:
        """The text of each token (empty strings when the vocabulary was not stored)."""
        if len(self.vocab_pieces) == 0:
            return [""] * self.num_tokens
        return [str(p) for p in self.vocab_pieces[self.tokens]]

    def load(self, layer: int) -> np.ndarray:
        """[E] int64 slots routed to each expert in one layer (before capacity)."""
        return np.bincount(self.topk_ids[layer].reshape(-1), minlength=self.num_experts)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids_dtype = np.uint8 if self.num_experts <= 256 else np.int16
        np.savez_compressed(
            path, tokens=self.tokens.astype(np.uint16), topk_ids=self.topk_ids.astype(ids_dtype),
            topk_weights=self.topk_weights.astype(np.float16), kept=self.kept.astype(bool),
            vocab_pieces=np.asarray(self.vocab_pieces, dtype=str),
            meta=np.array(json.dumps({**self.meta, "num_experts": self.num_experts,
                                      "seq_len": self.seq_len})))
        return path


def load_trace(path: str | Path | None = None) -> RoutingTrace:
    """Read a trace written by RoutingTrace.save (default: the committed lm_trace.npz)."""
    path = Path(path) if path is not None else DEFAULT_TRACE
    if not path.exists():
        raise FileNotFoundError(f"no routing trace at {path}: run `python -m "
                                "routerlib.models.study --out DIR` and copy DIR/lm_trace.npz")
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return RoutingTrace(tokens=z["tokens"].astype(np.int64),
                            topk_ids=z["topk_ids"].astype(np.int32),
                            topk_weights=z["topk_weights"].astype(np.float32),
                            kept=z["kept"].astype(bool), num_experts=int(meta["num_experts"]),
                            seq_len=int(meta["seq_len"]), vocab_pieces=z["vocab_pieces"],
                            meta=meta)


@torch.no_grad()
def capture_trace(model: MoETransformer, corpus: TextCorpus, seq_len: int,
                  num_tokens: int = 16384, batch_size: int = 32, label: str = "",
                  **meta) -> RoutingTrace:
    """Route the first num_tokens of the validation split through the model (eval mode, fp32,
    windows of seq_len, batch_size windows per forward) and record every MoE layer's choice."""
    r = model.cfg.router
    if r.routing != "token_choice":
        raise ValueError("traces record token-choice routing (K experts per token); this model "
                         f"routes by {r.routing}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = eval_batches(corpus.val, batch_size, seq_len, -(-num_tokens // (batch_size
                                                                            * seq_len)))
    toks, ids, ws, kept = [], [], [], []
    for x, _ in batches:
        out = model(x.to(device))
        toks.append(x.reshape(-1))
        ids.append(torch.stack([o.topk_ids for o in out.router]).cpu())  # [L, B*S, K]
        ws.append(torch.stack([o.topk_weights for o in out.router]).float().cpu())
        kept.append(torch.stack([o.plan.slot_to_row >= 0 for o in out.router]).cpu())
    model.train(was_training)
    T = min(num_tokens, sum(len(t) for t in toks))
    try:
        vocab = np.array(token_pieces(range(model.cfg.vocab_size)), dtype=str)
    except ImportError:  # the trace stays usable without the text
        vocab = np.array([], dtype=str)
    return RoutingTrace(
        tokens=torch.cat(toks)[:T].numpy().astype(np.int64),
        topk_ids=torch.cat(ids, 1)[:, :T].numpy().astype(np.int32),
        topk_weights=torch.cat(ws, 1)[:, :T].numpy(),
        kept=torch.cat(kept, 1)[:, :T].numpy(), num_experts=r.num_experts, seq_len=seq_len,
        vocab_pieces=vocab,
        meta={"label": label, "source": corpus.source, "top_k": r.top_k,
              "num_layers": model.cfg.num_moe_layers, "hidden_size": model.cfg.hidden_size,
              **meta})
