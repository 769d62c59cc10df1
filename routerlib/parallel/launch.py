"""Run a function on W local ranks: gloo on the CPU (what the tests and notebook 05 use to check
expert parallelism without GPUs), or NCCL with one GPU a rank (the multi-GPU tests; scripts
run under torchrun instead).

`run_ranks(fn, world, *args)` spawns W processes, initialises a process group on a free local
port in each (rank r on cuda:r with NCCL), calls fn(rank, world, *args), and returns the W
return values. Every
collective has a timeout and so does the join: a rank that dies or hangs fails the call with a
RuntimeError instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout_s: float, backend: str, queue,
           fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks share the machine's cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            queue.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which raises it
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 60.0,
              backend: str = "gloo") -> list[Any]:
    """fn(rank, world, *args) on `world` ranks -> [result of rank 0, 1, ...].

    fn must be importable (a module-level function) and its result picklable (plain Python
    values: tensors travel through shared memory that dies with the rank). timeout_s bounds
    each collective and the whole run. backend: "gloo" or "nccl" (one GPU a rank)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: must be 'gloo' or 'nccl'")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_entry, daemon=True,
                             args=(r, world, port, timeout_s, backend, queue, fn, args))
                 for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s + 30  # + start-up (imports) of the ranks
    try:
        while len(results) + len(errors) < world:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks timed out after {timeout_s + 30:.0f} s; finished: "
                                   f"{sorted(results)}")
            if queue.empty():
                if not any(p.is_alive() for p in procs) and queue.empty():
                    raise RuntimeError(f"ranks exited without a result; exit codes "
                                       f"{[p.exitcode for p in procs]}")
                time.sleep(0.02)
                continue
            rank, ok, value = queue.get()
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
