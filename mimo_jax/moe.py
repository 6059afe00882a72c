"""Mixture of experts: the sigmoid router and the routed experts (local; expert parallelism wraps this).

Router (f32): s = sigmoid(x Wg). Experts are chosen by top-k of s + e_score_correction_bias (the bias only
steers the choice); their weights are the chosen raw s, renormalised to sum 1 when norm_topk_prob, times
routed_scaling_factor.

Experts: the N*k (token, expert) pairs are sorted by expert, each expert's rows go through its SwiGLU with
one grouped matmul per projection (rows of an expert with no tokens are never read), and the outputs are
un-sorted and summed with the router weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import ops, quant, sharding
from mimo_jax.ops import pair_matmul, pair_swiglu_in, ragged_matmul, ragged_swiglu_in

# Expert parallelism at decode: each device runs all top-k (token, expert) pairs, the ones held elsewhere as skips,
# so ~k / devices pairs do work. True: the expert kernels' default configs split K for those busy pairs (with 4 of 8
# pairs busy per GPU, twice the K splits), keeping ~2 weight tiles per SM as measured best for 8 busy pairs
# (BENCHMARKS.md, session 4). The Flash 2 x H200 profile of session 12 had the gate/up pair kernel at ~19% of its
# bytes (40.8 us for ~4 local pairs, where mid_mimo's 8 take 39 us). Untimed (no 2-GPU machine since): off until a
# sweep measures it (knob_sweep.sh moe.EP_SPLIT_FOR_BUSY_PAIRS=1 ... --devices 2).
EP_SPLIT_FOR_BUSY_PAIRS = False


def route(p, x, top_k: int, norm_topk_prob: bool, scaling: float):
    """x [N, H] -> (weights [N, k] f32, expert ids [N, k] int32)."""
    scores = jax.nn.sigmoid(ops.matmul(x.astype(jnp.float32), p["router"]))  # (f32; "in, out" or ops.OutInWeight)
    _, ids = jax.lax.top_k(scores + p["router_bias"].astype(jnp.float32), top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, ids


EXPERT_KEYS = ("w_gate", "w_up", "w_down")


def _flatten_lead(w, n_lead: int):
    """[*stack, E, K, N] -> [prod(stack) * E, K, N] (also for a QuantizedWeight: all its arrays share the lead)."""
    return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[n_lead + 1:]), w)


def experts(stack, index, x, weights, ids, busy_pairs: int | None = None):
    """Routed experts of one layer: sum_j weights[:, j] * expert_{ids[:, j]}(x), x [N, H] -> [N, H].

    `stack` holds the expert weights of a whole run of layers ([*stack, E, K, N] each, never sliced by the layer
    scan) and `index` picks this layer. With fewer (token, expert) pairs than experts (decode, verify), the
    stack is viewed as [layers * E, K, N] and the grouped matmul reads only the experts the pairs name, straight
    from the stack; otherwise (prefill) this layer's experts are sliced out first. An id equal to E marks a pair
    to skip (expert parallelism: the expert lives on another device); busy_pairs: how many of one token's
    pairs are expected not to skip (the kernels' K splits; see EP_SPLIT_FOR_BUSY_PAIRS).
    """
    n, k = ids.shape
    lead = stack["w_gate"].shape[: len(index)]
    e = stack["w_gate"].shape[len(index)]
    # The grouped int4 kernel reads only the experts that have rows, straight from the whole stack; slicing
    # this layer's experts out first copies all of them (measured: 400 us per layer for a verify of 9 tokens x
    # top-8 of 64 int4 experts, a quarter of the step). XLA's paths gather per row, so they slice unless the
    # pairs are fewer than the experts.
    # With the kernel (GPU) that holds for any number of pairs: a 32-slot batched step (256 pairs) or a prefill
    # chunk sliced instead, copying every layer's experts (2.4 ms of a 5.9 ms mid_mimo step on an H200).
    quantized = isinstance(stack["w_gate"], quant.QuantizedWeight)
    in_place = quantized and (n * k < int(np.prod(lead)) * e or quant.reads_experts_in_place())
    # ... unless the flattened stack's offsets would overflow the kernel's 32-bit indexing (quant.offsets_fit_kernel):
    # then this layer's experts are sliced out (a copy, but correct)
    fits = not quantized or all(quant.offsets_fit_kernel(stack[name]) for name in EXPERT_KEYS)  # size as flattened
    if fits and (n * k < e or in_place):
        layer = sum(i * int(np.prod(lead[j + 1:])) for j, i in enumerate(index)) if index else 0
        total = int(np.prod(lead)) * e
        w = {name: _flatten_lead(stack[name], len(index)) for name in EXPERT_KEYS}
        flat = jnp.where(ids < e, ids + layer * e, total).reshape(-1)
    else:
        total = e
        w = {name: jax.tree_util.tree_map(lambda a: a[tuple(index)], stack[name]) for name in EXPERT_KEYS}
        flat = ids.reshape(-1)
    if n == 1:
        # One token (decode): its k experts are distinct, so every (token, expert) pair is its own row tile in
        # pair order -- no sort, group sizes, tile schedule or un-sort (each was a kernel per layer).
        h = pair_swiglu_in(jnp.broadcast_to(x, (k, x.shape[1])), w["w_gate"], w["w_up"], flat, busy_pairs)
        y = pair_matmul(h, w["w_down"], flat, busy_pairs)
        return jnp.einsum("kh,k->h", y.astype(jnp.float32), weights[0])[None].astype(x.dtype)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]
    group_sizes = jnp.bincount(flat, length=total).astype(jnp.int32)  # skipped pairs (id == total) dropped
    h = ragged_swiglu_in(rows, w["w_gate"], w["w_up"], group_sizes)
    y = ragged_matmul(h, w["w_down"], group_sizes)
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights).astype(x.dtype)


def moe(p, stack, index, x, top_k: int, norm_topk_prob: bool, scaling: float):
    """x [B, T, H] -> [B, T, H]; p holds this layer's router, stack/index its experts (see `experts`)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    with jax.named_scope("router"):
        weights, ids = route(p, flat, top_k, norm_topk_prob, scaling)
    with jax.named_scope("experts"):
        n_dev = sharding.expert_axis_size()
        if n_dev > 1:
            local = experts
            if EP_SPLIT_FOR_BUSY_PAIRS:
                local = functools.partial(experts, busy_pairs=max(1, -(-top_k // n_dev)))
            return sharding.ep_experts(local, stack, index, flat, weights, ids).reshape(shape)
        return experts(stack, index, flat, weights, ids).reshape(shape)
