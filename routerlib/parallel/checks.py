"""Rank-side checks of expert parallelism against the single-process MoELayer (the contract).

Each rank builds the same reference MoELayer and the same inputs for every rank (seeded), runs
the reference on every rank's tokens, and compares its own EP outputs and gradients with it:
y and x.grad on its tokens, its experts' weight gradients with the reference's slices, and the
replicated parameters' gradients summed over the ranks. The rows each rank should send are
counted here from the reference routing, independently of the EP code, so that the tests can
check the deduplication and the bytes on the wire exactly. Used by tests/test_parallel.py (gloo
ranks on CPUs), notebook 05 and scripts/ep_gpu.py (NCCL).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from routerlib.config import MoEConfig
from routerlib.layer import MoELayer
from routerlib.parallel.ep import EPConfig, EPMoELayer, check_placement, default_placement


@dataclass(frozen=True)
class Case:
    """One configuration. tokens: T of each rank (uneven, 0 allowed). hot_rank: bias the
    selection (expert_bias, needs cfg.router.expert_bias) so that every token picks experts of
    that rank first. placement: None = contiguous blocks."""

    name: str
    cfg: MoEConfig
    tokens: tuple[int, ...]
    ep: EPConfig = field(default_factory=EPConfig)
    placement: tuple[int, ...] | None = None
    dtype: str = "float32"
    hot_rank: int | None = None


def reference_layer(case: Case, world: int, device: torch.device | str) -> MoELayer:
    dtype = getattr(torch, case.dtype)
    torch.manual_seed(1234)
    ref = MoELayer(case.cfg, device=device, dtype=dtype)
    if case.hot_rank is not None:
        E = case.cfg.router.num_experts
        placement = case.placement or default_placement(E, world)
        bias = torch.tensor([50.0 if placement[e] == case.hot_rank else 0.0 for e in range(E)])
        ref.router.expert_bias.copy_(bias)
    return ref


def inputs(case: Case, world: int, device: torch.device | str
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(x, upstream gradient) of every rank: randn, seeded the same everywhere."""
    if len(case.tokens) != world:
        raise ValueError(f"case {case.name}: {len(case.tokens)} token counts for {world} ranks")
    g = torch.Generator().manual_seed(99)
    dtype, D = getattr(torch, case.dtype), case.cfg.hidden_size
    xs = [torch.randn(t, D, generator=g).to(device, dtype) for t in case.tokens]
    gs = [torch.randn(t, D, generator=g).to(device, dtype) for t in case.tokens]
    return xs, gs


def expected_rows(ref_out, placement: list[int], world: int) -> tuple[list[int], list[int]]:
    """(rows, slots) this rank sends to each rank: a token goes once to every rank holding one
    of its kept experts; slots counts every kept (token, expert) pair (K copies)."""
    rows, slots = [0] * world, [0] * world
    kept = (ref_out.plan.slot_to_row >= 0).tolist()
    for ids, keep in zip(ref_out.topk_ids.tolist(), kept):
        ranks = [placement[e] for e, k in zip(ids, keep) if k]
        for r in set(ranks):
            rows[r] += 1
        for r in ranks:
            slots[r] += 1
    return rows, slots


def _max_err(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """Max |a - b|; a None gradient (a parameter no token reached) counts as zeros."""
    a = torch.zeros_like(b) if a is None else a
    if a.numel() == 0:
        return 0.0
    return (a.float() - b.float()).abs().max().item()


def _scale(t: torch.Tensor | None) -> float:
    return 1.0 if t is None or t.numel() == 0 else max(t.float().abs().max().item(), 1e-6)


def compare_with_reference(rank: int, world: int, cases: list[Case],
                           device: torch.device | str = "cpu", group=None) -> list[dict]:
    """Run every case on this rank; -> one dict a case: relative max errors of y, x.grad, the
    local expert gradients and the summed replicated gradients, and the wire counts."""
    results = []
    for case in cases:
        ref = reference_layer(case, world, device)
        xs, gs = inputs(case, world, device)
        y_ref, gx_ref, out_ref = [], [], None
        for r in range(world):
            x = xs[r].clone().requires_grad_(True)
            y, out = ref(x)
            (y.float() * gs[r].float()).sum().backward()
            y_ref.append(y.detach())
            gx_ref.append(x.grad)
            if r == rank:
                out_ref = out
        E = case.cfg.router.num_experts
        placement = list(case.placement) if case.placement else default_placement(E, world)
        check_placement(placement, E, world)

        ep = EPMoELayer.from_layer(ref, case.ep, group=group, placement=placement)
        x = xs[rank].clone().requires_grad_(True)
        y, _ = ep(x)
        (y.float() * gs[rank].float()).sum().backward()

        local = torch.tensor(ep.local_ids, device=device)
        rep = {"gate": (ep.router.gate.weight.grad, ref.router.gate.weight.grad)}
        if ep.shared is not None:
            rep["shared_up"] = (ep.shared.w_gate_up.grad, ref.shared.w_gate_up.grad)
            rep["shared_down"] = (ep.shared.w_down.grad, ref.shared.w_down.grad)
        err = {
            "y": _max_err(y, y_ref[rank]) / _scale(y_ref[rank]),
            "x_grad": _max_err(x.grad, gx_ref[rank]) / _scale(gx_ref[rank]),
            "w_gate_up_grad": _max_err(ep.experts.w_gate_up.grad,
                                       ref.experts.w_gate_up.grad[local])
            / _scale(ref.experts.w_gate_up.grad),
            "w_down_grad": _max_err(ep.experts.w_down.grad, ref.experts.w_down.grad[local])
            / _scale(ref.experts.w_down.grad),
        }
        for name, (mine, want) in rep.items():  # replicated: this rank's part of the sum
            total = mine.clone()
            dist.all_reduce(total, group=group)
            err[name + "_grad"] = _max_err(total, want) / _scale(want)
        rows, slots = expected_rows(out_ref, placement, world)
        s = ep.last_stats
        results.append({"case": case.name, "rank": rank, "errors": err,
                        "expected_rows_to": rows, "expected_slots_to": slots,
                        "rows_to": s.rows_to, "slots_to": s.slots_to,
                        "dispatch_bytes_to": s.dispatch_bytes_to,
                        "combine_bytes_to": s.combine_bytes_to,
                        "baseline_bytes_to": s.baseline_bytes_to,
                        "local_ids": ep.local_ids, "tokens": case.tokens[rank],
                        "topk_ids": out_ref.topk_ids.tolist(),  # lists: plain pickles
                        "kept": (out_ref.plan.slot_to_row >= 0).tolist()})
    return results


def tolerance(case: Case) -> float:
    """Relative max-error bound of a case: fp32 sums in another order; bf16/fp16 roundings of
    the partial sums on the wire; fp8/int8 payloads quantize the rows (~2^-4 / 2^-7 relative)."""
    base = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}[case.dtype]
    return max(base, {"native": 0.0, "int8": 3e-2, "fp8": 1.5e-1}[case.ep.payload])


def robustness_errors(rank: int, world: int, device: str = "cpu") -> dict[str, str]:
    """Build layers that must fail on every rank with a ValueError (and not hang): -> the
    message of each case (or 'no error')."""
    from routerlib.config import RouterConfig

    def msg(fn) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no error"

    r8 = RouterConfig(num_experts=4 * world, top_k=2)
    cfg = MoEConfig(hidden_size=8, ffn_size=4, router=r8)
    odd = MoEConfig(hidden_size=8, ffn_size=4, router=RouterConfig(num_experts=4 * world + 1,
                                                                   top_k=2))
    beyond = [e % (world + 1) for e in range(4 * world)]  # names rank `world`
    uneven = [0] * (4 * world)
    skew = MoEConfig(hidden_size=8, ffn_size=4 + rank % 2, router=r8)  # differs on odd ranks
    return {
        "ep_size": msg(lambda: EPMoELayer(odd, device=device)),
        "placement_world": msg(lambda: EPMoELayer(cfg, placement=beyond, device=device)),
        "placement_uneven": msg(lambda: EPMoELayer(cfg, placement=uneven, device=device)),
        "placement_length": msg(lambda: EPMoELayer(cfg, placement=[0] * 3, device=device)),
        "config_mismatch": msg(lambda: EPMoELayer(skew, device=device)),
        "chunks_mismatch": msg(lambda: EPMoELayer(cfg, EPConfig(num_chunks=1 + rank % 2),
                                                  device=device)),
    }




def global_balance_loss(rank: int, world: int, device: str = "cpu") -> dict[str, float]:
    """EPMoELayer(balance_group=WORLD): each rank's aux loss is the batch balance loss of all
    ranks' tokens (the reference layer on their concatenation), and the gate gradients of the
    ranks' losses, averaged over the ranks as data parallelism does, equal the reference's."""
    from routerlib.config import RouterConfig

    cfg = MoEConfig(hidden_size=16, ffn_size=8,
                    router=RouterConfig(num_experts=4 * world, top_k=2, aux_loss_coef=0.1))
    case = Case("aux", cfg, tuple(3 + 2 * r for r in range(world)))
    ref = reference_layer(case, world, device)
    xs, _ = inputs(case, world, device)
    _, out = ref(torch.cat(xs))
    out.aux_loss.backward()
    ep = EPMoELayer.from_layer(ref, balance_group=dist.group.WORLD)
    _, mine = ep(xs[rank])
    mine.aux_loss.backward()
    grad = ep.router.gate.weight.grad.clone()
    dist.all_reduce(grad)
    want = ref.router.gate.weight.grad
    return {"aux": mine.aux_loss.item(), "aux_ref": out.aux_loss.item(),
            "grad_err": _max_err(grad / world, want) / _scale(want)}


def suite(rank: int, world: int, cases: list[Case], device: str = "cpu") -> dict:
    """compare_with_reference, robustness_errors and global_balance_loss in one launch."""
    return {"cases": compare_with_reference(rank, world, cases, device),
            "errors": robustness_errors(rank, world, device),
            "balance": global_balance_loss(rank, world, device)}
