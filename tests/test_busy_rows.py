"""Expert kernels' default configs for pairs of which only some do work (expert parallelism: the pairs held on
another device skip): K is split for the busy rows, and the results do not change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import quant as Q
from pallas_kernels import int4_matmul as IM


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("fmt", ["int4_sym", "mxfp4"])
def test_fewer_busy_pairs_split_k_further(fmt, layout):
    gs = 32 if fmt == "mxfp4" else 128
    for nw, (K, N) in ((2, (4096, 2048)), (1, (2048, 4096))):  # gate/up, down at Flash / mid_mimo shapes
        all8 = IM.routed_m1_config(fmt, 8, K, N, gs, nw, layout)
        busy4 = IM.routed_m1_config(fmt, 4, K, N, gs, nw, layout)
        assert busy4.split_k == 2 * all8.split_k, (nw, all8, busy4)
    g8 = IM.default_grouped_config(8, 2048, 4096, gs, 128)
    g4 = IM.default_grouped_config(8, 2048, 4096, gs, 128, busy_rows=4)
    assert g4.split_k == 2 * g8.split_k and g4.bm == g8.bm


@pytest.mark.parametrize("fmt", ["int4_asym", "mxfp4"])
def test_busy_rows_change_the_split_not_the_result(fmt):
    """Interpret mode, decode pairs with half of them skipped (id E), as one device of two sees them."""
    E, K, N, gs = 4, 256, 64, 32
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    wg, wu = (Q.quantize(jax.random.normal(kk, (E, K, N)) * 0.1, fmt, gs) for kk in k[:2])
    wd = Q.quantize(jax.random.normal(k[2], (E, N, K)) * 0.1, fmt, gs)
    x = jax.random.normal(k[3], (8, K), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.array([0, E, 2, E, 3, E, 1, E], jnp.int32)
    for busy in (None, 4):
        h = Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="interpret", busy_rows=busy)
        y = Q.pair_qmatmul(h, wd, ids, impl="interpret", busy_rows=busy)
        if busy is None:
            ref_h, ref_y = np.asarray(h, np.float32), np.asarray(y, np.float32)
            assert np.all(ref_y[1::2] == 0) and np.abs(ref_y[0::2]).max() > 0
        else:
            np.testing.assert_allclose(np.asarray(h, np.float32), ref_h, rtol=1e-2, atol=1e-2 * np.abs(ref_h).max())
            np.testing.assert_allclose(np.asarray(y, np.float32), ref_y, rtol=1e-2, atol=1e-2 * np.abs(ref_y).max())
