"""Pallas cached attention (pallas_kernels/attention.py) == layers.attend, in interpret mode on CPU; GPU lowering.
(The kernel is not routed into the model: measured slower than XLA's path on an H200, see BENCHMARKS.md.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.layers import attend, ring_positions
from pallas_kernels.attention import AttnConfig, attend_cached, pow2_parts, supported


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def _check(out, ref, tol=2e-5):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("B,T,Hkv,G,D,Dv,S,splits,sink", [
    (1, 1, 2, 8, 192, 128, 128, 1, False),   # MiMo decode shapes (D = 128 + 64), one program per kv head
    (2, 9, 2, 4, 64, 64, 256, 2, True),      # a verify over a split cache, rows at different positions
    (1, 3, 1, 16, 32, 16, 64, 1, True),
])
def test_full_cache(B, T, Hkv, G, D, Dv, S, splits, sink):
    L, layer = 3, 1
    ck, cv = _rand(1, (L, B, S, Hkv, D)), _rand(2, (L, B, S, Hkv, Dv))
    q = _rand(3, (B, T, Hkv, G, D))
    start = np.array([37, 200][:B]) if S > 128 else np.array([5][:B])
    qpos = jnp.asarray(start[:, None] + np.arange(T)[None], jnp.int32)
    qpos = qpos.at[-1, -1].set(-1) if T > 1 else qpos  # a padding row
    sk = _rand(4, (Hkv, G)) if sink else None
    scale = D ** -0.5
    out = attend_cached(q, ck, cv, layer, qpos, sink=sk, scale=scale, cfg=AttnConfig(bs=32, splits=splits),
                        interpret=True)
    mask = jnp.arange(S)[None, None, :] <= qpos[:, :, None]
    ref = attend(q, ck[layer], cv[layer], mask, sk, scale)
    _check(out, ref)
    if T > 1:
        assert not np.asarray(out[-1, -1]).any()  # the padding row is zero


@pytest.mark.parametrize("T,window,ring,sink", [(1, 16, 20, True), (9, 16, 25, True), (4, 8, 12, False)])
def test_sliding_ring_plus_chunk(T, window, ring, sink):
    B, Hkv, G, D, Dv, L, layer = 2, 2, 4, 48, 32, 2, 0
    assert pow2_parts(D) == ((0, 32), (32, 16))
    ck, cv = _rand(5, (L, B, ring, Hkv, D)), _rand(6, (L, B, ring, Hkv, Dv))
    k, v, q = _rand(7, (B, T, Hkv, D)), _rand(8, (B, T, Hkv, Dv)), _rand(9, (B, T, Hkv, G, D))
    start = jnp.array([3, 40], jnp.int32)  # a young ring (empty slots) and a wrapped one
    qpos = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    ring_pos = ring_positions(start[:, None], ring)
    sk = _rand(10, (Hkv, G)) if sink else None
    out = attend_cached(q, ck, cv, layer, qpos, cache_pos=ring_pos, chunk=(k, v, qpos), sink=sk, window=window,
                        scale=0.3, cfg=AttnConfig(bs=16), interpret=True)
    kpos = jnp.concatenate([ring_pos, qpos], axis=1)[:, None, :]
    qp = qpos[:, :, None]
    mask = (kpos >= 0) & (kpos <= qp) & (kpos >= qp - window)
    ref = attend(q, jnp.concatenate([ck[layer], k], 1), jnp.concatenate([cv[layer], v], 1), mask, sk, 0.3)
    _check(out, ref)


def test_bf16_and_support():
    assert supported(9, 16, 192, 128) and not supported(17, 16, 192, 128) and not supported(1, 8, 200, 128)
    B, T, Hkv, G, D, S = 1, 1, 2, 8, 64, 64
    ck, cv = _rand(1, (1, B, S, Hkv, D), jnp.bfloat16), _rand(2, (1, B, S, Hkv, D), jnp.bfloat16)
    q = _rand(3, (B, T, Hkv, G, D), jnp.bfloat16)
    qpos = jnp.array([[50]], jnp.int32)
    out = attend_cached(q, ck, cv, 0, qpos, scale=0.125, interpret=True)
    ref = attend(q, ck[0], cv[0], jnp.arange(S)[None, None] <= qpos[:, :, None], None, 0.125)
    assert out.dtype == jnp.bfloat16
    _check(out, ref, tol=2e-2)


def test_lowers_for_the_gpu():
    B, T, Hkv, G, D, Dv, S = 1, 9, 4, 16, 192, 128, 512
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, Hkv, G, D), jnp.bfloat16), sd((2, B, S, Hkv, D), jnp.bfloat16),
            sd((2, B, S, Hkv, Dv), jnp.bfloat16), sd((B, T), jnp.int32))
    f = jax.jit(lambda q, k, v, p: attend_cached(q, k, v, 1, p, sink=jnp.zeros((Hkv, G)), scale=0.1,
                                                 cfg=AttnConfig(splits=2)))
    assert "attend_cached" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()

