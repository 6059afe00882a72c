"""Attention of a few new tokens (decode T = 1, verify T = k + 1 <= 16) over a KV cache, one Pallas kernel.

XLA runs this part of a decode step as ~8 small kernels per layer (q.k dot, transposes, mask, max, exp-sum,
divide, p.v dot, each 1.5-3 us on an H200; benchmarks/profile_step.py), for a few hundred KB of cache. Here it
is one kernel: a program per (batch row, kv head, key split) holds the T x G query rows of its kv head (GQA: the
G query heads sharing it), walks the keys in blocks with an online softmax, and writes the output rows:

    p_ts = exp(a_ts - m) / (exp(sink - m) + sum_s' exp(a_ts' - m))      (layers.attend's math)

The sink enters as the running max's and denominator's starting values (m = sink, l = 1; m = -inf, l = 0 without
one). Keys come from up to two sources, each with the positions it holds:
  - the layer's cache, read in place from the whole stacked cache ([L, B, S, Hkv, D]) at the layer index (an
    operand: no per-layer slice is copied); positions = slots (full layers) or given (a sliding ring);
  - the new chunk's own keys (sliding layers, whose ring is rebuilt after attention).
Visible: 0 <= key position <= query position (and >= query position - window). A row with nothing visible
(padding, position -1) comes out zero. Long caches split over programs (`splits`): each writes its running
(acc, max, sum) and one small XLA fusion combines them.

D need not be a power of two (MiMo's 192 = 128 + 64): q.k runs as one dot per power-of-two part.

Status: correct (tests/test_attention_kernel.py) but NOT used by the model. Routed into layers.attention on one
H200 it made every step slower (BENCHMARKS.md, 2026-11-22): 6-8 us per call at decode against ~1.5 us per XLA
fusion it replaced (a handful of programs, each a serial chain of dependent loads and reductions), and 104 us
at a 9-token verify of 16-head groups (256 padded rows: the f32 accumulator spills). What would make it pay:
more programs per kv head (split the keys at decode too, rows per program <= 64) and folding in the RoPE and
cache write it leaves to XLA.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32, BF16 = jnp.float32, jnp.bfloat16
NEG = float("-inf")


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    bs: int = 64            # keys per loop step
    splits: int = 1         # programs along the cache's keys
    num_warps: int = 4
    num_stages: int = 2


def default_config(cache_len: int, programs: int, n_sms: int = 132) -> AttnConfig:
    """Split long caches until ~1 program per SM, keeping >= 256 keys per split."""
    splits = 1
    while programs * splits * 2 <= n_sms and cache_len // (splits * 2) >= 256:
        splits *= 2
    return AttnConfig(splits=splits)


def pow2_parts(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) power-of-two parts >= 16 covering d (192 -> (0, 128), (128, 64)); () if impossible."""
    parts, off = [], 0
    for bit in reversed(range(4, 12)):
        size = 1 << bit
        if d - off >= size:
            parts.append((off, size))
            off += size
    return tuple(parts) if off == d else ()


def supported(t: int, group: int, d: int, dv: int) -> bool:
    return 1 <= t * group <= 256 and bool(pow2_parts(d)) and dv in (16, 32, 64, 128, 256)


def _rows(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _kernel(layer_ref, q_ref, qpos_ref, sink_ref, *refs, sources, window, scale, cfg, parts, n_rows, dv, split_out):
    """sources: per key source (has_pos, length, steps); refs: per source k, v[, pos], then the outputs."""
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    li = layer_ref[0]
    qs = [q_ref[b, h, :, pl.ds(off, size)] for off, size in parts]           # [R, size] each
    qpos = qpos_ref[b, :]                                                     # [R] int32, -1 = padding row
    sink = sink_ref[h, :]                                                     # [R] f32, -inf = none
    first = sp == 0
    m = jnp.where(first, sink, NEG)
    l = jnp.where(first & (sink > NEG), 1.0, 0.0).astype(F32)
    acc = jnp.zeros((n_rows, dv), F32)
    i = 0
    for si, (has_pos, length, steps, stacked) in enumerate(sources):
        k_ref, v_ref = refs[i], refs[i + 1]
        pos_ref = refs[i + 2] if has_pos else None
        i += 3 if has_pos else 2
        start = sp * (steps * cfg.bs) if si == 0 else 0
        lead = (li, b) if stacked else (b,)

        def body(j, carry, k_ref=k_ref, v_ref=v_ref, pos_ref=pos_ref, start=start, length=length, lead=lead,
                 has_pos=has_pos, si=si):
            m, l, acc = carry
            s0 = start + j * cfg.bs
            ks = s0 + jnp.arange(cfg.bs)
            valid = ks < length
            s = None
            for (off, size), q in zip(parts, qs):
                k = plgpu.load(k_ref.at[(*lead, pl.ds(s0, cfg.bs), h, pl.ds(off, size))], mask=valid[:, None],
                               other=0.0)
                d = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32)
                s = d if s is None else s + d
            s = s * scale
            if has_pos:
                kp = plgpu.load(pos_ref.at[b, pl.ds(s0, cfg.bs)], mask=valid, other=-1)
            else:
                kp = jnp.where(valid, ks, -1)
            vis = (kp[None, :] >= 0) & (kp[None, :] <= qpos[:, None])
            if window is not None:
                vis = vis & (kp[None, :] >= qpos[:, None] - window)
            if si > 0:  # the chunk's keys: once, in the first split
                vis = vis & first
            s = jnp.where(vis, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == NEG, 0.0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[:, None])
            l = l * alpha + jnp.sum(p, axis=1)
            v = plgpu.load(v_ref.at[(*lead, pl.ds(s0, cfg.bs), h, slice(None))], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)
            return m_new, l, acc

        m, l, acc = jax.lax.fori_loop(0, steps, body, (m, l, acc))
    outs = refs[i:]
    if split_out:
        o_ref, m_out, l_out = outs
        o_ref[sp, b, h] = acc
        m_out[sp, b, h] = m
        l_out[sp, b, h] = l
    else:
        (o_ref,) = outs
        o_ref[b, h] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)


def attend_cached(q, cache_k, cache_v, layer, qpos, *, cache_pos=None, chunk=None, sink=None, window=None,
                  scale: float, cfg: AttnConfig | None = None, interpret: bool = False):
    """q [B, T, Hkv, G, D]; cache_k/v [L, B, S, Hkv, D/Dv] (the whole stack) read at `layer` (int32 scalar);
    qpos [B, T] (-1 = padding); cache_pos [B, S] positions held by the cache slots (None: slot = position);
    chunk = (k [B, T, Hkv, D], v, pos [B, T]) extra keys (a sliding layer's new tokens) or None; sink [Hkv, G]
    f32 or None; window: keys older than qpos - window are hidden. -> [B, T, Hkv, G, Dv] in v's dtype."""
    B, T, Hkv, G, D = q.shape
    L, _, S, _, Dv = cache_v.shape
    R = _rows(T * G)
    parts = pow2_parts(D)
    cfg = cfg or default_config(S, B * Hkv)
    if S % (cfg.splits * cfg.bs) and cfg.splits > 1:
        cfg = dataclasses.replace(cfg, splits=1)
    steps0 = -(-S // (cfg.splits * cfg.bs))
    qr = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, Hkv, T * G, D)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, R - T * G), (0, 0)))
    qpos_rows = jnp.pad(jnp.repeat(qpos.astype(jnp.int32), G, axis=1), ((0, 0), (0, R - T * G)), constant_values=-1)
    sink_rows = jnp.full((Hkv, R), NEG, F32) if sink is None else jnp.pad(
        jnp.tile(sink.astype(F32), (1, T)), ((0, 0), (0, R - T * G)), constant_values=NEG)
    args = [jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), qr, qpos_rows, sink_rows, cache_k, cache_v]
    sources = [(cache_pos is not None, S, steps0, True)]
    if cache_pos is not None:
        args.append(cache_pos.astype(jnp.int32))
    if chunk is not None:
        ck, cv, cpos = chunk
        bs_chunk = cfg.bs
        sources.append((True, ck.shape[1], -(-ck.shape[1] // bs_chunk), False))
        args += [ck, cv, cpos.astype(jnp.int32)]
    split_out = cfg.splits > 1
    if split_out:
        out_shape = [jax.ShapeDtypeStruct((cfg.splits, B, Hkv, R, Dv), F32),
                     jax.ShapeDtypeStruct((cfg.splits, B, Hkv, R), F32),
                     jax.ShapeDtypeStruct((cfg.splits, B, Hkv, R), F32)]
    else:
        out_shape = jax.ShapeDtypeStruct((B, Hkv, R, Dv), cache_v.dtype)
    out = pl.pallas_call(
        functools.partial(_kernel, sources=tuple(sources), window=window, scale=scale, cfg=cfg, parts=parts,
                          n_rows=R, dv=Dv, split_out=split_out),
        grid=(B, Hkv, cfg.splits), out_shape=out_shape, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="attend_cached",
    )(*args)
    if split_out:
        acc, m, l = out
        mt = jnp.max(m, axis=0)
        w = jnp.exp(m - jnp.where(mt == NEG, 0.0, mt)[None])
        o = jnp.sum(acc * w[..., None], axis=0) / jnp.maximum(jnp.sum(l * w, axis=0), 1e-30)[..., None]
        out = o.astype(cache_v.dtype)
    out = out[:, :, : T * G].reshape(B, Hkv, T, G, Dv)
    return jnp.transpose(out, (0, 2, 1, 3, 4))
