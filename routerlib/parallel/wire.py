"""What crosses the wire in expert parallelism: the packed row payload and the all-to-alls.

One dispatch row (a token sent once to one rank) is a run of bytes:

    [ D activations: x's dtype (D*s bytes), or fp8/int8 (D bytes) + one fp32 scale (4 bytes) ]
    [ S local expert ids, int16 (2*S bytes; -1 where the slot's expert lives elsewhere)    ]
    [ S combine weights, fp32 (4*S bytes; 0 where the id is -1)                            ]

so the rows, their scales and their routing metadata travel in ONE all_to_all_single of uint8.
The combine sends back one row per dispatch row in x's dtype: the receiving rank's weighted sum
over the token's experts it holds.

Autograd: a launch (`start_*`) packs detached tensors and starts an async all-to-all; the
matching `finish_*` waits and returns the received tensors through an autograd.Function whose
backward is the reverse all-to-all (the backward of an all-to-all is the reverse all-to-all).
The Function's inputs are the sent tensors only to link the graph: its forward reads the
received buffer. fp8/int8 payloads are straight-through: their gradient is sent back in x's
dtype, unquantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Payload = Literal["native", "fp8", "int8"]
PAYLOADS = ("native", "fp8", "int8")
_QMAX = {"fp8": 448.0, "int8": 127.0}  # largest finite float8_e4m3fn / symmetric int8
ID_BYTES, WEIGHT_BYTES, SCALE_BYTES = 2, 4, 4


def row_bytes(hidden: int, slots: int, elem_size: int, payload: Payload) -> int:
    """Bytes of one dispatch row on the wire (see the module docstring)."""
    data = hidden * elem_size if payload == "native" else hidden + SCALE_BYTES
    return data + slots * (ID_BYTES + WEIGHT_BYTES)


def quantize_rows(x: torch.Tensor, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (q [N, D] fp8/int8, scale [N] fp32) with x ~ q * scale, one scale a row."""
    xf = x.float()
    amax = xf.abs().amax(dim=1) if x.shape[1] else xf.new_zeros(x.shape[0])
    scale = (amax / _QMAX[payload]).clamp(min=1e-12)  # [N]; an all-zero row keeps scale > 0
    y = xf / scale[:, None]
    if payload == "fp8":
        return y.to(torch.float8_e4m3fn), scale
    return y.round().clamp(-127, 127).to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, bytes] uint8 view of a contiguous copy."""
    width = math.prod(t.shape[1:]) * t.element_size()
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], width)


def pack(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, payload: Payload) -> torch.Tensor:
    """x [N, D], ids [N, S] int16, w [N, S] fp32 -> [N, row_bytes] uint8."""
    if payload == "native":
        parts = [_bytes(x)]
    else:
        q, scale = quantize_rows(x, payload)
        parts = [_bytes(q), _bytes(scale[:, None])]
    return torch.cat([*parts, _bytes(ids), _bytes(w)], dim=1)


def unpack(buf: torch.Tensor, hidden: int, slots: int, dtype: torch.dtype, payload: Payload
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M, row_bytes] uint8 -> (x [M, D] dtype, ids [M, S] int16, w [M, S] fp32)."""
    def take(lo: int, n: int, dt: torch.dtype) -> torch.Tensor:
        return buf[:, lo:lo + n].contiguous().view(dt)

    if payload == "native":
        n = hidden * torch.empty((), dtype=dtype).element_size()
        x, at = take(0, n, dtype), n
    else:
        qdt = torch.float8_e4m3fn if payload == "fp8" else torch.int8
        q, scale = take(0, hidden, qdt), take(hidden, SCALE_BYTES, torch.float32)[:, 0]
        x, at = dequantize_rows(q, scale, dtype), hidden + SCALE_BYTES
    ids = take(at, slots * ID_BYTES, torch.int16)
    w = take(at + slots * ID_BYTES, slots * WEIGHT_BYTES, torch.float32)
    return x, ids, w


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
               in_splits: list[int], group: dist.ProcessGroup | None, async_op: bool):
    """all_to_all_single along dim 0 (rows); a Work handle when async_op."""
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group,
                                  async_op=async_op)


@dataclass
class Exchange:
    """One all-to-all of rows: split sizes in rows, for the dispatch direction."""

    send_splits: list[int]  # rows this rank sends to each rank
    recv_splits: list[int]  # rows this rank receives from each rank
    group: dist.ProcessGroup | None

    def reverse(self) -> Exchange:
        return Exchange(self.recv_splits, self.send_splits, self.group)

    def run(self, inp: torch.Tensor, async_op: bool = False):
        """inp [sum(send_splits), ...] -> (out [sum(recv_splits), ...], work or None)."""
        out = inp.new_empty((sum(self.recv_splits), *inp.shape[1:]))
        work = all_to_all(out, inp.contiguous(), self.recv_splits, self.send_splits, self.group,
                          async_op)
        return out, work


@dataclass
class Pending:
    """An all-to-all in flight: wait() before reading `out`."""

    out: torch.Tensor
    work: object | None
    exchange: Exchange  # the direction this all-to-all ran in
    sent_bytes: list[int]  # bytes sent to each rank (the buffers' real sizes)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out


def start_dispatch(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, payload: Payload,
                   exchange: Exchange, async_op: bool = True) -> Pending:
    """Pack the rows to send ([N, D], [N, S] int16, [N, S] fp32) and start the all-to-all."""
    buf = pack(x.detach(), ids, w.detach(), payload)  # [N, row_bytes] uint8
    out, work = exchange.run(buf, async_op)
    return Pending(out, work, exchange, [n * buf.shape[1] for n in exchange.send_splits])


class _Received(torch.autograd.Function):
    """Forward: the unpacked receive buffer. Backward: gradients of the received rows and
    weights packed in one byte run and sent back with the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x_sent, w_sent, buf, hidden, slots, payload, exchange):
        ctx.exchange, ctx.x_dtype = exchange, x_sent.dtype
        x, ids, w = unpack(buf, hidden, slots, x_sent.dtype, payload)
        ctx.mark_non_differentiable(ids)
        return x, ids, w

    @staticmethod
    def backward(ctx, gx, _gids, gw):
        n_x = gx.shape[1] * gx.element_size()
        grads = torch.cat([_bytes(gx.to(ctx.x_dtype)), _bytes(gw.float())], dim=1)
        back, _ = ctx.exchange.reverse().run(grads)
        gx_sent = back[:, :n_x].contiguous().view(ctx.x_dtype)
        gw_sent = back[:, n_x:].contiguous().view(torch.float32)
        return gx_sent, gw_sent, None, None, None, None, None


def finish_dispatch(p: Pending, x_sent: torch.Tensor, w_sent: torch.Tensor, payload: Payload
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wait; -> received (x [M, D], ids [M, S] int16, w [M, S] fp32), differentiable in x, w."""
    buf = p.wait()
    return _Received.apply(x_sent, w_sent, buf, x_sent.shape[1], w_sent.shape[1], payload,
                           p.exchange)


def start_combine(partial: torch.Tensor, exchange: Exchange, async_op: bool = True) -> Pending:
    """Send each received row's partial output [M, D] back to its home rank."""
    back = exchange.reverse()
    out, work = back.run(partial.detach(), async_op)
    row = partial.shape[1] * partial.element_size()
    return Pending(out, work, back, [n * row for n in back.send_splits])


class _Returned(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, out, exchange):
        ctx.exchange = exchange
        return out

    @staticmethod
    def backward(ctx, g):
        back, _ = ctx.exchange.reverse().run(g.contiguous())
        return back, None, None


def finish_combine(p: Pending, partial: torch.Tensor) -> torch.Tensor:
    """Wait; -> [N, D] the partial outputs of this rank's sent rows, differentiable in partial."""
    return _Returned.apply(partial, p.wait(), p.exchange)
