"""The global (data-parallel) balance loss: 2 ranks over gloo on CPU, each holding part of the
tokens, against the single-process loss of the concatenated tokens, value and gradients; the
Router option (RouterConfig.aux_loss_global) the same way.

The ranks are spawned processes on a free port with timeouts on every wait: a broken collective
fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.router import Router

SIZES = (7, 12)  # tokens of rank 0 and rank 1: unequal on purpose
E, K, D = 6, 2, 16
TIMEOUT_S = 120


def _inputs():
    """Every process draws the same full batch (logits, router tokens)."""
    g = torch.Generator().manual_seed(0)
    T = sum(SIZES)
    return torch.randn(T, E, generator=g), torch.randn(T, D, generator=g)


def _loss(logits: torch.Tensor, score_func: str, group_world: bool):
    """The balance loss of these logits: global over the ranks, or of these tokens alone."""
    cfg = RouterConfig(num_experts=E, top_k=K, score_func=score_func)
    sel = ref.select(logits, cfg)
    load = ref.expert_load(sel.topk_ids, E)
    if group_world:
        return ref.global_load_balancing_loss(sel.prob_sum, load, logits.shape[0], K)
    return ref.load_balancing_loss_from_stats(sel.prob_sum, load, logits.shape[0], K)


def _router(cfg: RouterConfig) -> Router:
    torch.manual_seed(1)
    return Router(D, cfg).train()


def _worker(rank: int, world: int, port: int, results) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        logits, x = _inputs()
        lo, hi = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
        out = {}
        for score_func in ("softmax", "sigmoid"):
            mine = logits[lo:hi].clone().requires_grad_(True)
            loss = _loss(mine, score_func, group_world=True)
            loss.backward()
            out[score_func] = (loss.item(), mine.grad.tolist())  # plain data: the process exits
        cfg = RouterConfig(num_experts=E, top_k=K, aux_loss_coef=0.1, aux_loss_global=True)
        r = _router(cfg)
        r(x[lo:hi]).aux_loss.backward()
        out["router"] = (None, r.gate.weight.grad.tolist())
        results.put((rank, out))
        dist.destroy_process_group()
    except Exception:  # report, so the parent fails with the cause instead of a timeout
        results.put((rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """{rank: results} of the two spawned ranks."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            rank, out = results.get(timeout=TIMEOUT_S)
            assert not isinstance(out, str), f"rank {rank} failed:\n{out}"
            got[rank] = out
    except queue.Empty:
        pytest.fail(f"the ranks did not answer within {TIMEOUT_S} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return got


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_global_loss_equals_concatenated_batch(ranks, score_func):
    """Both ranks get the loss of all tokens; each rank's logits get their rows of its gradient."""
    logits, _ = _inputs()
    full = logits.clone().requires_grad_(True)
    want = _loss(full, score_func, group_world=False)
    want.backward()
    lo = 0
    for rank, T in enumerate(SIZES):
        value, grad = ranks[rank][score_func]
        assert abs(value - want.item()) <= 1e-6 * abs(want.item()), (rank, value, want.item())
        assert_close(torch.tensor(grad), full.grad[lo:lo + T], 1e-6, f"grad of rank {rank}")
        lo += T
    # not the local loss: the two ranks' own batches are imbalanced differently
    local = _loss(logits[:SIZES[0]], score_func, group_world=False).item()
    assert abs(local - want.item()) > 1e-3


def test_router_option_sums_to_single_process_gradient(ranks):
    """RouterConfig.aux_loss_global: the gate gradients of the ranks sum to the gradient of the
    single-process router on all tokens (what an all_reduce-sum of gradients would give)."""
    _, x = _inputs()
    cfg = RouterConfig(num_experts=E, top_k=K, aux_loss_coef=0.1)
    r = _router(cfg)
    r(x).aux_loss.backward()
    total = torch.tensor(ranks[0]["router"][1]) + torch.tensor(ranks[1]["router"][1])
    assert_close(total, r.gate.weight.grad, 1e-6, "gate grad")


def test_global_loss_needs_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ref.global_load_balancing_loss(torch.ones(4), torch.ones(4), 3, 1)
