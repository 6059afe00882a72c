"""Quantization as a weight transform over the parameter pytree: the routed experts in int4 or MXFP4.

Attention, the dense MLP, embeddings, lm_head, router and the MTP drafter keep their dtype (quantized MTP heads
lose acceptance; UltraSpeed keeps attention in higher precision too). The format and group size travel in the
pytree (quant.QuantizedWeight), not in names.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax import quant
from mimo_jax.errors import ConfigError
from mimo_jax.plan import path_keys, stack_axes

EXPERT_LEAVES = ("w_gate", "w_up", "w_down")
CHOICES = ("none", "int4_sym", "int4_asym", "mxfp4")


def _is_expert(path, leaf) -> bool:
    """A routed-expert weight: [*stack, E, K, N] under a layer's mlp (a dense MLP's weights have rank 2)."""
    keys = path_keys(path)
    return keys[0] == "layers" and keys[-1] in EXPERT_LEAVES and leaf.ndim - stack_axes(keys) == 3


def quantize_experts(params, fmt: str = "int4_sym", group_size: int = 128):
    """params with every routed-expert weight [..., E, K, N] replaced by a QuantizedWeight."""
    if fmt == "none":
        return params
    if fmt not in CHOICES:
        raise ConfigError(f"unknown expert quantization {fmt!r}; choose from {', '.join(CHOICES)}")
    group_size = 32 if fmt == "mxfp4" else group_size

    def q(path, leaf):
        if not _is_expert(path, leaf):
            return leaf
        try:
            return quant.quantize(leaf, fmt, group_size)
        except ValueError as e:
            raise ConfigError(f"cannot quantize {jax.tree_util.keystr(path)} to {fmt} g{group_size}: {e}") from None

    return jax.tree_util.tree_map_with_path(q, params)


def dequantize_experts(params, dtype=jnp.float32):
    """The same model with the quantized weights expanded back (the reference for equivalence tests)."""
    return jax.tree_util.tree_map(lambda w: quant.dequantize(w, dtype) if isinstance(w, quant.QuantizedWeight)
                                  else w, params, is_leaf=lambda w: isinstance(w, quant.QuantizedWeight))
