"""A naive, loop-based re-implementation of routerlib.reference, for tests only.

It shares no code with routerlib.reference (only RouterConfig is imported): every stage is written
as plain Python loops over tokens, slots and experts, in float64 arithmetic, so that a bug in the
vectorised reference is unlikely to be repeated here. Shapes follow the project vocabulary:
T tokens, E experts, K top-k, S slots per token, C capacity, R buffer rows, D hidden.

Where the reference *ranks* fp32 values (selection keys, drop-policy keys) the naive code rounds
its keys to fp32 too, so that ties (duplicated logits) and the order of distinct values agree.
Scores computed here in float64 may differ from the reference's fp32 scores by an ulp: compare
weights and losses with a tolerance, ids and plans exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from routerlib.config import RouterConfig

RENORM_EPS = 1e-20  # the reference's renormalisation epsilon (kept equal on purpose)


def f32(v: float) -> float:
    """Round a Python float to the nearest fp32 value."""
    return float(np.float32(v))


def _rows(t: torch.Tensor) -> list[list[float]]:
    """[T, E] tensor -> nested lists of the fp32 values (exactly representable in float64)."""
    return t.detach().float().cpu().double().tolist()


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def logsumexp(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def scores(logits: torch.Tensor, cfg: RouterConfig) -> list[list[float]]:
    """[T][E] float64 scores: softmax or sigmoid of each token's logits."""
    out = []
    for row in _rows(logits):
        out.append(softmax(row) if cfg.score_func == "softmax" else [sigmoid(v) for v in row])
    return out


def distribution(score_row: list[float], score_func: str) -> list[float]:
    """A token's distribution over experts (sigmoid scores normalised to sum to one)."""
    if score_func == "softmax":
        return list(score_row)
    s = sum(score_row)
    return [v / (s + RENORM_EPS) for v in score_row]


def top_indices(key: list[float], k: int) -> list[int]:
    """The k indices of the largest keys; equal keys go to the lower index."""
    return sorted(range(len(key)), key=lambda i: (-key[i], i))[:k]


@dataclass
class NaiveSelection:
    ids: list[list[int]]  # [T][S]
    weights: list[list[float]]  # [T][S]
    scores: list[list[float]]  # [T][E]
    prob_sum: list[float]  # [E]
    zsq_sum: float
    expert_rank: list[list[int]] | None = None  # [T][E], expert choice only

    def ids_tensor(self) -> torch.Tensor:
        return torch.tensor(self.ids, dtype=torch.int32).reshape(len(self.ids), -1)

    def weights_tensor(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float64).reshape(len(self.weights), -1)


def _loss_stats(logit_rows: list[list[float]], score_rows: list[list[float]], cfg: RouterConfig
                ) -> tuple[list[float], float]:
    E = cfg.num_experts
    prob_sum = [0.0] * E
    zsq = 0.0
    for row, srow in zip(logit_rows, score_rows):
        p = distribution(srow, cfg.score_func)
        for e in range(E):
            prob_sum[e] += p[e]
        zsq += logsumexp(row) ** 2
    return prob_sum, zsq


def select(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None
           ) -> NaiveSelection:
    """Scores + selection, token choice or expert choice, one token (or expert) at a time."""
    if cfg.routing == "expert_choice":
        return _select_expert_choice(logits, cfg, bias)
    E, K, G = cfg.num_experts, cfg.top_k, cfg.n_groups
    b = None if bias is None else bias.detach().float().cpu().double().tolist()
    logit_rows = _rows(logits)
    score_rows = scores(logits, cfg)
    ids, weights = [], []
    for row, srow in zip(logit_rows, score_rows):
        # Selection key: raw logits when nothing but the monotone score function stands between
        # them and the ranking; scores (+ bias) otherwise; softmax_after_topk ranks logits (+ bias).
        if cfg.softmax_after_topk or (b is None and G == 1):
            key = list(row)
        else:
            key = [f32(v) for v in srow]
        if b is not None:
            key = [f32(key[e] + b[e]) for e in range(E)]
        if G > 1:
            size = E // G
            group_scores = []
            for g in range(G):
                members = sorted(key[g * size:(g + 1) * size], reverse=True)
                if cfg.group_score == "max":
                    group_scores.append(members[0])
                else:
                    group_scores.append(f32(sum(members[:2])))
            kept_groups = set(top_indices(group_scores, cfg.topk_groups))
            key = [key[e] if e // size in kept_groups else -math.inf for e in range(E)]
        chosen = top_indices(key, K)
        if cfg.softmax_after_topk:
            w = softmax([row[e] for e in chosen])
        else:
            w = [srow[e] for e in chosen]
            if cfg.renormalize:
                total = sum(w)
                w = [v / (total + RENORM_EPS) for v in w]
        ids.append(chosen)
        weights.append([v * cfg.routed_scaling_factor for v in w])
    prob_sum, zsq = _loss_stats(logit_rows, score_rows, cfg)
    return NaiveSelection(ids, weights, score_rows, prob_sum, zsq)


def _select_expert_choice(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None
                          ) -> NaiveSelection:
    """Each expert e picks its C tokens with the largest score (+ bias); ties to the lower token."""
    T, E = logits.shape
    C = cfg.capacity(T)
    b = [0.0] * E if bias is None else bias.detach().float().cpu().double().tolist()
    logit_rows = _rows(logits)
    score_rows = scores(logits, cfg)
    rank = [[-1] * E for _ in range(T)]
    for e in range(E):
        key = [f32(f32(score_rows[t][e]) + b[e]) for t in range(T)]
        for r, t in enumerate(top_indices(key, C)):
            rank[t][e] = r
    ids = [list(range(E)) for _ in range(T)]
    weights = [[s * cfg.routed_scaling_factor for s in srow] for srow in score_rows]
    prob_sum, zsq = _loss_stats(logit_rows, score_rows, cfg)
    return NaiveSelection(ids, weights, score_rows, prob_sum, zsq, expert_rank=rank)


@dataclass
class NaivePlan:
    expert_counts: list[int]  # [E]
    kept_counts: list[int]  # [E]
    expert_offsets: list[int]  # [E+1]
    slot_to_row: list[list[int]]  # [T][S]
    row_to_slot: list[int]  # [R]
    capacity: int | None
    num_rows: int


def slot_order(ids: list[list[int]], weights: list[list[float]], cfg: RouterConfig,
               priority: torch.Tensor | None) -> list[int]:
    """Flat slot indices s = t*S + j in the order the drop policy serves them."""
    S = len(ids[0]) if ids else cfg.slots_per_token
    n = len(ids) * S
    if cfg.drop_policy == "position":
        return list(range(n))
    if cfg.drop_policy == "priority":
        key = [f32(weights[s // S][s % S]) for s in range(n)]
    else:
        assert priority is not None, "the random policy needs priority keys"
        p = _rows(priority)
        key = [p[s // S][s % S] for s in range(n)]
    return sorted(range(n), key=lambda s: (-key[s], s))


def build_plan(ids: list[list[int]], weights: list[list[float]], cfg: RouterConfig,
               num_tokens: int, priority: torch.Tensor | None = None,
               expert_rank: list[list[int]] | None = None) -> NaivePlan:
    """The routing plan by walking the slots one at a time.

    ids/weights: [T][S] (as lists); expert_rank: [T][E] for expert choice.
    """
    T, E = num_tokens, cfg.num_experts
    S = cfg.slots_per_token
    C = cfg.capacity(T)
    rank = [[-1] * S for _ in range(T)]
    counts = [0] * E
    if cfg.routing == "expert_choice":
        assert expert_rank is not None
        for t in range(T):
            for j in range(S):
                if expert_rank[t][j] >= 0:
                    rank[t][j] = expert_rank[t][j]
                    counts[ids[t][j]] += 1
    else:
        for s in slot_order(ids, weights, cfg, priority):
            t, j = divmod(s, S)
            e = ids[t][j]
            rank[t][j] = counts[e]  # arrival order inside the expert
            counts[e] += 1
    kept_counts = [c if C is None else min(c, C) for c in counts]
    offsets = [0]
    for e in range(E):
        if C is not None:
            size = C
        else:
            block = cfg.pad_to_multiple
            size = -(-kept_counts[e] // block) * block  # ceil to the block
        offsets.append(offsets[-1] + size)
    R = E * C if C is not None else T * S + E * (cfg.pad_to_multiple - 1)
    slot_to_row = [[-1] * S for _ in range(T)]
    row_to_slot = [-1] * R
    for t in range(T):
        for j in range(S):
            r = rank[t][j]
            if r >= 0 and (C is None or r < C):
                row = offsets[ids[t][j]] + r
                slot_to_row[t][j] = row
                row_to_slot[row] = t * S + j
    return NaivePlan(counts, kept_counts, offsets, slot_to_row, row_to_slot, C, R)


def dispatch(x: torch.Tensor, row_to_slot: list[int], S: int) -> torch.Tensor:
    """[T, D] -> [R, D], row by row; empty rows are zero."""
    out = torch.zeros(len(row_to_slot), x.shape[1], dtype=x.dtype)
    for r, s in enumerate(row_to_slot):
        if s >= 0:
            out[r] = x[s // S]
    return out


def combine(expert_out: torch.Tensor, slot_to_row: list[list[int]], weights: torch.Tensor
            ) -> torch.Tensor:
    """[R, D] -> [T, D]: float64 weighted sum over the kept slots of each token."""
    T = len(slot_to_row)
    y = torch.zeros(T, expert_out.shape[1], dtype=torch.float64)
    expert_out, weights = expert_out.detach(), weights.detach()
    for t in range(T):
        for j, row in enumerate(slot_to_row[t]):
            if row >= 0:
                y[t] += float(weights[t, j]) * expert_out[row].double()
    return y


def expert_load(ids: list[list[int]], E: int) -> list[int]:
    load = [0] * E
    for row in ids:
        for e in row:
            load[e] += 1
    return load


def load_balancing_loss(score_rows: list[list[float]], ids: list[list[int]], E: int,
                        score_func: str = "softmax") -> float:
    """E * sum_e f_e * P_e with f_e the fraction of slots on e and P_e the mean distribution."""
    T = len(score_rows)
    K = len(ids[0])
    load = expert_load(ids, E)
    loss = 0.0
    for e in range(E):
        P = sum(distribution(srow, score_func)[e] for srow in score_rows) / T
        loss += load[e] / (T * K) * P
    return E * loss


def sequence_load_balancing_loss(score_rows: list[list[float]], ids: list[list[int]], E: int,
                                 seq_len: int, score_func: str = "softmax") -> float:
    """The same loss inside each sequence of seq_len tokens, averaged over sequences."""
    T = len(score_rows)
    losses = [load_balancing_loss(score_rows[b:b + seq_len], ids[b:b + seq_len], E, score_func)
              for b in range(0, T, seq_len)]
    return sum(losses) / len(losses)


def z_loss(logits: torch.Tensor) -> float:
    rows = _rows(logits)
    return sum(logsumexp(r) ** 2 for r in rows) / len(rows)


def update_expert_bias(bias: list[float], load: list[float], rate: float) -> list[float]:
    """b_e += rate * sign(mean_load - load_e)."""
    mean = sum(load) / len(load)
    return [b + rate * ((mean > v) - (mean < v)) for b, v in zip(bias, load)]


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One token: x [D], w_gate_up [D, 2F], w_down [F, D] -> [D], in float64."""
    F = w_down.shape[0]
    h = x.double() @ w_gate_up.double()
    gate, up = h[:F], h[F:]
    return (gate * torch.sigmoid(gate) * up) @ w_down.double()


def moe(x: torch.Tensor, slot_to_row: list[list[int]], ids: list[list[int]],
        weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The MoE output token by token: y[t] = sum over kept slots of w * expert_e(x[t])."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    weights = weights.detach()
    for t in range(x.shape[0]):
        for j, row in enumerate(slot_to_row[t]):
            if row >= 0:
                e = ids[t][j]
                y[t] += float(weights[t, j]) * swiglu(x[t], w_gate_up[e], w_down[e])
    return y
