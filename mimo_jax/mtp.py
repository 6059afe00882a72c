"""MiMo's multi-token-prediction (MTP) layers, used as the speculative drafter.

One MTP layer j, at position t, reads the target's (or the previous depth's) normed hidden h_t and the
embedding of the token at t+1, and predicts the token at t+2:
    x = eh_proj([enorm(embed(token_{t+1})), hnorm(h_t)])       # embedding first
    x = block_j(x)                                              # pre-norm SWA attention (sink) + dense SwiGLU
    h' = final_layernorm_j(x);  logits = lm_head(h')            # shared lm_head; h' feeds the next depth
The block attends at position t like a main sliding-window layer and keeps its own ring cache
(params["mtp"] and the MTP cache are stacked on a leading axis of n_mtp layers).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax import model
from mimo_jax.block_drafter import full_vocab
from mimo_jax.config import DENSE, SLIDING, ModelConfig
from mimo_jax.layers import rms_norm
from mimo_jax.ops import matmul


def cache_shapes(cfg: ModelConfig, batch: int, dtype, ring_slack: int) -> dict:
    s = cfg.attention(SLIDING)
    lead = (cfg.num_mtp_layers, batch, s.window + ring_slack, s.num_kv_heads)
    return {"k": jax.ShapeDtypeStruct(lead + (s.head_dim,), dtype),
            "v": jax.ShapeDtypeStruct(lead + (s.v_head_dim,), dtype)}


def init_cache(cfg: ModelConfig, batch: int, dtype, ring_slack: int) -> dict:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, dtype, ring_slack))


@jax.named_scope("drafter")
def mtp_block(params, j: int, hidden, tokens, positions, cache, cfg: ModelConfig):
    """MTP layer j (static) without its logits: hidden [B,T,H] normed, tokens [B,T] (the tokens one ahead of
    hidden), positions [T] (those of hidden; -1 = padding) -> (normed output [B,T,H], cache)."""
    p = jax.tree_util.tree_map(lambda a: a[j], params["mtp"])
    eps = cfg.rms_norm_eps
    e = rms_norm(model.embed(params, tokens), p["enorm"], eps)
    x = matmul(jnp.concatenate([e, rms_norm(hidden.astype(e.dtype), p["hnorm"], eps)], axis=-1), p["eh_proj"])
    x, cache = model.decoder_layer(p, x, positions, cache, (j,), (SLIDING, DENSE), cfg)
    return rms_norm(x, p["final_norm"], eps), cache


def draft_logits(params, h, cfg: ModelConfig):
    """The MTP layers' logits of normed outputs h [..., H] -> f32 [..., V]: the shared lm_head, or, when the
    drafter file brought a draft vocabulary (params["drafter"] = {"vocab": ids [Vd], "head": lm_head rows
    [Vd, H]}), only those rows (the other tokens -inf: never drafted; a 152K-row head is read once per draft
    position otherwise)."""
    dw = params.get("drafter")
    if dw is None or "vocab" not in dw:
        return model.head(params, h, cfg)
    sub = jnp.dot(h, dw["head"].T.astype(h.dtype), preferred_element_type=jnp.float32)
    return full_vocab(sub, dw["vocab"], cfg.vocab_size)


def mtp_layer(params, j: int, hidden, tokens, positions, cache, cfg: ModelConfig):
    """mtp_block and its logits -> (normed output [B,T,H], logits [B,T,V] f32, cache)."""
    h, cache = mtp_block(params, j, hidden, tokens, positions, cache, cfg)
    return h, draft_logits(params, h, cfg), cache
