"""A small MoE language model on routerlib's layer: the model (lm), the text it learns (data),
its training loop (train), the balancing study (study) and routing traces (traces)."""

from routerlib.models.lm import KVCache, LMConfig, LMOutput, MoETransformer

__all__ = ["KVCache", "LMConfig", "LMOutput", "MoETransformer"]
