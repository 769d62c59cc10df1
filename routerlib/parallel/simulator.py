"""A CPU simulator of expert parallelism: bytes per rank and link, load imbalance, all-to-all and
layer time for clusters we do not have, and a placement search that minimises the predicted time.

Input: routing (top-K expert ids [T, K] of a trace, or of `generate_routing`), a placement
([E] -> rank), a Topology. Tokens live on ranks in contiguous blocks (token t on rank t*W // T),
as data parallelism hands them out. The bytes follow EPMoELayer exactly (wire.row_bytes): one
dispatch row per (token, destination rank) with deduplication, else one per kept slot; one
combine row back per dispatch row, in the activations' dtype.

Time model of one all-to-all (the NCCL bus-bandwidth convention: bytes that leave a GPU over its
bus bandwidth): t = latency + max over ranks of max(NVLink bytes / nvlink_busbw, network bytes /
net_bw), each rank's send and receive counted, the slower of both. Calibrated on 4 H200s of one
host (DESIGN.md): NCCL all_to_all_single reached 282 GB/s bus bandwidth with 2 GPUs, 304 with 4;
a 128-token all-to-all (D=7168 bf16) took 80-108 us, which sets the latency (the midpoint minus
the transfer). Beyond 4 GPUs of a node and across nodes the bandwidths are parameters (the
defaults: 304 GB/s NVLink, flat; 50 GB/s a GPU over the network: a 400 Gb/s NIC a GPU), not
measurements. Expert time: the larger of the rank's GEMM FLOPs at `gemm_tflops` and reading its
experts' weights once at `hbm_gbps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routerlib.config import RouterConfig
from routerlib.parallel.wire import Payload, row_bytes

# measured on 4 H200s of one host (NCCL all_to_all_single): GPUs -> bus bandwidth GB/s
H200_A2A_BUSBW = {2: 282.0, 4: 304.0}
H200_A2A_128_TOKENS_US = (80.0, 108.0)  # 128 tokens of D=7168 bf16, 4 GPUs


@dataclass(frozen=True)
class Topology:
    """gpus_per_node GPUs share NVLink; nodes talk over the network, one NIC a GPU."""

    gpus_per_node: int = 8
    nvlink_busbw_gbps: float = 304.0
    net_gbps: float = 50.0
    nvlink_latency_us: float = 89.5
    net_latency_us: float = 100.0
    gemm_tflops: float = 491.0  # torch._grouped_mm bf16, Qwen3-30B shape, H200 (DESIGN.md)
    hbm_gbps: float = 4249.0  # H200 copy bandwidth (DESIGN.md)

    def busbw(self, world: int) -> float:
        """NVLink all-to-all bus bandwidth with `world` GPUs of one node (the measured 282 GB/s
        at 2 GPUs; nvlink_busbw_gbps from 4 on)."""
        return H200_A2A_BUSBW[2] if world <= 2 else self.nvlink_busbw_gbps


def calibrated_h200(gpus_per_node: int = 8, net_gbps: float = 50.0) -> Topology:
    """H200 NVLink figures from the measurements above; the latency fitted so that the 128-token
    all-to-all on 4 GPUs lands on the middle of its measured range."""
    lo, hi = H200_A2A_128_TOKENS_US
    remote = 128 * 7168 * 2 * 3 / 4  # bytes leaving each of 4 GPUs
    transfer_us = remote / (H200_A2A_BUSBW[4] * 1e3)
    return Topology(gpus_per_node=gpus_per_node, nvlink_busbw_gbps=H200_A2A_BUSBW[4],
                    net_gbps=net_gbps, nvlink_latency_us=(lo + hi) / 2 - transfer_us)


@dataclass(frozen=True)
class Shape:
    """A model's MoE layer as the router sees it."""

    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    score_func: str = "softmax"
    n_groups: int = 1
    topk_groups: int = 1

    def router(self) -> RouterConfig:
        return RouterConfig(num_experts=self.experts, top_k=self.top_k,
                            score_func=self.score_func, n_groups=self.n_groups,
                            topk_groups=self.topk_groups,
                            group_score="top2_sum" if self.n_groups > 1 else "max")


SHAPES = {
    "qwen3-30b-a3b": Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
    "deepseek-v3": Shape("deepseek-v3", 7168, 2048, 256, 8, "sigmoid", 8, 4),
    "kimi-k2": Shape("kimi-k2", 7168, 2048, 384, 8, "sigmoid"),
}


def generate_routing(shape: Shape, tokens: int, skew: float = 0.0, seed: int = 0
                     ) -> torch.Tensor:
    """[T, K] int32 expert ids from routerlib's reference router on random logits, plus a
    popularity bias skew * log-Zipf (skew 0: uniform; 1: the hottest expert ~e times as likely
    as the median), over a random expert order."""
    from routerlib.reference import select

    g = torch.Generator().manual_seed(seed)
    E = shape.experts
    logits = torch.randn(tokens, E, generator=g)
    if skew:
        zipf = -torch.log(torch.arange(1, E + 1, dtype=torch.float32))
        pop = (zipf - zipf.median())[torch.randperm(E, generator=g)]
        logits = logits + skew * pop
    return select(logits, shape.router()).topk_ids


def home_ranks(tokens: int, world: int) -> torch.Tensor:
    """[T] rank of each token: contiguous blocks."""
    return torch.arange(tokens) * world // max(tokens, 1)


def row_matrix(topk_ids: torch.Tensor, placement: list[int] | torch.Tensor, world: int,
               dedup: bool = True, home: torch.Tensor | None = None,
               kept: torch.Tensor | None = None) -> torch.Tensor:
    """[W, W] int64 dispatch rows from rank i (home) to rank j: one per (token, rank) with
    dedup, else one per kept slot. kept: [T, K] bool (capacity drops), default all."""
    T = topk_ids.shape[0]
    owner = torch.as_tensor(placement)[topk_ids.long()]  # [T, K]
    if kept is not None:
        owner = torch.where(kept, owner, world)
    home = home_ranks(T, world) if home is None else home
    hits = torch.zeros(T, world + 1, dtype=torch.int64)
    if dedup:
        hits.scatter_(1, owner, 1)
    else:
        hits.scatter_add_(1, owner, torch.ones_like(owner))
    m = torch.zeros(world, world + 1, dtype=torch.int64).index_add_(0, home, hits)
    return m[:, :world]


@dataclass
class Prediction:
    """What one MoE layer costs, as predicted (bytes in B, times in us)."""

    world: int
    dispatch_bytes: torch.Tensor  # [W, W] i -> j
    combine_bytes: torch.Tensor  # [W, W] i -> j (j sends back to i: the transpose of rows)
    baseline_bytes: torch.Tensor  # [W, W] a bf16 all-to-all sending K copies
    expert_rows: torch.Tensor  # [W] expert slots each rank computes
    imbalance: float  # max / mean of expert_rows
    nvlink_bytes: torch.Tensor  # [W] dispatch + combine bytes each rank sends over NVLink
    net_bytes: torch.Tensor  # [W] ... over the network
    t_dispatch_us: float
    t_combine_us: float
    t_experts_us: float
    t_layer_us: float  # no overlap
    t_layer_overlap_us: float  # chunked pipeline

    def wire_bytes_per_token(self, tokens: int) -> dict[str, float]:
        """Remote bytes (leaving a GPU) per token, both directions, and the K-copy baseline."""
        off = ~torch.eye(self.world, dtype=torch.bool)
        d = self.dispatch_bytes[off].sum().item() / tokens
        c = self.combine_bytes[off].sum().item() / tokens
        b = self.baseline_bytes[off].sum().item() / tokens
        return {"dispatch": d, "combine": c, "baseline_dispatch": b,
                "dispatch_ratio": d / b if b else 0.0,
                "round_trip_ratio": (d + c) / (2 * b) if b else 0.0}


def all_to_all_us(bytes_ij: torch.Tensor, topo: Topology) -> float:
    """Predicted time of one all-to-all whose rank i sends bytes_ij[i, j] to rank j."""
    W = bytes_ij.shape[0]
    node = torch.arange(W) // topo.gpus_per_node
    same = node[:, None] == node[None, :]
    off = ~torch.eye(W, dtype=torch.bool)
    b = bytes_ij.double()
    nv = b * (same & off)
    net = b * ~same
    bw = topo.busbw(min(W, topo.gpus_per_node)) * 1e3  # bytes per us
    t_nv = torch.maximum(nv.sum(1), nv.sum(0)) / bw
    t_net = torch.maximum(net.sum(1), net.sum(0)) / (topo.net_gbps * 1e3)
    t = torch.maximum(t_nv, t_net).max().item()
    lat = topo.net_latency_us if bool((~same).any()) else topo.nvlink_latency_us
    return (lat if W > 1 else 0.0) + t


def predict(topk_ids: torch.Tensor, placement: list[int] | torch.Tensor, world: int,
            shape: Shape, topo: Topology, payload: Payload = "native", dedup: bool = True,
            elem_size: int = 2, chunks: int = 4, kept: torch.Tensor | None = None,
            token_scale: float = 1.0) -> Prediction:
    """Bytes, load and times of one layer over the T tokens of topk_ids spread over `world`.
    token_scale: the routing is a sample standing for token_scale times as many tokens (the
    same statistics): rows and bytes are multiplied by it."""
    D, K, F = shape.hidden, topk_ids.shape[1], shape.ffn
    rows = row_matrix(topk_ids, placement, world, dedup, kept=kept).double() * token_scale
    slots = row_matrix(topk_ids, placement, world, dedup=False, kept=kept).double() * token_scale
    rb = row_bytes(D, K, elem_size, payload) if dedup else row_bytes(D, 1, elem_size, payload)
    disp = rows * rb
    comb = rows * D * elem_size
    base = slots * D * 2
    expert_rows = slots.sum(0)  # [W]
    mean = expert_rows.double().mean().item()
    imb = expert_rows.max().item() / mean if mean else 1.0
    t_d = all_to_all_us(disp, topo)
    t_c = all_to_all_us(comb.t(), topo)
    per_rank = shape.experts // world
    flops = 6.0 * D * F * expert_rows.double()  # SwiGLU: 3 GEMMs of 2*D*F a row
    t_flops = (flops / (topo.gemm_tflops * 1e6)).max().item()
    t_weights = per_rank * 3 * D * F * elem_size / (topo.hbm_gbps * 1e3)
    t_e = max(t_flops, t_weights)
    # chunked pipeline: the first dispatch and the last combine stay exposed; in between each
    # chunk costs the larger of its experts and its two all-to-alls
    lat = topo.net_latency_us if world > topo.gpus_per_node else topo.nvlink_latency_us
    lat = lat if world > 1 else 0.0
    comm_chunk = (t_d + t_c - 2 * lat) / chunks + 2 * lat
    t_overlap = (t_d - lat) / chunks + lat + chunks * max(t_e / chunks, comm_chunk) \
        + (t_c - lat) / chunks + lat - comm_chunk
    node = torch.arange(world) // topo.gpus_per_node
    same = node[:, None] == node[None, :]
    off = ~torch.eye(world, dtype=torch.bool)
    both = disp + comb.t()
    return Prediction(
        world=world, dispatch_bytes=disp, combine_bytes=comb.t(), baseline_bytes=base,
        expert_rows=expert_rows, imbalance=imb,
        nvlink_bytes=(both * (same & off)).sum(1), net_bytes=(both * ~same).sum(1),
        t_dispatch_us=t_d, t_combine_us=t_c, t_experts_us=t_e, t_layer_us=t_d + t_e + t_c,
        t_layer_overlap_us=min(t_overlap, t_d + t_e + t_c))


# ---- placement search -------------------------------------------------------------------------

def lpt_placement(load: torch.Tensor, world: int) -> list[int]:
    """Greedy longest-processing-time: the hottest expert first, each to the least loaded rank
    that still has room (every rank holds E / W experts)."""
    E = load.shape[0]
    per = E // world
    placement = [0] * E
    rank_load = [0.0] * world
    room = [per] * world
    for e in torch.argsort(load.double(), descending=True, stable=True).tolist():
        r = min((r for r in range(world) if room[r]), key=lambda r: (rank_load[r], r))
        placement[e] = r
        rank_load[r] += float(load[e])
        room[r] -= 1
    return placement


def search_placement(topk_ids: torch.Tensor, world: int, shape: Shape, topo: Topology,
                     payload: Payload = "native", swaps: int = 60, start: list[int] | None = None
                     ) -> tuple[list[int], list[float]]:
    """LPT of the expert loads, then local swaps (the busiest rank's experts against the other
    ranks' coldest ones) while the predicted layer time drops. -> (placement, predicted times:
    the start placement's, LPT's, then after each accepted swap)."""
    E = shape.experts
    load = torch.bincount(topk_ids.reshape(-1).long(), minlength=E)

    def cost(p: list[int]) -> float:
        return predict(topk_ids, p, world, shape, topo, payload).t_layer_us

    base = start or [e * world // E for e in range(E)]
    best = lpt_placement(load, world)
    history = [cost(base), cost(best)]
    if history[0] < history[1]:
        best = list(base)
    best_t = min(history)
    for _ in range(swaps):
        rows = predict(topk_ids, best, world, shape, topo, payload).expert_rows
        hot = int(rows.argmax())
        mine = sorted((e for e in range(E) if best[e] == hot), key=lambda e: -int(load[e]))[:4]
        others = sorted((e for e in range(E) if best[e] != hot), key=lambda e: int(load[e]))[:8]
        improved = False
        for a in mine:
            for b in others:
                cand = list(best)
                cand[a], cand[b] = cand[b], cand[a]
                t = cost(cand)
                if t < best_t - 1e-9:
                    best, best_t, improved = cand, t, True
                    break
            if improved:
                break
        if not improved:
            break
        history.append(best_t)
    return best, history


def plan_table(shape: Shape, worlds: list[int], topo: Topology, tokens_per_rank: int = 4096,
               skew: float = 0.0, seed: int = 0, sample: int = 4096) -> list[dict]:
    """Predicted rows for each EP size: bytes per token, imbalance and times, bf16 and fp8,
    with and without dedup. tokens_per_rank: weak scaling (each rank keeps its batch); the
    routing is a sample of `sample` tokens scaled up to the batch."""
    out = []
    ids = generate_routing(shape, sample, skew, seed)  # a sample of every batch below
    for W in worlds:
        if shape.experts % W:
            continue
        T = tokens_per_rank * W
        placement = [e * W // shape.experts for e in range(shape.experts)]
        for payload in ("native", "fp8"):
            for dedup in (False, True):
                p = predict(ids, placement, W, shape, topo, payload, dedup,
                            token_scale=T / ids.shape[0])
                wb = p.wire_bytes_per_token(T)
                out.append({"shape": shape.name, "world": W, "payload": payload,
                            "dedup": dedup, "tokens": T, **wb, "imbalance": p.imbalance,
                            "t_dispatch_us": p.t_dispatch_us, "t_combine_us": p.t_combine_us,
                            "t_experts_us": p.t_experts_us, "t_layer_us": p.t_layer_us,
                            "t_layer_overlap_us": p.t_layer_overlap_us})
    return out
