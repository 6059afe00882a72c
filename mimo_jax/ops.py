"""The matrix products the model uses, in one place so weight formats can change under them.

Weights are laid out "in, out": dense [K, N], experts [E, K, N]. A weight may be a plain array or a
quant.QuantizedWeight (int4 / MXFP4 with its metadata); quantized products run the Pallas kernels on GPU and
the XLA dequantize+dot path elsewhere (quant.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax import quant


def matmul(x, w):
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype (f32 accumulation)."""
    if isinstance(w, quant.QuantizedWeight):
        return quant.qmatmul(x, w)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def ragged_matmul(x, w, group_sizes):
    """Rows of x [M, K] sorted by expert; group_sizes [E] rows per expert; w [E, K, N] -> [M, N].
    Rows past sum(group_sizes) come out zero.

    With fewer rows than experts (decode, verify) each row gathers its expert's matrix: XLA's GPU ragged_dot
    reads every expert (measured on an H200: 23 ms/token for 7 MoE layers of 64 experts, BENCHMARKS.md)."""
    if isinstance(w, quant.QuantizedWeight):
        return quant.ragged_qmatmul(x, w, group_sizes)
    m, e = x.shape[0], w.shape[0]
    if m < e:
        expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")  # e past the groups
        rows_w = jnp.take(w, jnp.minimum(expert, e - 1), axis=0).astype(x.dtype)
        y = jnp.einsum("mk,mkn->mn", x, rows_w, preferred_element_type=jnp.float32)
        return jnp.where((expert < e)[:, None], y, 0.0).astype(x.dtype)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes,
                              preferred_element_type=jnp.float32).astype(x.dtype)


def ragged_swiglu_in(x, w_gate, w_up, group_sizes):
    """SiLU(x @ w_gate) * (x @ w_up) per expert group (one fused kernel when both are quantized)."""
    if isinstance(w_gate, quant.QuantizedWeight):
        return quant.ragged_qmatmul_gate_up(x, w_gate, w_up, group_sizes)
    return jax.nn.silu(ragged_matmul(x, w_gate, group_sizes)) * ragged_matmul(x, w_up, group_sizes)
