"""Expert parallelism: the EP layer on 2 and 4 gloo ranks against the single-process MoELayer
(forward and gradients), the deduplication and the bytes on the wire checked exactly, the
robustness cases (no hang: every launch has a timeout), the payload and local-plan helpers, and
on a GPU the layer with an EP group of size 1 against the local layer."""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET

from routerlib import MoEConfig, MoELayer, RouterConfig
from routerlib.parallel import EPConfig, EPMoELayer, check_placement, local_plan, run_ranks, wire
from routerlib.parallel import simulator as sim
from routerlib.parallel.checks import Case, suite, tolerance
from routerlib.parallel.ep import default_placement


def _moe(E: int, K: int, D: int = 16, F: int = 8, shared: int = 0, **router) -> MoEConfig:
    return MoEConfig(hidden_size=D, ffn_size=F, shared_expert_size=shared,
                     router=RouterConfig(num_experts=E, top_k=K, **router))


CASES_2 = [
    Case("dropless_k2", _moe(8, 2), (5, 11)),
    # E not a power of two, capacity drops by priority: dropped slots are not sent
    Case("capacity_e6", _moe(6, 2, capacity_factor=1.0, drop_policy="priority"), (13, 7)),
    Case("k1_t1", _moe(4, 1), (1, 9)),  # top-1, a rank with a single token
    Case("k_eq_e", _moe(4, 4), (6, 3)),  # every token to every rank: dedup halves the rows
    Case("empty_rank", _moe(8, 3), (0, 8)),  # a rank with no tokens still joins every exchange
    # every token's experts on rank 1 (selection bias): rank 0 receives zero rows
    Case("hot_rank", _moe(8, 2, expert_bias=True), (7, 5), hot_rank=1),
    Case("spread_chunks_shared", _moe(8, 3, shared=8), (9, 4),
         ep=EPConfig(num_chunks=3), placement=(1, 0, 1, 0, 1, 0, 1, 0)),
    Case("deepseek_groups", _moe(8, 3, score_func="sigmoid", n_groups=4, topk_groups=2,
                                 group_score="top2_sum", renormalize=True,
                                 routed_scaling_factor=2.5), (6, 10)),
    Case("expert_choice", _moe(4, 2, routing="expert_choice", capacity_factor=1.0), (8, 6)),
    Case("bf16", _moe(8, 2), (7, 9), dtype="bfloat16"),
    Case("bf16_int8", _moe(8, 2), (7, 9), ep=EPConfig(payload="int8"), dtype="bfloat16"),
    Case("fp16_fp8_chunks", _moe(8, 2), (7, 9), ep=EPConfig(payload="fp8", num_chunks=2),
         dtype="float16"),
]

CASES_4 = [
    Case("uneven_chunks", _moe(8, 3), (3, 0, 10, 6), ep=EPConfig(num_chunks=2)),
    Case("permuted_shared_fp8", _moe(8, 2, shared=8), (5, 8, 2, 7), ep=EPConfig(payload="fp8"),
         placement=(3, 2, 1, 0, 0, 1, 2, 3)),
    Case("hot_rank", _moe(8, 2, expert_bias=True), (4, 6, 1, 5), hot_rank=2),
    Case("capacity_e12", _moe(12, 4, capacity_factor=0.75), (9, 12, 4, 7)),
]


def _row_bytes(case: Case) -> int:
    """Bytes of one dispatch row, written out from the payload's definition."""
    D, S = case.cfg.hidden_size, case.cfg.router.slots_per_token
    data = D * torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    if case.ep.payload != "native":
        data = D + 4  # one byte a value + an fp32 scale
    return data + S * (2 + 4)  # int16 local expert id + fp32 weight a slot


def _check_run(cases: list[Case], world: int, backend: str = "gloo") -> None:
    device = "cuda" if backend == "nccl" else "cpu"
    out = run_ranks(suite, world, cases, device, timeout_s=90, backend=backend)
    by_case = {c.name: [out[r]["cases"][i] for r in range(world)] for i, c in enumerate(cases)}
    for case in cases:
        res = by_case[case.name]
        tol = tolerance(case)
        elem = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
        D = case.cfg.hidden_size
        for r, got in enumerate(res):
            bad = {k: v for k, v in got["errors"].items() if not v <= tol}
            assert not bad, f"{case.name} rank {r}: relative errors {bad} > {tol}"
            # dedup: rows and slots per destination equal the count from the reference routing
            assert got["rows_to"] == got["expected_rows_to"], (case.name, r)
            assert got["slots_to"] == got["expected_slots_to"], (case.name, r)
            assert got["dispatch_bytes_to"] == [n * _row_bytes(case)
                                                for n in got["expected_rows_to"]], case.name
            # the combine returns each received row once, in x's dtype
            back = [res[q]["expected_rows_to"][r] * D * elem for q in range(world)]
            assert got["combine_bytes_to"] == back, (case.name, r)
            assert got["baseline_bytes_to"] == [n * D * 2 for n in got["expected_slots_to"]]
        # the simulator counts the same rows from the same routing
        S = case.cfg.router.slots_per_token
        ids = torch.tensor(sum((g["topk_ids"] for g in res), []), dtype=torch.int32).view(-1, S)
        home = torch.cat([torch.full((g["tokens"],), r) for r, g in enumerate(res)])
        placement = case.placement or default_placement(case.cfg.router.num_experts, world)
        kept = torch.tensor(sum((g["kept"] for g in res), []), dtype=torch.bool).view(-1, S)
        sim_rows = sim.row_matrix(ids, placement, world, home=home, kept=kept)
        assert sim_rows.tolist() == [g["rows_to"] for g in res], case.name
        # no token lost: every kept slot went to exactly one rank
        sent = sum(sum(g["slots_to"]) for g in res)
        assert sent == sum(sum(g["expected_slots_to"]) for g in res)
    for r in range(world):  # the data-parallel balance loss over every rank's tokens
        b = out[r]["balance"]
        assert b["aux"] == pytest.approx(b["aux_ref"], rel=1e-5), b
        assert b["grad_err"] <= 1e-5, b
    errs = [o["errors"] for o in out]
    for name in errs[0]:
        for r in range(world):
            assert errs[r][name] != "no error", f"{name}: rank {r} built the layer"
    for r in range(world):
        assert "does not divide" in errs[r]["ep_size"]
        assert "does not match the placement" in errs[r]["placement_world"]
        assert "every rank must hold" in errs[r]["placement_uneven"]
        assert "one rank per expert" in errs[r]["placement_length"]
        assert "mismatched EP configurations" in errs[r]["config_mismatch"]
        assert "mismatched EP configurations" in errs[r]["chunks_mismatch"]


def test_ep_two_ranks_equals_reference():
    _check_run(CASES_2, 2)


def test_ep_four_ranks_equals_reference():
    _check_run(CASES_4, 4)


@pytest.mark.skipif(not INTERPRET, reason="gloo ranks run Triton on the CPU: TRITON_INTERPRET=1")
def test_ep_triton_fused_experts_two_ranks():
    """backend="triton": the route kernels and the fused experts (gather, GEMMs, K-sum in the
    kernels) on the received rows; a rank with no tokens of its own still computes for others."""
    cfg = MoEConfig(hidden_size=16, ffn_size=8, backend="triton",
                    router=RouterConfig(num_experts=4, top_k=2))
    _check_run([Case("triton_fused", cfg, (0, 7), ep=EPConfig(num_chunks=2))], 2)


@pytest.mark.multigpu
def test_ep_nccl_equals_reference():
    """The same checks with NCCL, one GPU a rank (2 to 4 GPUs)."""
    world = 4 if torch.cuda.device_count() >= 4 else 2
    _check_run(CASES_4 if world == 4 else CASES_2, world, "nccl")


def test_dedup_sends_fewer_rows_than_slots():
    """k_eq_e: each token's 4 experts sit on 2 ranks, so 2 rows instead of 4 copies."""
    case = next(c for c in CASES_2 if c.name == "k_eq_e")
    assert sum(case.tokens) * 2 < sum(case.tokens) * case.cfg.router.top_k


def test_missing_process_group_is_a_clear_error():
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        EPMoELayer(_moe(4, 2))


def test_bad_configs_and_placements():
    with pytest.raises(ValueError, match="payload"):
        EPConfig(payload="fp4")
    with pytest.raises(ValueError, match="num_chunks"):
        EPConfig(num_chunks=0)
    with pytest.raises(ValueError, match="does not divide"):
        check_placement([0] * 6, 6, 4)
    assert check_placement([1, 0, 0, 1], 4, 2) == [1, 0, 0, 1]


@pytest.mark.parametrize("payload", ["native", "fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_roundtrip(payload, dtype, device="cpu"):
    _roundtrip(payload, dtype, device)


def _roundtrip(payload: str, dtype: torch.dtype, device) -> None:
    g = torch.Generator().manual_seed(3)
    N, D, S = 37, 24, 3  # odd sizes; one all-zero row
    x = (torch.randn(N, D, generator=g) * 4).to(device, dtype)
    x[5] = 0
    ids = torch.randint(-1, 7, (N, S), generator=g).to(device, torch.int16)
    w = torch.rand(N, S, generator=g).to(device)
    buf = wire.pack(x, ids, w, payload)
    assert buf.dtype == torch.uint8
    assert buf.shape == (N, wire.row_bytes(D, S, x.element_size(), payload))
    x2, ids2, w2 = wire.unpack(buf, D, S, dtype, payload)
    assert torch.equal(ids2, ids) and torch.equal(w2, w)  # metadata: exact
    if payload == "native":
        assert torch.equal(x2, x)
    else:
        amax = x.float().abs().amax(dim=1, keepdim=True)
        rel = {"fp8": 2.0**-4, "int8": 0.5 / 127}[payload] + 2.0**-7  # + the dtype's rounding
        assert ((x2.float() - x.float()).abs() <= rel * amax + 1e-6).all()
        assert torch.equal(x2[5], x[5])


@pytest.mark.parametrize("M,S,E_l", [(0, 2, 3), (1, 1, 1), (17, 3, 5), (40, 4, 2)])
def test_local_plan_matches_a_loop(M, S, E_l):
    g = torch.Generator().manual_seed(M)
    ids = torch.randint(-1, E_l, (M, S), generator=g, dtype=torch.int32)
    n = int((ids >= 0).sum())
    plan = local_plan(ids, E_l, n)
    rows = []  # expected: expert-major, slot order inside an expert
    for e in range(E_l):
        rows += [s for s in range(M * S) if ids.view(-1)[s] == e]
    assert plan.row_to_slot.tolist() == rows
    for r, s in enumerate(rows):
        assert plan.slot_to_row.view(-1)[s] == r
    assert ((plan.slot_to_row == -1) == (ids < 0)).all()
    counts = [int((ids == e).sum()) for e in range(E_l)]
    assert plan.expert_counts.tolist() == counts
    assert plan.expert_offsets.tolist() == [sum(counts[:e]) for e in range(E_l + 1)]


def test_simulator_target_deepseek_v3_8_ranks():
    """Dedup + fp8 payload: dispatch bytes on the wire per token <= 30% of a bf16 all-to-all
    sending K copies (DeepSeek-V3 routing: 8 groups, 4 kept, one group a rank)."""
    shape = sim.SHAPES["deepseek-v3"]
    ids = sim.generate_routing(shape, 2048, seed=1)
    placement = default_placement(shape.experts, 8)
    p = sim.predict(ids, placement, 8, shape, sim.calibrated_h200(), payload="fp8")
    wb = p.wire_bytes_per_token(2048)
    assert wb["dispatch_ratio"] <= 0.30, wb
    plain = sim.predict(ids, placement, 8, shape, sim.calibrated_h200(), dedup=False)
    assert plain.wire_bytes_per_token(2048)["baseline_dispatch"] == wb["baseline_dispatch"]
    # a token reaches at most topk_groups = 4 ranks: at most 4 rows, never more than K slots
    rows = sim.row_matrix(ids, placement, 8)
    assert rows.sum() <= 4 * 2048 and rows.sum() < sim.row_matrix(ids, placement, 8, False).sum()


def test_simulator_calibration():
    topo = sim.calibrated_h200()
    shape = sim.Shape("d7168", 7168, 2048, 8, 1)
    # 128 tokens of D=7168 bf16, 4 GPUs, each token to every other GPU's share: the measured
    # 80-108 us; 0.5 GB a rank on 2 GPUs: the measured 282 GB/s bus bandwidth
    b = torch.full((4, 4), 128 * 7168 * 2 // 4)
    assert 80 <= sim.all_to_all_us(b, topo) <= 108
    half = torch.full((2, 2), 2**28)
    t = sim.all_to_all_us(half, topo) - topo.nvlink_latency_us
    assert abs(2**28 / (t * 1e3) - 282) < 1
    assert shape.router().num_experts == 8


def test_placement_search_balances_hot_experts():
    shape = sim.SHAPES["qwen3-30b-a3b"]
    ids = sim.generate_routing(shape, 1024, skew=1.5, seed=2)
    load = torch.bincount(ids.reshape(-1).long(), minlength=shape.experts)
    lpt = sim.lpt_placement(load, 8)
    assert sorted(lpt.count(r) for r in range(8)) == [16] * 8
    topo = sim.calibrated_h200()
    best, hist = sim.search_placement(ids, 8, shape, topo, swaps=5)
    check_placement(best, shape.experts, 8)
    assert hist[-1] <= min(hist[:2])  # never worse than the blocks or LPT
    blocks = sim.predict(ids, default_placement(shape.experts, 8), 8, shape, topo)
    searched = sim.predict(ids, best, 8, shape, topo)
    assert searched.imbalance < blocks.imbalance


@pytest.mark.gpu
@pytest.mark.parametrize("payload", ["native", "fp8", "int8"])
def test_pack_unpack_roundtrip_gpu(payload):
    _roundtrip(payload, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_ep_size_one_equals_local_layer_gpu(backend, chunks):
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = MoEConfig(hidden_size=256, ffn_size=128, shared_expert_size=64, backend=backend,
                        router=RouterConfig(num_experts=16, top_k=4))
        ref = MoELayer(cfg, device="cuda", dtype=torch.bfloat16)
        ep = EPMoELayer.from_layer(ref, EPConfig(num_chunks=chunks))
        x = torch.randn(333, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        xe = x.detach().clone().requires_grad_(True)
        g = torch.randn_like(x)
        y, _ = ref(x)
        ye, _ = ep(xe)
        (y.float() * g).sum().backward()
        (ye.float() * g).sum().backward()
        torch.testing.assert_close(ye, y, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(xe.grad, x.grad, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ep.experts.w_down.grad, ref.experts.w_down.grad,
                                   atol=5e-2, rtol=2e-2)
    finally:
        dist.destroy_process_group()
