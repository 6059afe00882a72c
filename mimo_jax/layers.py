"""Layer math as pure functions: RMSNorm, partial RoPE, attention with sinks and windows, SwiGLU.

Shapes: B batch, T new tokens, S cached keys, H hidden, Hq/Hkv heads (G = Hq // Hkv), D qk head dim, Dv v head dim.
Positions are int32, consecutive from the cache length, with -1 marking padding at the tail (padded tokens are
never written to a cache and attend to nothing): `positions` [T] is shared by the batch; [B, T] gives each row its
own (batched decoding: every slot at its own position; a row of -1 leaves that row's caches untouched).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mimo_jax.config import AttentionSpec
from mimo_jax.ops import matmul


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Positions:
    """Positions ([T] or [B, T]) with their RoPE tables, computed once per forward pass (model.forward_hidden):
    computed inside the scan over layers, XLA recomputed cos and sin in two kernels per layer (SmolLM2 on an H200:
    60 of a decode step's 582 kernels, session 12's optimized HLO). tables: (theta, rope_dim) -> (cos, sin) as
    `rope_tables` returns them. `attention` takes these or plain positions."""
    ids: jax.Array
    tables: dict


def rope_tables(positions, theta: float, rope_dim: int, dtype):
    """(cos, sin) [1 or B, T, 1, rope_dim] of rotate-half RoPE at positions [T] or [B, T], in dtype."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    emb = emb[None, :, None, :] if positions.ndim == 1 else emb[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def with_rope_tables(positions, specs, dtype) -> Positions:
    """positions with the RoPE tables of every (theta, rope_dim) among the attention specs."""
    keys = sorted({(s.rope_theta, s.rope_dim) for s in specs})
    return Positions(positions, {k: rope_tables(positions, *k, dtype) for k in keys})


def rope(x, positions, theta: float, rope_dim: int, tables=None):
    """Rotate-half RoPE on the first rope_dim dims of each head; x [B, T, heads, D], positions [T] or [B, T];
    tables: their (cos, sin) already computed (rope_tables in x's dtype)."""
    cos, sin = tables if tables is not None else rope_tables(positions, theta, rope_dim, x.dtype)
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def swiglu(p, x):
    if "w_gate_up" in p:  # model.unroll_layers' fused layout: one GEMM for both
        gate, up = jnp.split(matmul(x, p["w_gate_up"]), 2, axis=-1)
    else:
        gate, up = matmul(x, p["w_gate"]), matmul(x, p["w_up"])
    return matmul(jax.nn.silu(gate) * up, p["w_down"])


# Attention's two products on a GPU as multiplies and reductions instead of dots (`attend`) when q has at most
# REDUCE_ATTENTION_MAX_Q elements (B x T x query heads x D: the multiplies per key): a reduction reads its
# operand through the dynamic slice of the stacked cache, while a dot (a GEMM fusion) needs that slice copied
# first and re-reads nothing per query row. One H200, session 11: SmolLM2 shapes (q 576 / 5184 elements) plain
# decode 0.875 -> 0.804 ms/token, k = 8 step 1.215 -> 1.093 ms (720 -> 482 kernels); mid_mimo (12288 / 110592)
# plain 1.565 -> 1.581, k = 8 step 2.482 -> 2.762: dots there. The threshold is the largest size measured to win
# (sizes between 5184 and 12288, e.g. MiMo-V2-Flash's 32 heads per GPU at decode, 6144, are unmeasured: dots).
# 0: dots always. CPU: dots always (jax.lax.platform_dependent).
REDUCE_ATTENTION_MAX_Q = 5184


def _scores_dot(q, k):
    return jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32)


def _scores_reduce(q, k):
    """_scores_dot as a multiply and a reduction over D."""
    qe = jnp.transpose(q, (0, 2, 3, 1, 4))[:, :, :, :, None, :].astype(jnp.float32)  # [B,Hkv,G,T,1,D]
    ke = jnp.transpose(k, (0, 2, 1, 3))[:, :, None, None, :, :].astype(jnp.float32)  # [B,Hkv,1,1,S,D]
    return jnp.sum(qe * ke, axis=-1)


def _mix_dot(p, v):
    return jnp.einsum("bhgts,bshd->bthgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _mix_reduce(p, v):
    """_mix_dot as a multiply and a reduction over the keys."""
    ve = jnp.transpose(v, (0, 2, 1, 3))[:, :, None, None, :, :].astype(jnp.float32)  # [B,Hkv,1,1,S,Dv]
    pe = p.astype(v.dtype).astype(jnp.float32)[..., None]  # [B,Hkv,G,T,S,1]
    return jnp.transpose(jnp.sum(pe * ve, axis=-2), (0, 3, 1, 2, 4))  # [B,T,Hkv,G,Dv]


def _on_gpu(reduce_form, dot_form, *args):
    return jax.lax.platform_dependent(*args, cpu=dot_form, default=reduce_form)


def attend(q, k, v, mask, sink, scale, reduce: bool | None = None):
    """Softmax attention with an optional per-head sink logit in the denominator.

    q [B,T,Hkv,G,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv], mask [T,S] or [B,T,S] bool, sink [Hkv,G] f32 or None.
    p_ts = exp(a_ts - m) / (exp(sink - m) + sum_s' exp(a_ts' - m)),  m = max(max_s a_ts, sink).
    A row with nothing visible (padding) returns zeros. reduce: the products as multiplies and reductions (True),
    as dots (False), or None: reductions on a GPU when q.size <= REDUCE_ATTENTION_MAX_Q, else dots.
    """
    if reduce is None and q.size <= REDUCE_ATTENTION_MAX_Q:
        scores = functools.partial(_on_gpu, _scores_reduce, _scores_dot)
        mix = functools.partial(_on_gpu, _mix_reduce, _mix_dot)
    else:
        scores, mix = (_scores_reduce, _mix_reduce) if reduce else (_scores_dot, _mix_dot)
    s = scores(q, k) * scale
    mask = mask[None] if mask.ndim == 2 else mask
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if sink is not None:
        m = jnp.maximum(m, sink[None, :, :, None])
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])
    denom = jnp.sum(p, axis=-1)
    if sink is not None:
        denom = denom + jnp.exp(sink[None, :, :, None] - m)
    p = p / jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)[..., None]
    return mix(p, v).astype(v.dtype)


def ring_positions(length, size: int):
    """Position held by each slot of a ring buffer of `size` after `length` tokens (slot = pos % size); -1 if none."""
    slots = jnp.arange(size, dtype=jnp.int32)
    pos = length - 1 - jnp.mod(length - 1 - slots, size)
    return jnp.where(pos >= 0, pos, -1)


def rows_of(a, b: int):
    """The first b rows of a cache [B', ...] (itself when B' == b: no slice op in the common case)."""
    return a if a.shape[0] == b else a[:b]


def attention(p, x, positions, cache, index, spec: AttentionSpec):
    """Pre-normed x [B,T,H] -> attention output [B,T,H] and the cache with this chunk written.

    `cache` holds the stacked {"k","v"} of a whole run of layers; `index` picks this layer in its leading axes.
    Full layers cache every position (slot = position). Sliding layers keep a ring of R >= window slots
    (slot = position % R): keys are the ring (older positions) plus this chunk, masked to the window, and the
    ring is rebuilt so each slot holds the newest valid position with its residue. With R = window + s, a chunk
    of up to s positions that is later rolled back (rejected drafts: the next call starts before them) only
    overwrote slots of positions already outside every later window, so nothing needed is lost.
    The cache may hold more rows than x (batched decoding over the first B slots of a larger state): rows [0, B)
    are read and written in place, the others are left as they are (no copy of the cache in or out).
    """
    b, t, _ = x.shape
    hkv, g = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads
    if "wqkv" in p:  # model.unroll_layers' fused layout: one GEMM for q, k and v
        nq, nk = spec.num_heads * spec.head_dim, hkv * spec.head_dim
        q, k, v = jnp.split(matmul(x, p["wqkv"]), [nq, nq + nk], axis=-1)
    else:
        q, k, v = matmul(x, p["wq"]), matmul(x, p["wk"]), matmul(x, p["wv"])
    q = q.reshape(b, t, spec.num_heads, spec.head_dim)
    k = k.reshape(b, t, hkv, spec.head_dim)
    v = v.reshape(b, t, hkv, spec.v_head_dim)
    if spec.value_scale != 1.0:
        v = v * jnp.asarray(spec.value_scale, v.dtype)
    tables = None
    if isinstance(positions, Positions):  # (model.forward_hidden: the tables computed once for every layer)
        positions, tables = positions.ids, positions.tables.get((spec.rope_theta, spec.rope_dim))
        tables = tables if tables is not None and tables[0].dtype == q.dtype else None
    q = rope(q, positions, spec.rope_theta, spec.rope_dim, tables)
    k = rope(k, positions, spec.rope_theta, spec.rope_dim, tables)
    k, v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
    rows_pos = positions if positions.ndim == 2 else positions[None]  # [B or 1, T]
    start = rows_pos[:, 0]  # -1: a row with nothing to write (an inactive slot)
    n_valid = jnp.sum(rows_pos >= 0, axis=1)
    qpos = rows_pos[:, :, None]
    if spec.window is None:
        capacity = cache["k"].shape[len(index) + 1]
        slots = jnp.where(rows_pos >= 0, rows_pos, capacity)  # padding -> out of range -> dropped
        rows = jnp.arange(b)[:, None]
        cache = {name: cache[name].at[(*index, rows, slots)].set(new, mode="drop")
                 for name, new in (("k", k), ("v", v))}
        keys, values = rows_of(cache["k"][index], b), rows_of(cache["v"][index], b)
        mask = jnp.arange(capacity)[None, None, :] <= qpos
    else:
        size = cache["k"].shape[len(index) + 1]
        old_k, old_v = rows_of(cache["k"][index], b), rows_of(cache["v"][index], b)
        kpos = jnp.concatenate([ring_positions(start[:, None], size), rows_pos], axis=1)[:, None, :]
        keys, values = jnp.concatenate([old_k, k], axis=1), jnp.concatenate([old_v, v], axis=1)
        mask = (kpos >= 0) & (kpos <= qpos) & (kpos >= qpos - spec.window)
        new_pos = ring_positions((start + n_valid)[:, None], size)
        from_chunk = ((new_pos >= start[:, None]) & (new_pos >= 0))[:, :, None, None]
        take = jnp.clip(new_pos - start[:, None], 0, t - 1)[:, :, None, None]
        at = index if cache["k"].shape[len(index)] == b else (*index, slice(0, b))  # the plain form when whole
        cache = {"k": cache["k"].at[at].set(jnp.where(from_chunk, jnp.take_along_axis(k, take, axis=1), old_k)),
                 "v": cache["v"].at[at].set(jnp.where(from_chunk, jnp.take_along_axis(v, take, axis=1), old_v))}
    sink = p["sink"].astype(jnp.float32).reshape(hkv, g) if spec.sink else None
    out = attend(q.reshape(b, t, hkv, g, spec.head_dim), keys, values, mask, sink, spec.head_dim ** -0.5)
    return matmul(out.reshape(b, t, spec.num_heads * spec.v_head_dim), p["wo"]), cache
