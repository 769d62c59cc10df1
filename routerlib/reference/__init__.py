"""Readable PyTorch reference of MoE routing: the contract every kernel is tested against."""

from routerlib.reference.dispatch import combine, dispatch
from routerlib.reference.gating import (
    check_logits,
    group_limit,
    input_jitter,
    logit_noise,
    raise_if_nonfinite,
    score,
    select,
    selection_key,
    stable_topk,
)
from routerlib.reference.losses import (
    expert_load,
    global_load_balancing_loss,
    load_balancing_loss,
    load_balancing_loss_from_stats,
    sequence_load_balancing_loss,
    update_expert_bias,
    update_expert_bias_,
    z_loss,
)
from routerlib.reference.plan import build_plan, num_rows

__all__ = [
    "build_plan", "check_logits", "combine", "dispatch", "expert_load",
    "global_load_balancing_loss", "group_limit",
    "input_jitter", "load_balancing_loss", "load_balancing_loss_from_stats", "logit_noise",
    "num_rows", "raise_if_nonfinite", "score", "select", "selection_key",
    "sequence_load_balancing_loss", "stable_topk", "update_expert_bias", "update_expert_bias_",
    "z_loss",
]
