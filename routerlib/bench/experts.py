"""The whole MoE layer and its experts: routerlib's fused experts against the torch ways.

    python -m routerlib.bench.experts --out build/gpu/experts          # H200: ~3 min
    python -m routerlib.bench.experts --quick --out /tmp/e               # tiny shapes (CPU test)

Variants (same weights, same routing rules, bf16):
    routerlib            MoELayer(backend="triton"): gate, Triton route, fused experts
    routerlib_batched    the same layer with expert_path="batched": Triton dispatch,
                         torch._grouped_mm, Triton combine (routerlib before the fused experts)
    torch_composition    gate, top-k, argsort, index_select, torch._grouped_mm x2, index_add
    hf_loop              gate, top-k, one matmul chain per expert over its tokens (torch.where:
                         host syncs), index_add, as Hugging Face's Mixtral block does it
    grouped_mm_experts   torch._grouped_mm on the experts alone (rows already expert-sorted)
    routerlib_experts    the fused experts alone (gather + experts + weighted combine) on a plan
Modes: forward (prefill T, no grad), train (forward + backward: autograd.grad into x, the gate
and both expert weights; DeepSeek-V3 at T=2048), decode (T=64, no grad, in a CUDA graph where the
variant can be captured; hf_loop syncs, so it runs eager, and in train mode only for E <= 16:
one host sync and matmul chain per expert make it seconds a call at E=128).

Metrics (routerlib.bench.results rows): time_us (median, do_bench with L2 flush), tflops,
frac_matmul_roof (against the bf16 matmul TFLOP/s measured in the same run), floor_us = max(FLOPs /
matmul roof, bytes / copy bandwidth) with FLOPs = 2*T*D*E + 6*T*K*D*F (x3 in train) and bytes =
the used experts' weights (3*D*F*2 each; x3 in train: read twice, gradients written) + the gate +
x and y; x_floor = time / floor; peak_mem_mb (max_memory_allocated above what was allocated
before the call); padding_waste (rows computed / rows used by the fused experts' tile map);
rel_err (routerlib's y against torch_composition's, same routing); and the issue's targets.
A --sweep over kx.candidates() times the fused experts alone per tile config: Qwen3-30B-A3B's
decode and prefill regimes, Mixtral's prefill (very wide experts).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from routerlib.bench.configs import SHAPES, ModelShape
from routerlib.bench.results import ResultSet
from routerlib.bench.roofline import measure_roofs
from routerlib.bench.timing import bench, bench_cuda_graph
from routerlib.config import RouterConfig
from routerlib.layer import MoELayer

# shapes in the order they run (the targets' first, the slowest last) and their prefill T
PREFILL = {"qwen3-30b-a3b": 32768, "olmoe-1b-7b": 16384, "deepseek-v3": 4096,
           "mixtral-8x7b": 16384}
TRAIN_T = {"deepseek-v3": 2048}  # train mode's T where it differs (DeepSeek-V3: time, memory)
# --sweep's default shapes: Qwen3 for the decode and prefill regimes, Mixtral for very wide experts
SWEEP_SHAPES = "qwen3-30b-a3b,mixtral-8x7b"
HF_LOOP_TRAIN_MAX_E = 16  # hf_loop's train mode only where it is not minutes of host syncs
DECODE_T = 64


# ----------------------------------------------------------------------------------------------
# The torch variants
# ----------------------------------------------------------------------------------------------

def torch_select(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice top-K in plain torch, routerlib's rules: (ids [T, K] int64, w [T, K] fp32)."""
    lf = logits.float()
    K, E = cfg.top_k, cfg.num_experts
    if cfg.score_func == "softmax":
        if cfg.softmax_after_topk:
            top, ids = lf.topk(K, dim=-1)
            w = top.softmax(-1)
        else:
            w, ids = lf.softmax(-1).topk(K, dim=-1)
    else:
        scores = lf.sigmoid()
        key = scores if bias is None else scores + bias
        if cfg.n_groups > 1:
            g = key.view(-1, cfg.n_groups, E // cfg.n_groups)
            gs = g.topk(2, -1).values.sum(-1) if cfg.group_score == "top2_sum" else g.amax(-1)
            keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(
                1, gs.topk(cfg.topk_groups, -1).indices, True)
            key = key.masked_fill(~keep.repeat_interleave(E // cfg.n_groups, 1), -math.inf)
        ids = key.topk(K, dim=-1).indices
        w = scores.gather(1, ids)
    if cfg.renormalize:
        w = w / w.sum(-1, keepdim=True)
    return ids, w * cfg.routed_scaling_factor


def grouped_experts(rows: torch.Tensor, offs: torch.Tensor, w_gate_up: torch.Tensor,
                    w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU over expert-sorted rows [N, D] with torch._grouped_mm (offs: [E] int32 ends)."""
    gate, up = torch._grouped_mm(rows, w_gate_up, offs=offs).chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate) * up).contiguous(), w_down, offs=offs)


def torch_composition(x, gate_w, bias, cfg: RouterConfig, w_gate_up, w_down) -> torch.Tensor:
    """top-k, argsort, index_select, torch._grouped_mm, index_add: no host sync."""
    ids, w = torch_select(x @ gate_w.t(), cfg, bias)
    flat = ids.reshape(-1)  # [T*K]
    order = flat.argsort(stable=True)
    counts = torch.zeros(cfg.num_experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0).to(torch.int32)
    token = order // cfg.top_k
    out = grouped_experts(x.index_select(0, token), offs, w_gate_up, w_down)
    out = out * w.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


def hf_loop(x, gate_w, bias, cfg: RouterConfig, w_gate_up, w_down) -> torch.Tensor:
    """The per-expert loop of Hugging Face's Mixtral block (torch.where syncs every expert)."""
    ids, w = torch_select(x @ gate_w.t(), cfg, bias)
    y = torch.zeros_like(x)
    mask = F.one_hot(ids, cfg.num_experts).permute(2, 1, 0)  # [E, K, T]
    for e in range(cfg.num_experts):
        k_idx, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        gate, up = (x[tok] @ w_gate_up[e]).chunk(2, dim=-1)
        h = ((F.silu(gate) * up) @ w_down[e]) * w[tok, k_idx, None].to(x.dtype)
        y.index_add_(0, tok, h)
    return y


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, device: torch.device, quick: bool):
        self.device, self.quick = device, quick
        self.cuda = device.type == "cuda"
        self.res = ResultSet("experts")
        self.roofs = measure_roofs(device, quick=quick)
        self.times: dict[tuple, float] = {}

    def _time(self, fn: Callable[[], object], graph: bool) -> float:
        if self.quick and not self.cuda:  # the interpreter: one timed call shows the plumbing
            return bench(fn, warmup_ms=0.0, rep_ms=0.0, device=self.device, min_rep=1,
                         max_rep=1).median_us
        warm, rep = (5.0, 20.0) if self.quick else (5.0, 30.0)
        if graph:
            return bench_cuda_graph(fn, warmup_ms=warm, rep_ms=rep).median_us
        return bench(fn, warmup_ms=warm, rep_ms=rep, device=self.device, max_rep=30).median_us

    def _peak_mb(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            return math.nan
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def measure(self, variant: str, conf: dict, fn: Callable[[], object], graph: bool,
                flops: float, nbytes: float, extra: dict | None = None) -> float | None:
        """Time fn (and its peak memory); rows time_us, tflops, frac_matmul_roof, floor_us,
        x_floor, peak_mem_mb. Errors (capture refused, out of memory) become a status row."""
        conf = dict(conf, graph=graph)
        try:
            if self.cuda:
                fn()  # warm-up: compilation, autotuning
            us = self._time(fn, graph)
            peak = self._peak_mb(fn)
        except Exception as e:  # noqa: BLE001 (a benchmark reports and carries on)
            self.res.add(variant, dict(conf, error=str(e).splitlines()[0][:300]), "error", 1)
            print(f"  {variant:20s} {conf['mode']:8s} ERROR {str(e).splitlines()[0][:120]}")
            if self.cuda:
                torch.cuda.empty_cache()
            return None
        floor = max(flops / (self.roofs.matmul_tflops * 1e12),
                    nbytes / (self.roofs.copy_gbps * 1e9))
        add = lambda m, v, u="": self.res.add(variant, conf, m, v, u)
        add("time_us", us, "us")
        add("tflops", flops / (us * 1e-6) / 1e12, "TFLOP/s")
        add("frac_matmul_roof", flops / (us * 1e-6) / 1e12 / self.roofs.matmul_tflops)
        add("floor_us", floor * 1e6, "us")
        add("x_floor", us / (floor * 1e6))
        add("peak_mem_mb", peak, "MiB")
        for k, v in (extra or {}).items():
            add(k, v)
        self.times[(variant, conf["shape"], conf["mode"])] = us
        print(f"  {variant:20s} {conf['mode']:8s} {us:10.1f} us  {flops / us / 1e6:7.1f} TFLOP/s"
              f"  x_floor {us / (floor * 1e6):5.2f}  peak {peak:9.1f} MiB")
        return us


def _layer(shape: ModelShape, dtype, device, seed: int) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(shape.moe_config("triton", expert_path="fused"), device=device, dtype=dtype)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.randn_like(layer.router.expert_bias) * 0.1)
    return layer.eval()


def run_shape(r: Runner, shape: ModelShape, T: int, modes: tuple[str, ...], sweep: bool,
              dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
    """Every variant of one shape in each mode (decode at T=64, forward and train at T)."""
    layer = _layer(shape, dtype, r.device, seed)
    batched = MoELayer(shape.moe_config("triton", expert_path="batched"), device="meta")
    batched.router, batched.experts = layer.router, layer.experts  # same parameters
    for mode in modes:
        Tm = DECODE_T if mode == "decode" else TRAIN_T.get(shape.name, T) if mode == "train" else T
        if r.quick:
            Tm = min(Tm, 8 if mode == "decode" else 24)
        _run_mode(r, layer, batched, shape, Tm, mode, sweep, dtype, seed)
        if r.cuda:
            torch.cuda.empty_cache()


def _run_mode(r: Runner, layer: MoELayer, batched: MoELayer, shape: ModelShape, Tm: int,
              mode: str, sweep: bool, dtype: torch.dtype, seed: int) -> None:
    from routerlib.kernels import experts as kx

    dev = r.device
    cfg = layer.cfg.router
    gate_w, bias = layer.router.gate.weight, layer.router.expert_bias
    wgu, wd = layer.experts.w_gate_up, layer.experts.w_down
    D, E, K, Fw = shape.D, shape.E, shape.K, shape.ffn
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    x = torch.randn(Tm, D, device=dev, generator=gen).to(dtype)
    conf = dict(shape=shape.name, T=Tm, D=D, E=E, K=K, F=Fw, dtype=str(dtype)[6:], mode=mode)
    with torch.no_grad():
        out = layer.router(x)
        plan, w = out.plan, out.topk_weights
        flat = out.topk_ids.reshape(-1).long()
        used = int(torch.unique(flat).numel())
        waste = float(kx.padding_waste(plan.kept_counts,
                                       kx.default_config(Tm * K, E, dtype).up.block_m))
        y_ref = torch_composition(x, gate_w, bias, cfg, wgu, wd).float()
        y_fused = layer(x)[0].float()
        rel = float((y_fused - y_ref).abs().max() / y_ref.abs().max().clamp(min=1e-30))
        order = flat.argsort(stable=True)
        offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
        rows = x.index_select(0, order // K)  # [T*K, D] expert-sorted (grouped_mm alone)
    train = mode == "train"
    flops = 2 * Tm * D * E + 6 * Tm * K * D * Fw
    nbytes = used * 3 * D * Fw * 2 + D * E * 2 + 2 * Tm * D * 2
    if train:
        flops, nbytes = 3 * flops, 3 * nbytes
    graph = r.cuda and mode == "decode"
    print(f"{shape.name} T={Tm} {mode}: {used} experts used, padding waste {waste:.3f}, "
          f"routerlib vs composition max rel err {rel:.2e}")

    def run_of(f: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor,
               params: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        if not train:
            def fwd():
                with torch.no_grad():
                    return f(inp)
            return fwd
        xg = inp.detach().requires_grad_()
        dy = torch.randn_like(inp)  # the output's shape: [T, D], or [T*K, D] for gmm_fn

        def fwd_bwd():
            return torch.autograd.grad(f(xg), (xg, *params), dy)
        return fwd_bwd

    def gmm_fn(rr: torch.Tensor) -> torch.Tensor:
        return grouped_experts(rr, offs, wgu, wd)

    params = (gate_w, wgu, wd)
    variants = [
        ("routerlib", lambda xx: layer(xx)[0], x, params, graph,
         dict(padding_waste=waste, rel_err=rel)),
        ("routerlib_batched", lambda xx: batched(xx)[0], x, params, graph, None),
        ("torch_composition", lambda xx: torch_composition(xx, gate_w, bias, cfg, wgu, wd), x,
         params, graph, None),
        ("hf_loop", lambda xx: hf_loop(xx, gate_w, bias, cfg, wgu, wd), x, params, False, None),
        ("routerlib_experts", lambda xx: kx.fused_experts(xx, plan, w, wgu, wd), x, (wgu, wd),
         graph, None),
        ("grouped_mm_experts", gmm_fn, rows, (wgu, wd), graph, None),
    ]
    for m in (layer, batched):
        m.train(train)
    for name, f, inp, ps, g, extra in variants:
        if name == "hf_loop" and train and E > HF_LOOP_TRAIN_MAX_E:
            continue
        r.measure(name, conf, run_of(f, inp, ps), g, flops, nbytes, extra)
    for m in (layer, batched):
        m.eval()
    if sweep and not train:
        for i, cand in enumerate(kx.candidates(kx.regime(Tm * K, E))):
            tiles = f"up={_tile(cand.up)} down={_tile(cand.down)}"
            run = run_of(lambda xx, c=cand: kx.fused_experts(xx, plan, w, wgu, wd, config=c), x,
                         ())
            r.measure("routerlib_experts_sweep", dict(conf, candidate=i, tiles=tiles), run,
                      graph, flops, nbytes)


def _tile(t) -> str:
    return f"{t.block_m}x{t.block_n}x{t.block_k}/g{t.group_m}/w{t.num_warps}/s{t.num_stages}"


def evaluate_targets(r: Runner) -> None:
    """The issue's targets as rows (variant "target", metric = the target's name, value 1 / 0)."""
    t = r.times
    q = "qwen3-30b-a3b"

    def ratio(shape, mode, a="torch_composition", b="routerlib"):
        if (a, shape, mode) in t and (b, shape, mode) in t:
            return t[(a, shape, mode)] / t[(b, shape, mode)]
        return None

    checks = []
    if ("routerlib", q, "forward") in t:
        checks.append(("qwen3_forward_le_4600us", t[("routerlib", q, "forward")], "<=", 4600.0))
    for name, shape, mode, need in (("qwen3_forward_vs_composition", q, "forward", 2.5),
                                    ("qwen3_train_vs_composition", q, "train", 2.0),
                                    ("mixtral_forward_vs_composition", "mixtral-8x7b",
                                     "forward", 1.2)):
        v = ratio(shape, mode)
        if v is not None:
            checks.append((name, v, ">=", need))
    for name, value, op, need in checks:
        met = value <= need if op == "<=" else value >= need
        r.res.add("target", dict(target=name, need=f"{op} {need}"), "value", value)
        r.res.add("target", dict(target=name, need=f"{op} {need}"), "met", float(met))
        print(f"target {name}: {value:.3f} {op} {need}: {'met' if met else 'NOT met'}")
    for row in r.res.rows:  # decode: time against reading the used experts' weights once
        if (row.variant == "routerlib" and row.metric == "x_floor"
                and row.config.get("mode") == "decode"):
            met = row.value <= 1.15
            conf = dict(target=f"{row.config['shape']}_decode_x_weight_read", need="<= 1.15")
            r.res.add("target", conf, "value", row.value)
            r.res.add("target", conf, "met", float(met))
            print(f"target {conf['target']}: {row.value:.3f} <= 1.15: "
                  f"{'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for experts.json / experts.csv")
    p.add_argument("--shapes", default=",".join(PREFILL), help="comma-separated shape names")
    p.add_argument("--modes", default="decode,forward,train")
    p.add_argument("--sweep", action="store_true", help="time the tile-config candidates")
    p.add_argument("--sweep-shapes", default=SWEEP_SHAPES, help="shapes the sweep runs on")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU test)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = Runner(device, a.quick)
    for k, v in r.roofs.as_dict().items():
        if isinstance(v, float):
            r.res.add("roof", {"roof": k}, k, v)
    print(f"roofs: copy {r.roofs.copy_gbps:.0f} GB/s, matmul {r.roofs.matmul_tflops:.0f} TFLOP/s")
    modes = tuple(m for m in a.modes.split(",") if m)
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        T = PREFILL.get(name, 4096)
        if a.quick:
            shape = shape.replace(hidden=32, ffn=16, num_experts=min(shape.E, 8),
                                  top_k=min(shape.K, 2), n_groups=min(shape.n_groups, 2),
                                  topk_groups=min(shape.topk_groups, 1))
        t0 = time.time()
        run_shape(r, shape, T, modes, a.sweep and name in a.sweep_shapes.split(","))
        print(f"{name}: {time.time() - t0:.1f} s")
        r.res.write(a.out)  # after every shape: a run cut short by its timeout keeps what it did
        gc.collect()
    evaluate_targets(r)
    path = r.res.write(a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
