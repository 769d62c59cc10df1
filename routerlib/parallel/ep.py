"""Expert parallelism: an MoE layer whose E experts are sharded over the ranks of a process group.

Each rank routes its own tokens (the router is replicated), then for every token and every rank
holding at least one of its kept experts sends the token's row ONCE (deduplication), with the
ids of that rank's experts among the token's K and their combine weights. The receiving rank
expands each row to its local experts, runs them, and sends back one row per received row: the
weighted sum over the experts it holds (fp32 inside, x's dtype on the wire). The home rank adds
the partial sums in fp32. Per forward pass:

    counts   one all_to_all_single of int64 [W, chunks, 2] (rows, slots per rank and chunk)
    sync     ONE host sync: the split sizes and receive-buffer sizes come from those counts
    dispatch one all_to_all_single of uint8 rows per chunk (see wire.py for a row's bytes)
    experts  routerlib's SwiGLUExperts over a local RoutingPlan: the fused Triton experts
             (gather, GEMMs and weighted K-sum in the kernels) or dispatch / grouped GEMM /
             combine, as MoEConfig.expert_path picks for MoELayer
    combine  one all_to_all_single back per chunk; the backward of each is its reverse

Overlap: the shared expert runs while the first chunk's dispatch is in flight; with chunks > 1
the dispatch of chunk i+1 and the combine of chunk i are in flight while chunk i's experts run
(async_op=True handles). The backward runs its all-to-alls synchronously, in the same order on
every rank (the autograd graph has the same shape everywhere).

Host syncs that remain: the split sizes (all_to_all_single takes host lists; the receive
buffers are sized from them), and the expert loop path's segment bounds where torch._grouped_mm
cannot run (fp32, or shapes it does not align): SwiGLUExperts.forward_loop reads its offsets.

Capacity (capacity_factor) is applied by the router on the home rank over that rank's tokens,
exactly as a single-process MoELayer applied to those tokens; dropped slots are not sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from routerlib import ops
from routerlib.config import MoEConfig
from routerlib.layer import MoELayer, SwiGLUExperts, swiglu
from routerlib.parallel import wire
from routerlib.parallel.wire import Payload
from routerlib.router import Router
from routerlib.types import RouterOutput, RoutingPlan


@dataclass(frozen=True)
class EPConfig:
    """payload: "native" (x's dtype, e.g. bf16), "fp8" (e4m3) or "int8" rows with one fp32 scale
    a row (straight-through in the backward). num_chunks: token chunks of the pipeline (1 = no
    chunking: the shared expert is still overlapped with the dispatch)."""

    payload: Payload = "native"
    num_chunks: int = 1

    def __post_init__(self) -> None:
        if self.payload not in wire.PAYLOADS:
            raise ValueError(f"EPConfig.payload={self.payload!r}: must be one of {wire.PAYLOADS}")
        if not isinstance(self.num_chunks, int) or self.num_chunks < 1:
            raise ValueError(f"EPConfig.num_chunks={self.num_chunks!r}: must be an int >= 1")


def default_placement(num_experts: int, world: int) -> list[int]:
    """Contiguous blocks: expert e on rank e // (E / W)."""
    check_ep_size(num_experts, world)
    per = num_experts // world
    return [e // per for e in range(num_experts)]


def check_ep_size(num_experts: int, world: int) -> None:
    if world < 1 or num_experts % world:
        raise ValueError(f"EP size {world} does not divide num_experts={num_experts}: choose an "
                         f"EP group whose size divides E (e.g. one of "
                         f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0][:8]})")


def check_placement(placement: Sequence[int], num_experts: int, world: int) -> list[int]:
    """placement[e] = rank holding expert e; every rank holds E / W experts."""
    check_ep_size(num_experts, world)
    p = [int(r) for r in placement]
    if len(p) != num_experts:
        raise ValueError(f"placement has {len(p)} entries, expected one rank per expert "
                         f"(num_experts={num_experts})")
    bad = sorted({r for r in p if not 0 <= r < world})
    if bad:
        raise ValueError(f"placement names ranks {bad} but the EP group has {world} ranks "
                         f"(0..{world - 1}): the world size does not match the placement")
    per = num_experts // world
    load = [p.count(r) for r in range(world)]
    if any(n != per for n in load):
        raise ValueError(f"placement puts {load} experts on ranks 0..{world - 1}: every rank "
                         f"must hold num_experts / world = {per}")
    return p


def resolve_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, rank in group, group size); a clear error when torch.distributed is not ready."""
    if not dist.is_available():
        raise ValueError("expert parallelism needs torch.distributed, which this torch build "
                         "lacks")
    if not dist.is_initialized():
        raise ValueError("no process group: call torch.distributed.init_process_group (e.g. "
                         "under torchrun) before building an EP layer, or pass group=...")
    return group, dist.get_rank(group), dist.get_world_size(group)


def config_digest(*parts: object) -> int:
    """A 63-bit hash of the configuration's repr (same on every rank when the configs agree)."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def check_same_config(digest: int, group: dist.ProcessGroup | None, device: torch.device
                      ) -> None:
    """One all_gather of an int64: every rank raises the same ValueError when any differs."""
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    seen = [int(t) for t in every]
    if len(set(seen)) > 1:
        groups: dict[int, list[int]] = {}
        for r, d in enumerate(seen):
            groups.setdefault(d, []).append(r)
        raise ValueError(f"mismatched EP configurations across ranks: ranks "
                         f"{sorted(groups.values())} hold different (MoEConfig, EPConfig, "
                         "placement, dtype); build the layer with the same arguments everywhere")


def local_plan(ids: torch.Tensor, num_local: int, num_slots: int) -> RoutingPlan:
    """The plan of received rows over this rank's experts (dropless, no padding).

    ids: [M, S] local expert of each slot, -1 where the slot's expert lives on another rank.
    num_slots: the number of ids >= 0 (known on the host from the counts exchange): R rows.
    """
    M, S = ids.shape
    flat = ids.reshape(-1).long()  # [M*S]
    key = torch.where(flat >= 0, flat, num_local)  # invalid slots sort last
    order = torch.sort(key, stable=True).indices  # [M*S] slots, expert-major
    ones = torch.ones_like(key)
    counts = key.new_zeros(num_local + 1).index_add_(0, key, ones)[:num_local]  # [E_l], no sync
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [E_l+1]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(M * S, device=ids.device)
    slot_to_row = torch.where(flat >= 0, pos, -1).view(M, S)  # [M, S]
    row_to_slot = order[:num_slots]  # [R]: valid slots come first, in row order
    return RoutingPlan(expert_counts=counts.int(), kept_counts=counts.int(),
                       expert_offsets=offsets.int(), slot_to_row=slot_to_row.int(),
                       row_to_slot=row_to_slot.int(), capacity=None, num_rows=num_slots)


@dataclass
class WireStats:
    """Host-side counts of the last forward pass (from the counts already on the host).

    rows_to[r]:  token rows sent to rank r (after deduplication)
    slots_to[r]: kept token-slots whose expert lives on rank r (K copies without dedup)
    dispatch_bytes_to[r], combine_bytes_to[r]: bytes sent to rank r in each direction (the
                 sizes of the buffers handed to all_to_all_single)
    baseline_bytes_to[r]: slots_to[r] rows of D in bf16: an all-to-all that sends K copies
    """

    rank: int
    rows_to: list[int] = field(default_factory=list)
    slots_to: list[int] = field(default_factory=list)
    dispatch_bytes_to: list[int] = field(default_factory=list)
    combine_bytes_to: list[int] = field(default_factory=list)
    baseline_bytes_to: list[int] = field(default_factory=list)

    def add(self, name: str, per_rank: list[int]) -> None:
        acc = getattr(self, name)
        acc[:] = [a + b for a, b in zip(acc, per_rank)] if acc else list(per_rank)

    def remote(self, per_rank: list[int]) -> int:
        """Bytes (or rows) that leave this rank: every destination but itself."""
        return sum(v for r, v in enumerate(per_rank) if r != self.rank)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the gradient of every rank's copy of the sum reaches every input (the
    backward sums the gradients over the group). Data parallelism then averages the ranks'
    gradients, which gives the gradient of the one global loss."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


@dataclass
class _Chunk:
    tokens: torch.Tensor  # [N] int64 home token of each sent row (rank-major, token order)
    x: torch.Tensor  # [N, D] rows to send
    ids: torch.Tensor  # [N, S] int16 local expert on the destination, -1 elsewhere
    w: torch.Tensor  # [N, S] fp32 combine weights, 0 where ids == -1
    exchange: wire.Exchange
    recv_slots: int  # expert slots in the rows this rank receives


class EPMoELayer(nn.Module):
    """MoELayer with its experts sharded over `group`: x [T, D] (or [B, S, D]) of this rank ->
    (y, RouterOutput). Parameters as in MoELayer (router.gate, experts.w_gate_up / w_down,
    shared), except that experts hold only this rank's E / W experts, in increasing expert id.

    placement: [E] rank of each expert (default contiguous blocks); every rank holds E / W.
    balance_group: the data-parallel group over which the batch balance loss is computed
    (its statistics summed over the group); None keeps the router's local loss.
    Replicated parameters (gate, shared expert) are broadcast from the group's first rank.
    """

    def __init__(self, cfg: MoEConfig, ep: EPConfig | None = None,
                 group: dist.ProcessGroup | None = None, placement: Sequence[int] | None = None,
                 balance_group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.ep = cfg, ep or EPConfig()
        self.group, self.rank, self.world = resolve_group(group)
        E = cfg.router.num_experts
        if placement is None:
            placement = default_placement(E, self.world)
        self.placement = check_placement(placement, E, self.world)
        self.local_ids = [e for e in range(E) if self.placement[e] == self.rank]
        slot_in_rank = [0] * E
        for r in range(self.world):
            for i, e in enumerate(e for e in range(E) if self.placement[e] == r):
                slot_in_rank[e] = i
        self.balance_group = balance_group
        self.router = Router(cfg.hidden_size, cfg.router, backend=cfg.backend, device=device,
                             dtype=dtype)
        self.experts = SwiGLUExperts(len(self.local_ids), cfg.hidden_size, cfg.ffn_size, device,
                                     dtype)
        self.shared = None
        if cfg.shared_expert_size:
            self.shared = SwiGLUExperts(1, cfg.hidden_size, cfg.shared_expert_size, device, dtype)
        dev = self.router.gate.weight.device
        self.register_buffer("owner", torch.tensor(self.placement, device=dev), persistent=False)
        self.register_buffer("local_index", torch.tensor(slot_in_rank, device=dev),
                             persistent=False)
        digest = config_digest(cfg, self.ep, self.placement, str(self.router.gate.weight.dtype),
                               self.world)
        check_same_config(digest, group, dev)
        self._broadcast_replicated()
        self.last_stats: WireStats | None = None

    # ---- construction from a single-process layer ---------------------------------------------

    @classmethod
    def from_layer(cls, layer: MoELayer, ep: EPConfig | None = None,
                   group: dist.ProcessGroup | None = None,
                   placement: Sequence[int] | None = None,
                   balance_group: dist.ProcessGroup | None = None) -> EPMoELayer:
        """An EP layer holding this rank's slices of `layer`'s experts (same router, shared)."""
        w = layer.router.gate.weight
        out = cls(layer.cfg, ep, group, placement, balance_group, device=w.device, dtype=w.dtype)
        out.load_full_state_dict(layer.state_dict())
        return out

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a single-process MoELayer's state_dict, keeping this rank's experts."""
        idx = torch.tensor(self.local_ids, dtype=torch.long)
        mine = {k: (v[idx.to(v.device)] if k.startswith("experts.") else v)
                for k, v in state.items()}
        self.load_state_dict(mine)

    @torch.no_grad()
    def _broadcast_replicated(self) -> None:
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for t in [*self.router.parameters(), *self.router.buffers()]:
            dist.broadcast(t, src=src, group=self.group)
        if self.shared is not None:
            for t in self.shared.parameters():
                dist.broadcast(t, src=src, group=self.group)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        seq_len = shape[1] if x.dim() == 3 else None
        x2 = x.reshape(-1, shape[-1])  # [T, D]
        out = self.router(x2, seq_len=seq_len, generator=generator)
        if self.balance_group is not None:
            out.aux_loss = self._global_aux(out, x2.shape[0])
        chunks = self.plan_chunks(x2, out)
        y = x2.new_zeros(x2.shape, dtype=torch.float32)  # [T, D] fp32 accumulator

        payload = self.ep.payload
        stats = self.last_stats
        pend = wire.start_dispatch(chunks[0].x, chunks[0].ids, chunks[0].w, payload,
                                   chunks[0].exchange)
        stats.add("dispatch_bytes_to", pend.sent_bytes)
        shared = None
        if self.shared is not None:  # runs while the first dispatch is in flight
            shared = swiglu(x2, self.shared.w_gate_up[0], self.shared.w_down[0])
        returning = []
        for i, c in enumerate(chunks):
            xr, idr, wr = wire.finish_dispatch(pend, c.x, c.w, payload)  # [M, D], [M, S] x2
            if i + 1 < len(chunks):
                n = chunks[i + 1]
                pend = wire.start_dispatch(n.x, n.ids, n.w, payload, n.exchange)
                stats.add("dispatch_bytes_to", pend.sent_bytes)
            partial = self._run_local_experts(xr, idr, wr, c.recv_slots)  # [M, D]
            back = wire.start_combine(partial, c.exchange)
            stats.add("combine_bytes_to", back.sent_bytes)
            returning.append((back, partial))
        for c, (p, partial) in zip(chunks, returning):
            y = y.index_add(0, c.tokens, wire.finish_combine(p, partial).float())
        y = y.to(x.dtype)
        if shared is not None:
            y = y + shared
        return y.view(shape), out

    def plan_chunks(self, x2: torch.Tensor, out: RouterOutput) -> list[_Chunk]:
        """Deduplicated send lists of every chunk, after the counts exchange (the host sync);
        sets last_stats. A collective: every rank of the group calls it."""
        T, S = out.topk_ids.shape
        W, C = self.world, self.ep.num_chunks
        ids = out.topk_ids.long()  # [T, S]
        kept = out.plan.slot_to_row >= 0  # [T, S]; capacity drops (and expert choice's unpicked)
        dest = torch.where(kept, self.owner[ids], W)  # [T, S] rank of each kept slot, W: none
        local = self.local_index[ids]  # [T, S] the expert's index on its rank
        need = torch.zeros(T, W + 1, dtype=torch.bool, device=x2.device)
        need = need.scatter_(1, dest, True)[:, :W]  # [T, W] token t goes to rank r (once)
        bounds = [T * c // C for c in range(C + 1)]
        per = []
        for c in range(C):
            lo, hi = bounds[c], bounds[c + 1]
            slots = torch.zeros(W + 1, dtype=torch.int64, device=x2.device)
            slots = slots.index_add(0, dest[lo:hi].reshape(-1),
                                    torch.ones_like(dest[lo:hi].reshape(-1)))[:W]
            per.append(torch.stack([need[lo:hi].sum(0), slots], dim=1))  # [W, 2]
        send = torch.stack(per, dim=1).contiguous()  # [W, C, 2] int64
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        host_send, host_recv = torch.stack([send, recv]).tolist()  # the one host sync

        self._record_stats(x2, host_send)
        chunks = []
        for c in range(C):
            lo, hi = bounds[c], bounds[c + 1]
            Tc = hi - lo
            n_send = sum(host_send[r][c][0] for r in range(W))
            missing = (~need[lo:hi]).t().reshape(-1).to(torch.int32)  # [W*Tc] 0 where sent
            flat = torch.sort(missing, stable=True).indices[:n_send]  # rank-major, token order
            tokens = lo + flat % max(Tc, 1)  # [N]
            to = flat // max(Tc, 1)  # [N] destination rank
            mine = dest[tokens] == to[:, None]  # [N, S] the slots that rank holds
            chunks.append(_Chunk(
                tokens=tokens,
                x=x2[tokens],
                ids=torch.where(mine, local[tokens], -1).to(torch.int16),
                w=torch.where(mine, out.topk_weights[tokens], 0.0),
                exchange=wire.Exchange([host_send[r][c][0] for r in range(W)],
                                       [host_recv[r][c][0] for r in range(W)], self.group),
                recv_slots=sum(host_recv[r][c][1] for r in range(W))))
        return chunks

    def _run_local_experts(self, xr: torch.Tensor, idr: torch.Tensor, wr: torch.Tensor,
                           num_slots: int) -> torch.Tensor:
        """Received rows [M, D] -> [M, D]: each row's weighted sum over this rank's experts."""
        plan = local_plan(idr, len(self.local_ids), num_slots)
        # the reference handles a rank that received nothing (M is a host int: no sync)
        backend = self.cfg.backend if xr.shape[0] else "torch"
        path = self.cfg.expert_path  # as MoELayer: auto = fused with triton, else batched
        if path == "auto":
            path = "fused" if backend == "triton" else "batched"
        if path == "fused" and backend == "triton":
            return self.experts.forward_fused(xr, plan, wr)  # [M, D] gather, GEMMs, K-sum
        rows = ops.dispatch(xr, plan, backend)  # [R, D]
        if path == "loop":
            eo = self.experts.forward_loop(rows, plan)
        else:
            eo = self.experts.forward_batched(rows, plan)
        return ops.combine(eo, plan, wr, backend)  # fp32 accumulation, x's dtype out

    def _global_aux(self, out: RouterOutput, T: int) -> torch.Tensor:
        """The router's aux loss with its batch balance term over balance_group's tokens."""
        r = self.cfg.router
        if r.aux_loss_coef == 0 or r.routing != "token_choice":
            return out.aux_loss
        from routerlib.reference.losses import load_balancing_loss_from_stats

        E, K = r.num_experts, r.top_k
        prob, load = out.selection.prob_sum, out.plan.expert_counts.float()
        local = r.aux_loss_coef * load_balancing_loss_from_stats(prob, load, T, K)
        stats = torch.cat([prob, load, prob.new_full((1,), float(T))])  # [2E+1]
        g = _AllReduceSum.apply(stats, self.balance_group)  # sums; backward: the same
        tg = g[2 * E].clamp(min=1)
        glob = r.aux_loss_coef * E * ((g[E:2 * E].detach() / (tg * K)) * (g[:E] / tg)).sum()
        return out.aux_loss - local + glob

    def _record_stats(self, x2: torch.Tensor, host_send: list[list[list[int]]]) -> None:
        W, C, D = self.world, self.ep.num_chunks, x2.shape[1]
        rows = [sum(host_send[r][c][0] for c in range(C)) for r in range(W)]
        slots = [sum(host_send[r][c][1] for c in range(C)) for r in range(W)]
        self.last_stats = WireStats(rank=self.rank, rows_to=rows, slots_to=slots,
                                    baseline_bytes_to=[n * D * 2 for n in slots])
