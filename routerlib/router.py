"""The Router module: gate projection, training-time noise, scoring, selection, plan, losses."""

from __future__ import annotations

import torch
from torch import nn

from routerlib import ops
from routerlib import reference as ref
from routerlib.config import Backend, RouterConfig
from routerlib.types import RouterOutput, RoutingPlan, Selection


def check_tokens(x: torch.Tensor, hidden_size: int, weight: torch.Tensor) -> None:
    """x must be [T, D] with D = hidden_size, on the weight's device and in its dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"x must have shape [T, {hidden_size}], got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the router weight is on {weight.device}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the router weight has {weight.dtype}")


class Router(nn.Module):
    """x [T, D] -> RouterOutput (logits, selection, plan, losses).

    The gate is a bias-free linear map D -> E. With cfg.expert_bias the module holds the
    aux-loss-free bias as a buffer; call update_bias(load) after each step to move it.
    process_group: the data-parallel group of cfg.aux_loss_global (None: the world).
    """

    def __init__(self, hidden_size: int, cfg: RouterConfig, backend: Backend = "torch",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 process_group: torch.distributed.ProcessGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.process_group = process_group
        self.hidden_size = hidden_size
        self.backend = backend
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False, device=device, dtype=dtype)
        bias = torch.zeros(cfg.num_experts, device=device, dtype=torch.float32)
        self.register_buffer("expert_bias", bias if cfg.expert_bias else None)

    def forward(self, x: torch.Tensor, seq_len: int | None = None,
                generator: torch.Generator | None = None) -> RouterOutput:
        check_tokens(x, self.hidden_size, self.gate.weight)
        cfg = self.cfg
        if self.training:
            x = ref.input_jitter(x, cfg.jitter_eps, generator)
        logits = self.gate(x)  # [T, E]
        if self.training:
            logits = ref.logit_noise(logits, cfg.noise_std, generator)
        priority = None
        if cfg.drop_policy == "random":  # dropless too: rows inside an expert follow the keys
            priority = torch.rand(logits.shape[0], cfg.slots_per_token, generator=generator,
                                  device=logits.device)
        need_stats = cfg.aux_loss_coef > 0 or cfg.z_loss_coef > 0  # the losses below use them
        sel, plan = ops.route(logits, cfg, self.expert_bias, priority, self.backend, need_stats)
        aux, z = self.losses(logits, sel, plan, seq_len)
        return RouterOutput(logits=logits, selection=sel, plan=plan, aux_loss=aux, z_loss=z)

    def losses(self, logits: torch.Tensor, sel: Selection, plan: RoutingPlan,
               seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux, z), each already scaled by its coefficient. The batch-level balance loss and the
        z-loss use the fused sums of the selection stage (no [T, E] pass in torch)."""
        cfg = self.cfg
        T = logits.shape[0]
        aux = logits.new_zeros((), dtype=torch.float32)
        if cfg.routing == "token_choice":  # expert choice is balanced by construction
            if cfg.aux_loss_coef > 0 and cfg.aux_loss_global:
                aux = aux + cfg.aux_loss_coef * ref.global_load_balancing_loss(
                    sel.prob_sum, plan.expert_counts, T, cfg.top_k, self.process_group)
            elif cfg.aux_loss_coef > 0:
                aux = aux + cfg.aux_loss_coef * ref.load_balancing_loss_from_stats(
                    sel.prob_sum, plan.expert_counts, T, cfg.top_k)
            if cfg.seq_aux_loss_coef > 0:
                if seq_len is None:
                    raise ValueError("RouterConfig.seq_aux_loss_coef > 0 needs seq_len "
                                     "(pass x as [B, S, D] or seq_len=...)")
                scores = sel.scores if sel.scores is not None else ref.score(logits, cfg)
                aux = aux + cfg.seq_aux_loss_coef * ref.sequence_load_balancing_loss(
                    scores, sel.topk_ids, seq_len, cfg.score_func)
        z = logits.new_zeros((), dtype=torch.float32)
        if cfg.z_loss_coef > 0:
            z = cfg.z_loss_coef * sel.zsq_sum / max(T, 1)
        return aux, z

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3) from this step's per-expert load [E]
        (e.g. out.plan.expert_counts), in place on the device: no host sync, so a CUDA graph
        can capture it."""
        if self.expert_bias is None:
            raise RuntimeError("update_bias needs RouterConfig.expert_bias=True")
        if load.shape != self.expert_bias.shape:
            raise ValueError(f"load must have shape {tuple(self.expert_bias.shape)} (one count "
                             f"per expert), got {tuple(load.shape)}")
        ref.update_expert_bias_(self.expert_bias, load, self.cfg.bias_update_rate)
