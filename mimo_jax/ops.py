"""The matrix products the model uses, in one place so weight formats can change under them.

Weights are laid out "in, out": dense [K, N], experts [E, K, N]. A weight may be a plain array or a
quant.QuantizedWeight (int4 / MXFP4 with its metadata); quantized products run the Pallas kernels on GPU and
the XLA dequantize+dot path elsewhere (quant.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import quant

# Dense weights streamed by the Pallas GEMV kernel at batch-1 decode (pallas_kernels/gemv.py): one token, bf16,
# 2^23 <= elements < 2^26. Measured on an H200 (BENCHMARKS.md): MiMo's fused q/k/v (4096 x 13568) 43 -> 35 us, o 21 -> 20
# us in the step. Kept on XLA's dot: weights of 2^26 elements and more (the lm_head, the dense MLP: 90-98% of the
# read ceiling already; the dense w_down, exactly 2^26, was 34.7 us through the kernel vs 33.5 on XLA),
# M > 1 (verify, prefill: at parity) and small layers such as SmolLM2's, which run as a scan over stacked weights:
# there a Pallas operand is a materialised slice of the stack (a copy per layer; XLA's dot reads the stack in
# place), and the kernel (~4 us) is no faster than XLA's multiply + reduce pair (1.395 -> 1.908 ms measured).
GEMV_ELEMENTS = (1 << 23, 1 << 26)


def _use_gemv(x, w) -> bool:
    from mimo_jax import sharding  # the mesh decides: a GSPMD-sharded weight must stay on XLA's dot
    from pallas_kernels.gemv import supported

    if jax.default_backend() != "gpu" or sharding.expert_axis_size() > 1:
        return False
    if w.ndim != 2 or w.dtype != jnp.bfloat16 or x.dtype != jnp.bfloat16:
        return False
    K, N = w.shape
    rows = int(np.prod(x.shape[:-1]))
    return rows == 1 and GEMV_ELEMENTS[0] <= K * N < GEMV_ELEMENTS[1] and supported(rows, K, N)


def matmul(x, w):
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype (f32 accumulation)."""
    if isinstance(w, quant.QuantizedWeight):
        return quant.qmatmul(x, w)
    if _use_gemv(x, w):
        from pallas_kernels.gemv import gemv

        return gemv(x.reshape(1, -1), w).reshape(*x.shape[:-1], w.shape[1])
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


def pair_matmul(x, w, experts):
    """Row r of x [M, K] times expert experts[r] of w [E, K, N] -> [M, N] (an id >= E: a zero row); rows in
    any order, no sort. For rows whose experts are distinct (one token's top-k), each expert is read once."""
    return quant.pair_qmatmul(x, w, experts)


def pair_swiglu_in(x, w_gate, w_up, experts):
    """SiLU(x @ w_gate[e]) * (x @ w_up[e]) per row (see pair_matmul); one kernel when both are quantized."""
    if isinstance(w_gate, quant.QuantizedWeight):
        return quant.pair_qmatmul_gate_up(x, w_gate, w_up, experts)
    return jax.nn.silu(pair_matmul(x, w_gate, experts)) * pair_matmul(x, w_up, experts)
