"""Quantization and mixed precision: router precision paths (router.py), the quantized token
payload (payload.py; its kernel is routerlib/kernels/quant.py) and the routing-agreement harness
(agreement.py) that measures what each precision costs in routing decisions and layer output."""

from routerlib.quant.agreement import (
    Agreement,
    compare_routers,
    compare_selections,
    gate_inputs,
    selection_margin,
)
from routerlib.quant.payload import (
    dequantize_rows,
    moe_forward_quantized,
    payload_bytes,
    quantize_dispatch,
    quantize_dispatch_reference,
    quantize_tokens,
)
from routerlib.quant.router import (
    PRECISIONS,
    QuantGate,
    gate_logits,
    quantize_fp8,
    quantize_int8,
    quantize_weight,
    set_router_precision,
)

__all__ = [
    "PRECISIONS", "Agreement", "QuantGate", "compare_routers", "compare_selections",
    "dequantize_rows", "gate_inputs", "gate_logits", "moe_forward_quantized", "payload_bytes",
    "quantize_dispatch", "quantize_dispatch_reference", "quantize_fp8", "quantize_int8",
    "quantize_tokens", "quantize_weight", "selection_margin", "set_router_precision",
]
