"""pallas_kernels/int4_mgpu.py: the kernel layout (exact round trips), the jnp reference against
mimo_jax.quant.dequantize, config checks; the Mosaic GPU kernel itself against the reference on a GPU only
(Mosaic GPU kernels have no CPU interpret path here)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import quant as Q
from pallas_kernels import int4_mgpu as MG


def _qw(key, shape, gs):
    return Q.quantize(jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32), "int4_sym", gs)


@pytest.mark.parametrize("K,N,gs,bn", [(256, 128, 128, 128), (512, 256, 64, 128), (512, 512, 256, 256),
                                       (384, 256, 128, 256)])
def test_layout_round_trip_exact(K, N, gs, bn):
    qw = _qw(K + N, (K, N), gs)
    wt, st = MG.to_kernel_layout(qw.packed, qw.scales, gs, bn=bn)
    assert wt.dtype == jnp.int4 and wt.shape == (N * K // gs, gs)
    assert st.dtype == qw.scales.dtype and st.shape == (N // bn * K // gs, bn)
    p, s = MG.from_kernel_layout(wt, st, gs, K)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(qw.packed))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(qw.scales))


def test_layout_round_trip_leading_dims_and_random_bytes():
    """Every byte value (all 16 x 16 nibble pairs) survives, with stacked (expert) leading dims."""
    packed = jax.random.randint(jax.random.PRNGKey(0), (3, 128, 256), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.uniform(jax.random.PRNGKey(1), (3, 2, 256)).astype(jnp.float16)
    wt, st = MG.to_kernel_layout(packed, scales, 128, bn=128)
    assert wt.shape == (3, 256 * 256 // 128, 128)
    p, s = MG.from_kernel_layout(wt, st, 128, 256)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(packed))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(scales))
    np.testing.assert_array_equal(np.asarray(MG.from_nk(MG.to_nk(packed, 128), 128)), np.asarray(packed))


def test_tiled_layout_boxes_are_contiguous():
    """Row block (j * K/G + g) of the tiled weight is W^T[j*bn:(j+1)*bn, g*G:(g+1)*G] (codes - 8)."""
    K, N, gs, bn = 512, 256, 128, 128
    qw = _qw(3, (K, N), gs)
    wt, _ = MG.to_kernel_layout(qw.packed, qw.scales, gs, bn=bn)
    codes = np.asarray(Q.unpack_codes(qw.packed, gs)).astype(np.int32) - 8     # [K, N]
    wt = np.asarray(wt.astype(jnp.int8))
    for j in range(N // bn):
        for g in range(K // gs):
            blk = wt[(j * (K // gs) + g) * bn:(j * (K // gs) + g + 1) * bn]
            np.testing.assert_array_equal(blk, codes[g * gs:(g + 1) * gs, j * bn:(j + 1) * bn].T)


def test_reference_matches_quant_dequantize():
    K, N, gs = 512, 256, 128
    qw = _qw(5, (K, N), gs)
    wt, st = MG.to_kernel_layout(qw.packed, qw.scales, gs)
    d = MG.dequantize_kernel_layout(wt, st, gs, K)
    np.testing.assert_array_equal(np.asarray(d), np.asarray(Q.dequantize(qw, jnp.float32)))
    x = jax.random.normal(jax.random.PRNGKey(6), (3, K), jnp.float32).astype(jnp.bfloat16)
    ref = MG.reference(x, wt, st, gs, jnp.float32)
    want = jnp.dot(x.astype(jnp.float32), Q.dequantize(qw, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_default_config_fills_the_sms():
    for K, N in ((4096, 16384), (16384, 4096), (4096, 2048), (2048, 4096), (6144, 2048)):
        c = MG.default_config(1, K, N, 128)
        ctas = N // c.bn * c.split_k
        assert 64 < ctas <= 132, (K, N, c)
        MG.check(1, K, N, 128, c)


def test_check_rejects_bad_shapes():
    c = MG.default_config(1, 4096, 2048, 128)
    with pytest.raises(ValueError):
        MG.check(1, 4096, 2048, 32, c)                                # group 32: not handled here
    with pytest.raises(ValueError):
        MG.check(1, 4096, 2000, 128, c)                               # N not a multiple of BN
    with pytest.raises(ValueError):
        MG.check(1, 4096, 2048, 128, dataclasses.replace(c, split_k=3))
    with pytest.raises(ValueError):
        MG.check(300, 4096, 2048, 128, c)                             # M > 256
    with pytest.raises(NotImplementedError):
        MG.to_kernel_layout(jnp.zeros((64, 128), jnp.uint8), jnp.zeros((1, 128), jnp.float16), 128, fmt="mxfp4")


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1, 4096, 2048), (4, 2048, 4096), (9, 1024, 1024), (16, 4096, 1024),
                                   (72, 1024, 512)])
@pytest.mark.parametrize("scale_mode", ["acc", "w"])
def test_kernel_matches_reference_gpu(M, K, N, scale_mode):
    if jax.devices()[0].device_kind.find("H100") < 0 and jax.devices()[0].device_kind.find("H200") < 0:
        pytest.skip("Mosaic GPU wgmma kernel: Hopper only")
    gs = 128
    qw = _qw(M + K, (K, N), gs)
    x = jax.random.normal(jax.random.PRNGKey(N), (M, K), jnp.float32).astype(jnp.bfloat16)
    cfg = dataclasses.replace(MG.default_config(M, K, N, gs), scale_mode=scale_mode)
    out = jax.jit(lambda x: MG.qmatmul_mgpu(x, qw, cfg))(x)
    ref = x.astype(jnp.float32) @ Q.dequantize(qw, jnp.float32)
    assert out.shape == (M, N) and out.dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err < 5e-3, err
