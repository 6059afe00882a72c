"""Pallas dense GEMV (pallas_kernels/gemv.py) == f32 jnp reference, in interpret mode on CPU; the GPU lowering."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import ops
from pallas_kernels.gemv import GemvConfig, check_config, default_config, gemv

TOL = 1e-2  # bf16 output against an f32 reference: ~2e-3 typical


def _case(M, K, N, key=0):
    x = jax.random.normal(jax.random.PRNGKey(key), (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(jax.random.PRNGKey(key + 1), (K, N), jnp.float32)).astype(jnp.bfloat16)
    return x, w, x.astype(jnp.float32) @ w.astype(jnp.float32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("M,K,N,cfg", [
    (1, 256, 96, GemvConfig(bn=32, bk=32)),                 # M = 1 FMA path, 8 steps
    (1, 512, 64, GemvConfig(bn=16, bk=64, split_k=4)),      # split-K partials summed outside
    (1, 256, 96, GemvConfig(bn=32, bk=32, prefetch=True)),  # the next step's tile loaded ahead
    (1, 512, 64, GemvConfig(bn=16, bk=64, split_k=4, prefetch=True)),  # 2 steps per split
    (1, 128, 32, GemvConfig(bn=32, bk=64, split_k=2, prefetch=True)),  # 1 step: no prefetch to do
    (1, 384, 128, GemvConfig(bn=64, bk=128, dot=True)),     # M = 1 as a 16-row tensor-core dot
    (1, 512, 64, GemvConfig(bn=32, bk=64, split_k=2, dot=True)),
    (1, 576, 960, None),                                    # SmolLM2's q/k/v, default config
    (3, 256, 48, GemvConfig(bn=16, bk=64, split_k=2)),      # M > 1: rows padded to 16, masked
    (9, 384, 128, GemvConfig(bn=64, bk=128)),               # a k = 8 verify
    (16, 128, 32, GemvConfig(bn=32, bk=32, split_k=2)),
])
def test_gemv_matches_reference(M, K, N, cfg):
    x, w, ref = _case(M, K, N, key=M + K)
    out = gemv(x, w, cfg=cfg, interpret=True)
    assert out.shape == (M, N) and out.dtype == jnp.bfloat16
    assert _rel(out, ref) < TOL


def test_gemv_partials_sum_to_the_product():
    x, w, ref = _case(1, 256, 32)
    cfg = GemvConfig(bn=32, bk=32, split_k=4)
    parts = gemv(x, w, cfg=cfg, interpret=True, partials=True)
    assert parts.shape == (4, 1, 32) and parts.dtype == jnp.float32
    assert _rel(parts.sum(0), ref) < 1e-5  # f32 partials: only the kernel's own f32 rounding
    # each partial is its own K range
    np.testing.assert_allclose(parts[1, 0], x[0, 64:128].astype(jnp.float32) @ w[64:128].astype(jnp.float32),
                               rtol=1e-5, atol=1e-5)


def test_default_config_splits_for_parallelism_and_rejects_bad_blocks():
    c = default_config(1, 4096, 13568)
    assert c.split_k >= 4 and (13568 // c.bn) * c.split_k >= 4 * 132
    assert default_config(1, 576, 960).split_k == 1  # 9 steps: too few to split
    with pytest.raises(ValueError, match="M <= 16"):
        check_config(17, 128, 64, GemvConfig())
    with pytest.raises(ValueError, match="not divisible"):
        check_config(1, 96, 64, GemvConfig(bk=64))


def test_matmul_keeps_xla_off_gpu_and_for_batches():
    x, w, ref = _case(1, 128, 64)
    assert not ops._use_gemv(x, w)  # CPU: XLA's dot
    assert _rel(ops.matmul(x, w), ref) < TOL


def test_gemv_lowers_for_the_gpu():
    d = default_config(1, 4096, 13568)
    cases = ((1, 4096, 13568, None), (9, 4096, 7424, None), (1, 4096, 13568, dataclasses.replace(d, prefetch=True)),
             (1, 4096, 13568, dataclasses.replace(default_config(9, 4096, 13568), dot=True)))
    for M, K, N, cfg in cases:
        args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, N), jnp.bfloat16))
        text = jax.jit(lambda x, w: gemv(x, w, cfg=cfg)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "gemv_bf16" in text


@pytest.mark.parametrize("K,N", [(64, 192), (192, 64)])
def test_gemv_route_pads_wide_products_for_xla(monkeypatch, K, N):
    """Where the GEMV route applies (a GPU), a wide product (N > K) runs as XLA's dot on x padded to
    ops.GEMV_PAD_ROWS rows (with ops.GEMV_WIDE_DOT off), the same values; a narrow one stays on the kernel
    (interpret mode here)."""
    monkeypatch.setattr(ops, "_use_gemv", lambda x, w: True)
    monkeypatch.setattr(ops, "GEMV_WIDE_DOT", False)
    monkeypatch.setattr(ops, "GEMV_PAD_ROWS", 16)
    x, w, ref = _case(1, K, N)
    x3 = x.reshape(1, 1, K)
    if N > K:
        assert _rel(ops.matmul(x3, w).reshape(1, N), ref) < TOL
        text = jax.jit(ops.matmul).lower(x3, w).as_text()
        assert "16x" in text and "gemv_bf16" not in text
    else:
        import pallas_kernels.gemv as G

        calls = []
        monkeypatch.setattr(G, "gemv", lambda x, w, cfg=None: calls.append(x.shape) or gemv(x, w, interpret=True))
        assert _rel(ops.matmul(x3, w).reshape(1, N), ref) < TOL
        assert calls == [(1, K)]


def test_gemv_wide_dot_knob_routes_wide_products_to_the_kernels_dot_form(monkeypatch):
    """ops.GEMV_WIDE_DOT: a wide one-token product (N > K) runs in the kernel with gemv.wide_dot_config (x as 16
    rows, a tensor-core dot), the same values (interpret mode); a narrow one keeps the default config."""
    import pallas_kernels.gemv as G

    monkeypatch.setattr(ops, "_use_gemv", lambda x, w: True)
    monkeypatch.setattr(ops, "GEMV_WIDE_DOT", True)
    cfgs = []
    monkeypatch.setattr(G, "gemv", lambda x, w, cfg=None: cfgs.append(cfg) or gemv(x, w, cfg=cfg, interpret=True))
    for K, N in ((64, 192), (192, 64)):
        x, w, ref = _case(1, K, N)
        assert _rel(ops.matmul(x.reshape(1, 1, K), w).reshape(1, N), ref) < TOL
    assert cfgs == [G.wide_dot_config(64, 192), None]
    assert cfgs[0].dot and cfgs[0].split_k == 1 and cfgs[0].bk == 64 and cfgs[0].bn == 64


def test_mesh_pad_rows_computes_the_same(monkeypatch):
    """ops.MESH_PAD_ROWS (a one-token product of a GSPMD-sharded weight as XLA's dot on a padded x): off by
    default and off the GPU; where it applies, the same values from an 8-row dot."""
    x, w, ref = _case(1, 64, 96)
    assert ops.MESH_PAD_ROWS == 0 and not ops._pads_on_mesh(x, w)
    monkeypatch.setattr(ops, "MESH_PAD_ROWS", 8)
    assert not ops._pads_on_mesh(x, w)  # CPU, no mesh
    monkeypatch.setattr(ops, "_pads_on_mesh", lambda x, w: True)
    x3 = x.reshape(1, 1, 64)
    assert _rel(ops.matmul(x3, w).reshape(1, 96), ref) < TOL
    assert "8x64" in jax.jit(ops.matmul).lower(x3, w).as_text()
