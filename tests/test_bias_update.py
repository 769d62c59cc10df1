"""The aux-loss-free bias update (DeepSeek-V3) as a device op: the formula, in place, moving the
load towards balance over simulated steps, and (GPU) inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from routerlib import reference as ref
from routerlib.config import RouterConfig
from routerlib.router import Router


def test_update_matches_formula(device):
    """b_e += rate * sign(mean(load) - load_e), in place, for int32 loads (the plan's counts);
    an expert exactly at the mean keeps its bias."""
    bias = torch.tensor([0.5, -0.25, 0.0, 1.0], device=device)
    load = torch.tensor([10, 2, 5, 3], dtype=torch.int32, device=device)  # mean 5
    want = bias + 0.1 * torch.tensor([-1.0, 1.0, 0.0, 1.0], device=device)
    assert_close(ref.update_expert_bias(bias, load, 0.1), want, 1e-7, "functional")
    out = ref.update_expert_bias_(bias, load, 0.1)
    assert out.data_ptr() == bias.data_ptr()
    assert_close(bias, want, 1e-7, "in place")


def _imbalance(load: torch.Tensor) -> float:
    return float(load.max()) / float(load.float().mean())


def test_router_bias_balances_a_skewed_router(device):
    """Logits skewed towards the first experts: 40 update steps bring max/mean load down from
    above 2 to below 1.3, the gate untouched (the bias alone moves the selection)."""
    E, K, T, D = 8, 2, 512, 16
    cfg = RouterConfig(num_experts=E, top_k=K, expert_bias=True, bias_update_rate=0.01)
    r = Router(D, cfg, device=device).eval()
    with torch.no_grad():
        r.gate.weight.normal_(0, 0.25)
    x = torch.randn(T, D, device=device)
    skew = torch.linspace(1.0, -1.0, E, device=device)  # expert 0 favoured, expert E-1 shunned
    x_skewed = x + torch.linalg.lstsq(r.gate.weight.detach(), skew[:, None]).solution.T
    first = r(x_skewed).plan.expert_counts
    assert _imbalance(first) > 2.0, first
    for _ in range(40):
        r.update_bias(r(x_skewed).plan.expert_counts)
    last = r(x_skewed).plan.expert_counts
    assert _imbalance(last) < 1.3, (first.tolist(), last.tolist())
    assert float(r.expert_bias[0]) < 0 < float(r.expert_bias[-1])  # favoured one pushed down


def test_update_bias_rejects_bad_load(device):
    r = Router(8, RouterConfig(num_experts=4, top_k=1, expert_bias=True), device=device)
    with pytest.raises(ValueError, match="one count per expert"):
        r.update_bias(torch.ones(5, device=device))
    with pytest.raises(RuntimeError, match="expert_bias=True"):
        Router(8, RouterConfig(num_experts=4, top_k=1), device=device).update_bias(torch.ones(4))


@pytest.mark.gpu
def test_gpu_update_bias_in_cuda_graph():
    """Route + bias update captured in one CUDA graph: each replay reads the new bias and moves
    it by the load of that replay, as the eager loop does."""
    E, K, T, D = 16, 2, 1024, 32
    cfg = RouterConfig(num_experts=E, top_k=K, expert_bias=True, bias_update_rate=0.01,
                       check_finite=False)
    torch.manual_seed(0)
    r = Router(D, cfg, backend="triton", device="cuda").eval()
    x = torch.randn(T, D, device="cuda") + 0.5

    def step():
        with torch.no_grad():
            r.update_bias(r(x).plan.expert_counts)

    start = r.expert_bias.clone()
    for _ in range(5):  # eager: the reference for the replays
        step()
    eager = r.expert_bias.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the capture
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    r.expert_bias.copy_(start)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert_close(r.expert_bias, eager, 1e-6, "bias after 5 replays")
    assert float((eager - start).abs().sum()) > 0  # the updates moved it
