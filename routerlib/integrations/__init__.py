"""Adapters that put routerlib's MoE layer into other libraries' models."""
