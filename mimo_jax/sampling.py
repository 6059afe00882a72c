"""Token sampling on the device: temperature, top-k, top-p (nucleus), all as traced scalars.

`filtered_logits` gives the distribution actually sampled from (speculative decoding needs it as p and q);
top_k <= 0 and top_p >= 1 switch those filters off. Greedy decoding is a separate static path (argmax).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_logits(logits, temperature, top_k, top_p):
    """logits [..., V] f32 -> logits / temperature with tokens outside top-k / top-p set to -inf.

    Ties at a threshold are all kept. The most likely token always survives.
    """
    x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
    vocab = x.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_x, jnp.broadcast_to(k - 1, x.shape[:-1] + (1,)).astype(jnp.int32), axis=-1)
    probs = jax.nn.softmax(jnp.where(sorted_x >= kth, sorted_x, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    # top_p >= 1 is "off", tested as such: the f32 running sum reaches 1.0 before a long tail does
    keep = (before < top_p) | (top_p >= 1.0) | (jnp.arange(vocab) == 0)
    cutoff = jnp.min(jnp.where(keep & (sorted_x >= kth), sorted_x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= cutoff, x, -jnp.inf)


def token_key(key, position):
    """The key of the token sampled for `position`: each generated token gets its own (a speculative step keys
    on the position of the first token it produces and splits that key among its draws)."""
    return jax.random.fold_in(key, position)


def sample(key, logits, temperature, top_k, top_p):
    """One token id per row of logits [..., V]."""
    return jax.random.categorical(key, filtered_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def next_token(key, logits, temperature, top_k, top_p, is_greedy: bool):
    """is_greedy is static: the greedy path compiles without the sort."""
    return greedy(logits) if is_greedy else sample(key, logits, temperature, top_k, top_p)
