"""The two matrix products the model uses, in one place so weight formats can change under them.

Weights are laid out "in, out": dense [K, N], experts [E, K, N].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x, w):
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype (f32 accumulation)."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def ragged_matmul(x, w, group_sizes):
    """Rows of x [M, K] sorted by expert; group_sizes [E] rows per expert; w [E, K, N] -> [M, N]."""
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes,
                              preferred_element_type=jnp.float32).astype(x.dtype)
