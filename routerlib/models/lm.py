"""A small decoder-only MoE transformer: RMSNorm, rotary attention, routerlib's MoELayer.

Shape legend: B batch, S sequence (this call), M max_seq_len (cache length), D hidden,
H heads, Hd head width, V vocabulary, L layers, T = B*S tokens.

    model = MoETransformer(LMConfig(...))
    out = model(idx)                                   # idx [B, S] long: causal attention
    cache = model.new_cache(B, M)                      # preallocated keys/values
    out = model(idx, cache=cache, input_pos=pos)       # pos [S] long: absolute positions

With a cache, the keys/values of idx are written at input_pos (index_copy_, static shapes, no
host sync: capturable in a CUDA graph) and the queries attend over the whole cache with the mask
key_pos <= query_pos. Positions past what was written are masked by that rule as long as tokens
are fed in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from routerlib.config import Backend, MoEConfig, RouterConfig
from routerlib.layer import MoELayer, swiglu
from routerlib.types import RouterOutput


def _default_router() -> RouterConfig:
    return RouterConfig(num_experts=16, top_k=2, renormalize=True)


@dataclass(frozen=True)
class LMConfig:
    """The language model. Every MoE layer shares `router`; the first layer is a dense SwiGLU of
    width ffn_size * top_k (the same active width) when first_layer_dense."""

    vocab_size: int = 4096
    max_seq_len: int = 256
    num_layers: int = 4
    hidden_size: int = 256  # D
    num_heads: int = 4  # H
    ffn_size: int = 128  # F, each expert's width
    router: RouterConfig = field(default_factory=_default_router)
    first_layer_dense: bool = False
    backend: Backend = "torch"
    expert_path: str = "batched"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "num_layers", "hidden_size", "num_heads",
                     "ffn_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LMConfig.{name}={v!r}: must be an int >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"LMConfig.hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"LMConfig: the head width {self.hidden_size // self.num_heads} "
                             "must be even for rotary embeddings")
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"LMConfig.router must be a RouterConfig, got {type(self.router)}")
        if self.first_layer_dense and self.num_layers < 2:
            raise ValueError("LMConfig.first_layer_dense needs num_layers >= 2 (at least one "
                             "MoE layer)")
        # MoEConfig validates backend and expert_path
        MoEConfig(self.hidden_size, self.ffn_size, self.router, expert_path=self.expert_path,
                  backend=self.backend)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - int(self.first_layer_dense)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(self.hidden_size, self.ffn_size, self.router,
                         expert_path=self.expert_path, backend=self.backend)


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, S, V] fp32
    aux_loss: torch.Tensor  # 0-d fp32: the balance losses of all MoE layers, coefficients applied
    z_loss: torch.Tensor  # 0-d fp32: the router z-losses of all MoE layers
    router: list[RouterOutput]  # one per MoE layer, in depth order


class KVCache(nn.Module):
    """Preallocated keys and values of every layer: k, v [L, B, H, M, Hd]."""

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_seq_len: int,
                 head_dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        shape = (num_layers, batch_size, num_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype))

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # statistics in fp32 whatever the autocast dtype
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotary_tables(max_seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, ...]:
    """cos, sin [M, Hd/2] fp32 of the rotary angles pos * base^(-2i/Hd)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, Hd], cos/sin [S, Hd/2]: rotate the pairs (x_i, x_{i+Hd/2}) (half-split form)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None, input_pos: torch.Tensor | None
                ) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each [B, H, S, Hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_cache, v_cache = kv  # [B, H, M, Hd] views into the KVCache
            k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
            key_pos = torch.arange(k_cache.shape[2], device=x.device)
            mask = key_pos[None, :] <= input_pos[:, None]  # [S, M] bool
            y = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype),
                                               attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(hidden_size, 2 * ffn_size))
        self.w_down = nn.Parameter(torch.empty(ffn_size, hidden_size))
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(hidden_size))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(ffn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_gate_up.to(x.dtype), self.w_down.to(x.dtype))


class Block(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + ffn(norm(h)) with ffn an MoELayer or dense."""

    def __init__(self, cfg: LMConfig, dense: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.moe = None if dense else MoELayer(cfg.moe_config())
        self.mlp = DenseMLP(cfg.hidden_size, cfg.ffn_size * cfg.router.top_k) if dense else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None, input_pos: torch.Tensor | None
                ) -> tuple[torch.Tensor, RouterOutput | None]:
        h = h + self.attn(self.attn_norm(h), cos, sin, kv, input_pos)
        x = self.ffn_norm(h)  # fp32 like the residual stream: the router's gate is fp32
        if self.moe is None:
            return h + self.mlp(x), None
        y, out = self.moe(x)  # [B, S, D]
        return h + y, out


class MoETransformer(nn.Module):
    """idx [B, S] long -> LMOutput. The embedding and the output head share their weight."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(
            Block(cfg, dense=cfg.first_layer_dense and i == 0) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # [M, Hd/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=std)
            # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(blk.attn.proj.weight, std=std / math.sqrt(2 * self.cfg.num_layers))
            if blk.moe is not None:
                nn.init.normal_(blk.moe.router.gate.weight, std=std)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks if b.moe is not None]

    def new_cache(self, batch_size: int, max_seq_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache for batch_size sequences of up to max_seq_len (<= cfg.max_seq_len)
        tokens, on the model's device and in its parameters' dtype unless told otherwise."""
        if max_seq_len > self.cfg.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds LMConfig.max_seq_len="
                             f"{self.cfg.max_seq_len} (the rotary tables' length)")
        p = self.embed.weight
        return KVCache(self.cfg.num_layers, batch_size, self.cfg.num_heads, max_seq_len,
                       self.cfg.head_dim, device=device or p.device, dtype=dtype or p.dtype)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None) -> LMOutput:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be [B, S] int64 token ids, got {tuple(idx.shape)} "
                             f"{idx.dtype}")
        B, S = idx.shape
        if cache is None:
            if input_pos is not None:
                raise ValueError("input_pos is only used with a cache")
            if S > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {S} exceeds LMConfig.max_seq_len="
                                 f"{self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        else:
            if input_pos is None or input_pos.shape != (S,):
                raise ValueError(f"with a cache, input_pos must be a [S]={S} long tensor of "
                                 "absolute positions")
            if cache.batch_size != B:
                raise ValueError(f"the cache holds {cache.batch_size} sequences, idx {B}")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [S, Hd/2]
        h = self.embed(idx)  # [B, S, D] fp32: the residual stream stays fp32 under autocast
        routers: list[RouterOutput] = []
        aux = h.new_zeros((), dtype=torch.float32)
        z = h.new_zeros((), dtype=torch.float32)
        for i, blk in enumerate(self.blocks):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h, out = blk(h, cos, sin, kv, input_pos)
            if out is not None:
                routers.append(out)
                aux = aux + out.aux_loss.float()
                z = z + out.z_loss.float()
        logits = F.linear(self.norm(h), self.embed.weight).float()  # [B, S, V]
        return LMOutput(logits=logits, aux_loss=aux, z_loss=z, router=routers)

    def num_params(self, active: bool = False) -> int:
        """Parameters (the embedding counted once); active=True counts K of E experts."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            r = self.cfg.router
            for m in self.moe_layers:
                per_expert = sum(p[0].numel() for p in m.experts.parameters())
                n -= per_expert * (r.num_experts - r.top_k)
        return n
