"""Fused MoE experts: SwiGLU experts as grouped GEMMs that read tokens through the routing plan
and write them back weighted, forward and backward.

    y[t] = sum_j w[t, j] * SwiGLU_e(x[t])   over kept slots j of token t (e = its expert)
    SwiGLU_e(x) = (silu(x @ Wg_e) * (x @ Wu_e)) @ Wd_e,   w_gate_up[e] = [Wg_e | Wu_e]  [D, 2F]

Forward, three launches:
  1. up    h[r] = silu(g) * u with [g | u] = x[token(r)] @ w_gate_up[e(r)]: the A rows are loaded
           straight from x through row_to_slot (no dispatched copy of x); SwiGLU in the
           epilogue; in training the pre-activations [g | u] are stored too (R*2F).
  2. down  o[r] = w[slot(r)] * (h[r] @ w_down[e(r)]): the combine weight in the epilogue.
  3. sum   y[t] = sum_j o[slot_to_row[t, j]] in fp32 (the row-map gather_reduce: each token's K
           rows reduced by one program, no float atomics, deterministic; dropped slots add 0).
FLOPs 6*T*K*D*F. Bytes beyond the weights: x read once per (row, N tile) pass from L2, h written
and read (R*F), o written and read (R*D), y written (T*D).

Backward (dy [T, D]), recomputing SwiGLU from the saved pre-activations (saved: x, the weights,
the plan, [g | u]; never a dispatched copy of x, never h or o):
  1. dg, du, d(w) partials: acc = dy[token(r)] @ w_down[e]^T; dh = w * acc; the epilogue
     recomputes h, writes [dg | du] (R*2F) and per-N-tile partial dots <acc, h> (= <dy, o_unw>).
  2. dW_down[e] = h_e^T @ (w * dy)_e      (grouped A^T B over each expert's rows; h recomputed)
  3. dW_gate_up[e] = x_e^T @ [dg | du]_e  (x gathered through the plan)
  4. dx rows = [dg | du] @ w_gate_up[e]^T, then dx[t] = sum_j rows (gather_reduce, fp32).
  d(w)[t, j] = sum of the partial dots of row slot_to_row[t, j] (0 for dropped slots).
On a CUDA GPU in bf16 (library_wgrad), steps 2-4's GEMMs run in torch._grouped_mm over
expert-sorted rows: step 1 also stores h (R*F), the dispatch kernel gathers w*dy and then x into
one [R, D] row buffer at a time, and rows outside the kept segments are zero. Elsewhere (fp16,
fp32, the interpreter) Triton kernels do steps 2-4 reading through the plan.

Scheduling: the row tiles of every expert form a ragged tile map computed inside each program
from kept_counts and expert_offsets (see _experts_kernels._tile_of), so an expert with no rows
costs nothing, nothing syncs with the host and the launches can be captured in a CUDA graph. The
grid is a static bound (tile_bound); the rows computed over the rows used is padding_waste().
Works for the ragged layout (any pad_to_multiple: the padding rows are never computed) and the
capacity layout (E x C; only kept rows are computed).

Two ways in, same kernels (as dispatch.py): ExpertsFunction (eager) and the custom ops
torch.ops.routerlib.experts / experts_backward (torch.compile). fused_experts() picks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from routerlib.kernels import _experts_kernels as K
from routerlib.kernels import _rowmap
from routerlib.kernels.dispatch import check_device, check_float
from routerlib.types import RoutingPlan


@dataclass(frozen=True)
class TileConfig:
    """One GEMM's launch: a BLOCK_M x BLOCK_N output tile, BLOCK_K deep steps (for the weight
    gradients: rows a step), GROUP_M row tiles walking N together (weight tiles reused from L2)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpertsConfig:
    """The three GEMM families of the fused experts.

    up     the gate/up GEMM (two accumulators of BLOCK_N columns each: gate and up);
    down   the down GEMM and the backward's [dg | du] @ Wgu^T;
    wgrad  the weight gradients (block_k = rows an A^T B step);
    bwd    the backward's dy @ Wd^T with the SwiGLU-backward epilogue (it loads g and u tiles
           beside its accumulator, so it keeps 128-wide N tiles); None: down's.

    Defaults (default_config) by regime, from the mean rows an expert gets (T*S/E):
      decode  (<= 32 rows an expert): the weights dominate the bytes; BLOCK_M=16 (the smallest
              tl.dot tile, so little padding), 64-wide N tiles 128 deep with 4 stages (H200,
              Qwen3-30B-A3B T=64: within run-to-run noise of 128x64 tiles, 289-302 us; 256-deep
              32-wide tiles lost at 385 us).
      middle  (<= 256): 64-row tiles, 4 warps.
      prefill (> 256): compute bound; up 128x128 tiles (the gate/up pair: 128 x (2x128)), 8
              warps, 4 stages; down 128x256 tiles, 3 stages (the wider N tile halves the re-reads
              of h): the sweep's best on an H200 (Qwen3-30B-A3B, T=32768: 5.19 ms against 5.78
              for 128x128 with 3 stages on both, and 5.69 for 128x64 up).
    fp32 inputs take half the stages (twice the bytes a tile in shared memory). Under the
    interpreter every GEMM takes 16x32x32 tiles (speed on the CPU). The GPU benchmark sweeps
    candidates() per regime; its winners belong here.
    """

    up: TileConfig
    down: TileConfig
    wgrad: TileConfig
    bwd: TileConfig | None = None


_REGIMES: dict[str, ExpertsConfig] = {
    "decode": ExpertsConfig(up=TileConfig(16, 64, 128, 8, 4, 4),
                            down=TileConfig(16, 64, 128, 8, 4, 4),
                            wgrad=TileConfig(64, 64, 32, 1, 4, 3)),
    "middle": ExpertsConfig(up=TileConfig(64, 64, 64, 8, 4, 4),
                            down=TileConfig(64, 128, 64, 8, 4, 4),
                            wgrad=TileConfig(64, 128, 32, 1, 4, 3)),
    "prefill": ExpertsConfig(up=TileConfig(128, 128, 64, 8, 8, 4),
                             down=TileConfig(128, 256, 64, 8, 8, 3),
                             wgrad=TileConfig(128, 128, 64, 1, 8, 3),
                             bwd=TileConfig(128, 128, 64, 8, 8, 3)),
}
_INTERPRET_TILE = TileConfig(16, 32, 32, 4, 4, 1)


def regime(rows: int, num_experts: int) -> str:
    """'decode', 'middle' or 'prefill' from the mean rows an expert gets."""
    per_expert = rows / max(num_experts, 1)
    return "decode" if per_expert <= 32 else "middle" if per_expert <= 256 else "prefill"


@functools.lru_cache(maxsize=256)
def default_config(rows: int, num_experts: int, dtype: torch.dtype,
                   interpret: bool = False) -> ExpertsConfig:
    """The launch configs for rows = T*S routed rows over num_experts experts (cached per shape)."""
    if interpret:
        return ExpertsConfig(_INTERPRET_TILE, _INTERPRET_TILE, _INTERPRET_TILE)
    cfg = _REGIMES[regime(rows, num_experts)]
    if dtype == torch.float32:
        half = lambda t: TileConfig(t.block_m, t.block_n, t.block_k, t.group_m, t.num_warps,
                                    max(2, t.num_stages // 2))
        cfg = ExpertsConfig(half(cfg.up), half(cfg.down), half(cfg.wgrad),
                            half(cfg.bwd) if cfg.bwd else None)
    return cfg


def candidates(regime_name: str) -> list[ExpertsConfig]:
    """A few configs per regime for the GPU sweep (the default first, then the runners-up:
    the sweep checks the pinned choice each run, briefly)."""
    base = _REGIMES[regime_name]
    t = TileConfig
    if regime_name == "decode":
        alts = [(t(16, 128, 64, 8, 4, 4), t(16, 128, 64, 8, 4, 4))]
    elif regime_name == "middle":
        alts = [(t(64, 128, 64, 8, 8, 3), t(64, 256, 64, 8, 8, 3))]
    else:
        # the runners-up: 3 stages on both 128x128 GEMMs, and 64-wide up tiles
        alts = [(t(128, 128, 64, 8, 8, 3), t(128, 128, 64, 8, 8, 3)),
                (t(128, 64, 64, 8, 4, 4), t(128, 256, 64, 8, 8, 3))]
    return [base] + [ExpertsConfig(up=u, down=d, wgrad=base.wgrad, bwd=base.bwd)
                    for u, d in alts]


def tile_bound(num_tokens: int, slots: int, num_experts: int, num_rows: int,
               per_expert: int, block_m: int) -> int:
    """Static bound (shapes only) on the row tiles of the ragged tile map: every expert holds at
    most per_expert rows (T dropless, C in the capacity layout) and all together at most
    min(T*S, R), so sum_e ceil(rows_e / BLOCK_M)
    <= min(ceil(min(T*S, R) / BLOCK_M) + E, E * ceil(per_expert / BLOCK_M))."""
    total = min(num_tokens * slots, num_rows)
    bound = min(triton.cdiv(total, block_m) + num_experts,
                num_experts * triton.cdiv(min(per_expert, total), block_m))
    return max(bound, 1)


def padding_waste(kept_counts: torch.Tensor, block_m: int) -> torch.Tensor:
    """Rows computed / rows used (>= 1) of the tile map at BLOCK_M (a 0-d tensor, no sync)."""
    used = kept_counts.sum()
    computed = ((kept_counts + block_m - 1) // block_m * block_m).sum()
    return computed.double() / used.clamp(min=1).double()




def _block_e(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


@dataclass(frozen=True)
class _Plan:
    """What the kernels read of a RoutingPlan, plus the shape-only tile bound inputs."""

    slot_to_row: torch.Tensor  # [T, S] int32
    row_to_slot: torch.Tensor  # [R] int32
    kept_counts: torch.Tensor  # [E] int32
    expert_offsets: torch.Tensor  # [E + 1] int32
    per_expert: int  # most rows an expert can hold: C (capacity) or T

    @property
    def T(self) -> int:
        return self.slot_to_row.shape[0]

    @property
    def S(self) -> int:
        return self.slot_to_row.shape[1]

    @property
    def R(self) -> int:
        return self.row_to_slot.shape[0]

    @property
    def E(self) -> int:
        return self.kept_counts.shape[0]

    @property
    def dense(self) -> bool:
        """Every buffer row is a kept slot's (dropless, unpadded: R = T*S; or a capacity
        layout with C = T and R = T*S, where nothing can be dropped)."""
        return self.R == self.T * self.S and self.per_expert == self.T

    def m_tiles(self, block_m: int) -> int:
        return tile_bound(self.T, self.S, self.E, self.R, self.per_expert, block_m)


def _mm(p: _Plan, a: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int],
        out: torch.Tensor, n: int, k: int, epilogue: int, a_gather: bool, tile: TileConfig,
        weights: torch.Tensor, pre: torch.Tensor | None = None, dw: torch.Tensor | None = None,
        store_pre: bool = False, h: torch.Tensor | None = None) -> None:
    """One _grouped_mm_kernel launch over the plan's tile map (see the kernel for the roles)."""
    m_tiles = p.m_tiles(tile.block_m)
    grid = (m_tiles * triton.cdiv(n, tile.block_n),)
    pre_t = out if pre is None else pre
    K._grouped_mm_kernel[grid](
        a, w, out, pre_t, weights if dw is None else dw, out if h is None else h,
        p.row_to_slot, p.kept_counts,
        p.expert_offsets, weights, n, k, p.S, p.E, m_tiles,
        a.stride(0), w_strides[0], w_strides[1], w_strides[2], out.stride(0), pre_t.stride(0),
        EPILOGUE=epilogue, A_GATHER=a_gather,
        NEED_SLOT=a_gather or epilogue in (K.EPI_SCALE, K.EPI_SWIGLU_BWD), PRE=store_pre,
        STORE_H=h is not None,
        IEEE=a.dtype == torch.float32, UPCAST=_rowmap.interpreting(), BLOCK_E=_block_e(p.E),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        num_warps=tile.num_warps, num_stages=tile.num_stages)


def _wgrad(p: _Plan, a: torch.Tensor, b: torch.Tensor, m: int, n: int, a_gather: bool,
           a_swiglu: bool, b_gather: bool, b_scale: bool, weights: torch.Tensor,
           out_dtype: torch.dtype, tile: TileConfig) -> torch.Tensor:
    """dW [E, m, n] = A_e^T @ B_e over each expert's rows (one _grouped_wgrad_kernel launch)."""
    out = _rowmap.empty((p.E, m, n), out_dtype, a.device)
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n), p.E)
    K._grouped_wgrad_kernel[grid](
        a, b, out, p.row_to_slot, p.kept_counts, p.expert_offsets, weights, m, n, p.S,
        a.stride(0), b.stride(0), A_GATHER=a_gather, A_SWIGLU=a_swiglu, B_GATHER=b_gather,
        B_SCALE=b_scale, IEEE=a.dtype == torch.float32, UPCAST=_rowmap.interpreting(),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    return out


def _config(p: _Plan, dtype: torch.dtype, config: ExpertsConfig | None) -> ExpertsConfig:
    if config is not None:
        return config
    return default_config(p.T * p.S, p.E, dtype, _rowmap.interpreting())


def experts_forward(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                    weights: torch.Tensor, p: _Plan, save_pre: bool,
                    config: ExpertsConfig | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y [T, D], pre [R, 2F] or None). weights: [T, S] fp32 contiguous."""
    T, D = x.shape
    F = w_down.shape[1]
    cfg = _config(p, x.dtype, config)
    pre = _rowmap.empty((p.R, 2 * F), x.dtype, x.device) if save_pre else None
    if T == 0 or p.R == 0 or D == 0:
        return torch.zeros_like(x), pre
    if F == 0:
        return torch.zeros_like(x), pre
    h = _rowmap.empty((p.R, F), x.dtype, x.device)  # [R, F] rows past a tile unset
    _mm(p, x, w_gate_up, tuple(w_gate_up.stride()), h, F, D, K.EPI_SWIGLU, True, cfg.up,
        weights, pre=pre, store_pre=save_pre)
    o = _rowmap.empty((p.R, D), x.dtype, x.device)  # [R, D] weighted expert rows
    _mm(p, h, w_down, tuple(w_down.stride()), o, D, F, K.EPI_SCALE, False, cfg.down, weights)
    del h
    return _rowmap.gather_reduce(o, p.slot_to_row), pre


def library_wgrad(x: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether the backward's weight gradients (and dx rows) go to torch._grouped_mm: CUDA bf16
    with 16-byte aligned rows (D, F multiples of 8). It runs the grouped A^T B over the row
    dimension as a tuned library kernel; the Triton wgrad kernel serves fp16, fp32, other
    devices and the interpreter."""
    F = w_down.shape[1]
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and x.shape[1] % 8 == 0 and F % 8 == 0 and not _rowmap.interpreting()
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def experts_backward(dy: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor,
                     w_down: torch.Tensor, weights: torch.Tensor, pre: torch.Tensor, p: _Plan,
                     need: tuple[bool, bool, bool, bool], config: ExpertsConfig | None = None,
                     library: bool | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dx [T, D], dw_gate_up [E, D, 2F], dw_down [E, F, D], dweights [T, S] fp32), None where
    need (x, w_gate_up, w_down, weights) is False. library: the torch._grouped_mm path for the
    weight gradients and dx rows (library_wgrad(x, w_down) when None)."""
    need_x, need_wgu, need_wd, need_w = need
    T, D = x.shape
    F = w_down.shape[1]
    cfg = _config(p, x.dtype, config)
    dy = dy.to(x.dtype).contiguous()
    if T == 0 or p.R == 0 or D == 0 or F == 0:
        zeros = lambda t: None if t is None else torch.zeros_like(t)
        return (zeros(x) if need_x else None, zeros(w_gate_up) if need_wgu else None,
                zeros(w_down) if need_wd else None,
                torch.zeros_like(weights) if need_w else None)
    if library is None:
        library = library_wgrad(x, w_down)
    if library:
        return _backward_library(dy, x, w_gate_up, w_down, weights, pre, p, need, cfg)
    dx = dwgu = dwd = dw = None
    if need_wd:
        dwd = _wgrad(p, pre, dy, F, D, a_gather=False, a_swiglu=True, b_gather=True,
                     b_scale=True, weights=weights, out_dtype=w_down.dtype, tile=cfg.wgrad)
    if need_x or need_wgu or need_w:
        dgu, partial = _swiglu_backward(dy, w_down, weights, pre, p, cfg.bwd or cfg.down, None,
                                        False)
        if need_w:
            dw = _dweights(partial, p)
        if need_wgu:
            dwgu = _wgrad(p, x, dgu, D, 2 * F, a_gather=True, a_swiglu=False, b_gather=False,
                          b_scale=False, weights=weights, out_dtype=w_gate_up.dtype,
                          tile=cfg.wgrad)
        if need_x:
            dx_rows = _rowmap.empty((p.R, D), x.dtype, x.device)
            wgu_t = (w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1))  # [2F, D]
            _mm(p, dgu, w_gate_up, wgu_t, dx_rows, D, 2 * F, K.EPI_STORE, False, cfg.down,
                weights)
            dx = _rowmap.gather_reduce(dx_rows, p.slot_to_row)
    return dx, dwgu, dwd, dw


def _swiglu_backward(dy: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                     pre: torch.Tensor, p: _Plan, tile: TileConfig, h: torch.Tensor | None,
                     clean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([dg | du] [R, 2F], d(weight) partial dots [R, n_tiles] fp32): acc = dy[token] @ Wd^T
    with dy rows read through the plan, SwiGLU's backward in the epilogue (h [R, F] stored too
    when given). Rows outside the kept segments are zero if clean, else left unset."""
    F = w_down.shape[1]
    empty = _zeros if clean and not p.dense else _rowmap.empty
    dgu = empty((p.R, 2 * F), dy.dtype, dy.device)  # [R, 2F] dg | du
    partial = _rowmap.empty((p.R, triton.cdiv(F, tile.block_n)), torch.float32, dy.device)
    wd_t = (w_down.stride(0), w_down.stride(2), w_down.stride(1))  # w_down[e]^T [D, F]
    _mm(p, dy, w_down, wd_t, dgu, F, dy.shape[1], K.EPI_SWIGLU_BWD, True, tile, weights,
        pre=pre, dw=partial, h=h)
    return dgu, partial


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def _dweights(partial: torch.Tensor, p: _Plan) -> torch.Tensor:
    """d(weight)[t, j] = the sum of row slot_to_row[t, j]'s partial dots (0 if dropped)."""
    rows = p.slot_to_row.long()  # [T, S]
    per_row = partial.sum(1)  # [R] rows outside the tile map are never read
    return torch.where(rows >= 0, per_row[rows.clamp(min=0)], 0.0)


def _backward_library(dy: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor,
                      w_down: torch.Tensor, weights: torch.Tensor, pre: torch.Tensor, p: _Plan,
                      need: tuple[bool, bool, bool, bool], cfg: ExpertsConfig
                      ) -> tuple[torch.Tensor | None, ...]:
    """The backward with torch._grouped_mm for the per-expert A^T B (dW) and the dx rows.

    Triton keeps what only a fused kernel does: the dgu GEMM reads dy through the plan and runs
    SwiGLU's backward, the d(weight) dots and h in its epilogue; the rows are gathered by the
    dispatch kernel (scatter_rows, slack rows zero) and reduced by gather_reduce. Allocated on
    top of the saved [g | u]: [dg | du] (R*2F) and h (R*F) for the whole backward, then one
    [R, D] buffer at a time (w*dy rows, x rows, dx rows). Rows outside the kept segments (capacity
    slack, padding) are zero in every grouped_mm operand, so they add nothing.
    """
    need_x, need_wgu, need_wd, need_w = need
    F = w_down.shape[1]
    dx = dwgu = dwd = dw = None
    offs = p.expert_offsets[1:].clone()  # [E] int32 end of each expert's segment
    h = (_rowmap.empty if p.dense else _zeros)((p.R, F), x.dtype, x.device) if need_wd else None
    dgu, partial = _swiglu_backward(dy, w_down, weights, pre, p, cfg.bwd or cfg.down, h, True)
    if need_w:
        dw = _dweights(partial, p)
    if need_wd:
        dy_rows, _ = _rowmap.scatter_rows(dy, p.slot_to_row, p.row_to_slot, weights)  # [R, D]
        dwd = torch._grouped_mm(h.t(), dy_rows, offs=offs)  # [E, F, D] = h_e^T (w dy)_e
        del dy_rows, h
    if need_wgu:
        x_rows, _ = _rowmap.scatter_rows(x, p.slot_to_row, p.row_to_slot)  # [R, D]
        dwgu = torch._grouped_mm(x_rows.t(), dgu, offs=offs)  # [E, D, 2F] = x_e^T dgu_e
        del x_rows
    if need_x:
        dx_rows = torch._grouped_mm(dgu, w_gate_up.transpose(1, 2), offs=offs)  # [R, D]
        dx = _rowmap.gather_reduce(dx_rows, p.slot_to_row)
    return dx, dwgu, dwd, dw


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile)
# ----------------------------------------------------------------------------------------------

def _plan_of(slot_to_row, row_to_slot, kept_counts, expert_offsets, per_expert) -> _Plan:
    return _Plan(slot_to_row, row_to_slot, kept_counts, expert_offsets, per_expert)


@torch.library.custom_op("routerlib::experts", mutates_args=())
def experts_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
               weights: torch.Tensor, slot_to_row: torch.Tensor, row_to_slot: torch.Tensor,
               kept_counts: torch.Tensor, expert_offsets: torch.Tensor, per_expert: int,
               save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, D], pre [R, 2F] (empty [0, 2F] without save_pre))."""
    p = _plan_of(slot_to_row, row_to_slot, kept_counts, expert_offsets, per_expert)
    y, pre = experts_forward(x, w_gate_up, w_down, weights, p, save_pre)
    if pre is None:
        pre = x.new_empty((0, 2 * w_down.shape[1]))
    return y, pre


@experts_op.register_fake
def _experts_fake(x, w_gate_up, w_down, weights, slot_to_row, row_to_slot, kept_counts,
                  expert_offsets, per_expert, save_pre):
    rows = row_to_slot.shape[0] if save_pre else 0
    return torch.empty_like(x), x.new_empty((rows, 2 * w_down.shape[1]))


@torch.library.custom_op("routerlib::experts_backward", mutates_args=())
def experts_backward_op(dy: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor,
                        w_down: torch.Tensor, weights: torch.Tensor, pre: torch.Tensor,
                        slot_to_row: torch.Tensor, row_to_slot: torch.Tensor,
                        kept_counts: torch.Tensor, expert_offsets: torch.Tensor,
                        per_expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    p = _plan_of(slot_to_row, row_to_slot, kept_counts, expert_offsets, per_expert)
    return experts_backward(dy, x, w_gate_up, w_down, weights, pre, p, (True,) * 4)


@experts_backward_op.register_fake
def _experts_backward_fake(dy, x, w_gate_up, w_down, weights, pre, slot_to_row, row_to_slot,
                           kept_counts, expert_offsets, per_expert):
    return (torch.empty_like(x), torch.empty_like(w_gate_up), torch.empty_like(w_down),
            torch.empty_like(weights))


def _experts_setup(ctx, inputs, output) -> None:
    x, wgu, wd, weights, s2r, r2s, kept, offs, per_expert, _ = inputs
    ctx.save_for_backward(x, wgu, wd, weights, output[1], s2r, r2s, kept, offs)
    ctx.per_expert = per_expert


def _experts_grad(ctx, dy, _dpre):
    x, wgu, wd, weights, pre, s2r, r2s, kept, offs = ctx.saved_tensors
    dx, dwgu, dwd, dw = torch.ops.routerlib.experts_backward(
        dy, x, wgu, wd, weights, pre, s2r, r2s, kept, offs, ctx.per_expert)
    return dx, dwgu, dwd, dw, None, None, None, None, None, None


experts_op.register_autograd(_experts_grad, setup_context=_experts_setup)


# ----------------------------------------------------------------------------------------------
# Eager autograd path
# ----------------------------------------------------------------------------------------------

class ExpertsFunction(torch.autograd.Function):
    """The fused experts with their backward; saves x, the weights, the plan and the
    pre-activations [R, 2F] only."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, weights, p: _Plan, config):
        save = any(ctx.needs_input_grad[:4])
        y, pre = experts_forward(x, w_gate_up, w_down, weights, p, save, config)
        if save:
            ctx.save_for_backward(x, w_gate_up, w_down, weights, pre)
            ctx.plan, ctx.config = p, config
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate_up, w_down, weights, pre = ctx.saved_tensors
        grads = experts_backward(dy, x, w_gate_up, w_down, weights, pre, ctx.plan,
                                 tuple(ctx.needs_input_grad[:4]), ctx.config)
        return (*grads, None, None)


def _check(x: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, w_gate_up: torch.Tensor,
           w_down: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    T, D = x.shape
    if plan.slot_to_row.shape[0] != T:
        raise ValueError(f"x has {T} tokens but the plan routes {plan.slot_to_row.shape[0]}")
    E = plan.num_experts
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("w_gate_up must be [E, D, 2F] and w_down [E, F, D], got shapes "
                         f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
    F = w_down.shape[1]
    if tuple(w_gate_up.shape) != (E, D, 2 * F) or tuple(w_down.shape) != (E, F, D):
        raise ValueError(f"with E={E} experts (the plan's), D={D} (x's) and F={F} (w_down's), "
                         f"w_gate_up must be {(E, D, 2 * F)} and w_down {(E, F, D)}; got "
                         f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: cast one of them")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if plan.slot_to_row.device != x.device:
        raise ValueError(f"the plan is on {plan.slot_to_row.device} but x is on {x.device}")
    if weights.shape != plan.slot_to_row.shape:
        raise ValueError(f"weights must have shape {tuple(plan.slot_to_row.shape)}, got "
                         f"{tuple(weights.shape)}")
    if not weights.is_floating_point() or weights.device != x.device:
        raise TypeError(f"weights must be a float tensor on {x.device}, got {weights.dtype} on "
                        f"{weights.device}")
    check_float(x, "x")
    check_device(x, "x")


def fused_experts(x: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor,
                  w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  config: ExpertsConfig | None = None) -> torch.Tensor:
    """[T, D] -> [T, D]: y[t] = sum_j weights[t, j] * SwiGLU_{e(t,j)}(x[t]) over kept slots, the
    SwiGLU experts w_gate_up [E, D, 2F] (gate | up) and w_down [E, F, D].

    Equals routerlib.reference.experts.experts (dispatch, SwiGLU, combine) within the dtype's
    rounding. Differentiable in x, both weights and the combine weights (fp32 [T, S]; other float
    dtypes are cast and their gradient cast back). config: tile configs (default_config when
    None; the eager path only, torch.compile takes the default)."""
    _check(x, plan, weights, w_gate_up, w_down)
    x = x.contiguous()
    weights = weights.float().contiguous()
    per_expert = plan.capacity if plan.capacity is not None else plan.slot_to_row.shape[0]
    args = (plan.slot_to_row.contiguous(), plan.row_to_slot.contiguous(),
            plan.kept_counts.contiguous(), plan.expert_offsets.contiguous())
    if torch.compiler.is_compiling():
        save = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, w_gate_up, w_down, weights))
        return torch.ops.routerlib.experts(x, w_gate_up, w_down, weights, *args, per_expert,
                                           save)[0]
    return ExpertsFunction.apply(x, w_gate_up, w_down, weights, _Plan(*args, per_expert), config)
