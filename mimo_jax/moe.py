"""Mixture of experts: the sigmoid router and the routed experts (local; expert parallelism wraps this).

Router (f32): s = sigmoid(x Wg). Experts are chosen by top-k of s + e_score_correction_bias (the bias only
steers the choice); their weights are the chosen raw s, renormalised to sum 1 when norm_topk_prob, times
routed_scaling_factor.

Experts: the N*k (token, expert) pairs are sorted by expert, each expert's rows go through its SwiGLU with
one grouped matmul per projection (rows of an expert with no tokens are never read), and the outputs are
un-sorted and summed with the router weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax import sharding
from mimo_jax.ops import ragged_matmul, ragged_swiglu_in


def route(p, x, top_k: int, norm_topk_prob: bool, scaling: float):
    """x [N, H] -> (weights [N, k] f32, expert ids [N, k] int32)."""
    scores = jax.nn.sigmoid(jnp.dot(x.astype(jnp.float32), p["router"].astype(jnp.float32)))
    _, ids = jax.lax.top_k(scores + p["router_bias"].astype(jnp.float32), top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, ids


def experts(p, x, weights, ids):
    """x [N, H], weights/ids [N, k] -> sum_j weights[:, j] * expert_{ids[:, j]}(x)  [N, H].

    ids equal to the number of experts mark pairs to skip (expert parallelism: held elsewhere)."""
    n, k = ids.shape
    num_experts = p["w_gate"].shape[0]  # (local experts under expert parallelism)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    h = ragged_swiglu_in(rows, p["w_gate"], p["w_up"], group_sizes)
    y = ragged_matmul(h, p["w_down"], group_sizes)
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights).astype(x.dtype)


def moe(p, x, top_k: int, norm_topk_prob: bool, scaling: float):
    """x [B, T, H] -> [B, T, H]."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, ids = route(p, flat, top_k, norm_topk_prob, scaling)
    if sharding.expert_axis_size() > 1:
        return sharding.ep_experts(experts, p, flat, weights, ids).reshape(shape)
    return experts(p, flat, weights, ids).reshape(shape)
