"""Expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs) and its simulator.

    ep.py         EPMoELayer, EPConfig, placements, the local plan of received rows
    wire.py       the packed row payload (native / fp8 / int8 + scales + routing metadata) and
                  the autograd all-to-alls
    launch.py     run_ranks: W local gloo ranks for tests and notebooks
    simulator.py  bytes, imbalance and all-to-all time of EP on clusters we do not have
"""

from routerlib.parallel.ep import (
    EPConfig,
    EPMoELayer,
    WireStats,
    check_placement,
    default_placement,
    local_plan,
)
from routerlib.parallel.launch import run_ranks
from routerlib.parallel.wire import row_bytes

__all__ = ["EPConfig", "EPMoELayer", "WireStats", "check_placement", "default_placement",
           "local_plan", "row_bytes", "run_ranks"]
