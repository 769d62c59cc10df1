"""routerlib: Mixture-of-Experts routing, a readable PyTorch reference and fast Triton kernels."""

from routerlib.config import MoEConfig, RouterConfig
from routerlib.layer import MoELayer, SwiGLUExperts
from routerlib.ops import combine, dispatch, route, route_dispatch
from routerlib.router import Router
from routerlib.types import RouterOutput, RoutingPlan, Selection

__version__ = "0.1.0"

__all__ = [
    "MoEConfig", "MoELayer", "Router", "RouterConfig", "RouterOutput", "RoutingPlan", "Selection",
    "SwiGLUExperts", "combine", "dispatch", "route", "route_dispatch",
]
