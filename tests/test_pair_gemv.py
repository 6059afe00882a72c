"""pallas_kernels/pair_gemv.py in interpret mode against its jnp reference: one and two weights, skip ids, splits."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gemv import GemvConfig
from pallas_kernels.pair_gemv import default_config, pair_gemv, reference


@pytest.mark.parametrize("epilogue", ["none", "silu_mul"])
@pytest.mark.parametrize("cfg", [None, GemvConfig(bn=32, bk=32, split_k=2), GemvConfig(bn=64, bk=16, split_k=1)])
def test_matches_reference(epilogue, cfg):
    E, K, N = 6, 128, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    nw = 2 if epilogue == "silu_mul" else 1
    ws = tuple((0.1 * jax.random.normal(k, (E, K, N))).astype(jnp.bfloat16) for k in keys[:nw])
    x = jax.random.normal(keys[2], (5, K), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.asarray([3, 0, 6, 5, 3], jnp.int32)  # a repeat, and 6 = E: the skip id of expert parallelism
    got = np.asarray(pair_gemv(x, ws, ids, cfg=cfg, interpret=True, epilogue=epilogue), np.float32)
    want = np.asarray(reference(x, ws, ids, epilogue))
    assert np.all(got[2] == 0) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_default_config_splits_for_few_pairs():
    cfg = default_config(8, 4096, 2048, 2)
    assert cfg.split_k >= 2 and 4096 % (cfg.bk * cfg.split_k) == 0


def test_refuses_mismatched_weights():
    w = jnp.zeros((2, 64, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="epilogue"):
        pair_gemv(jnp.zeros((1, 64), jnp.bfloat16), (w,), jnp.zeros((1,), jnp.int32), epilogue="silu_mul",
                  interpret=True)


def test_quant_pair_products_route_float_experts_to_the_kernel(monkeypatch):
    """With quant.PAIR_GEMV_FLOAT (off until timed on a GPU), quant.pair_qmatmul(_gate_up) with unquantized stacks
    run pair_gemv (interpret here; the GPU's "auto") and equal XLA's take + einsum, skip ids included."""
    from mimo_jax import quant as Q

    monkeypatch.setattr(Q, "PAIR_GEMV_FLOAT", True)
    E, K, N = 5, 64, 96
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    wg, wu = ((0.1 * jax.random.normal(k, (E, K, N))).astype(jnp.bfloat16) for k in keys[:2])
    wd = (0.1 * jax.random.normal(keys[2], (E, N, K))).astype(jnp.bfloat16)
    x = jax.random.normal(keys[3], (4, K), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.asarray([4, 1, 5, 0], jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda x, a, b, i: Q.pair_qmatmul_gate_up(x, a, b, i, impl="interpret"))(x, wg, wu, ids))
    assert "pair_gemv" in jaxpr
    for impl in ("interpret", "xla"):
        h = Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl=impl)
        y = Q.pair_qmatmul(h, wd, ids, impl=impl)
        if impl == "interpret":
            got = (np.asarray(h, np.float32), np.asarray(y, np.float32))
    h_ref = Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="xla")
    y_ref = Q.pair_qmatmul(h_ref, wd, ids, impl="xla")
    for a, b in zip(got, (h_ref, y_ref)):
        b = np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2 * np.abs(b).max())
    assert np.all(got[1][2] == 0)


def test_moe_decode_runs_float_experts_in_two_kernels(monkeypatch):
    """One token through moe.experts with unquantized stacks and the kernel on (its 'auto' made 'interpret' here):
    gate/up fused in one pair_gemv call and down in another, reading the layer's experts from the whole stack;
    == the XLA path."""
    from mimo_jax import moe
    from mimo_jax import quant as Q

    L, E, H, I, k = 2, 6, 64, 32, 3
    keys = jax.random.split(jax.random.PRNGKey(4), 5)
    stack = {"w_gate": (0.2 * jax.random.normal(keys[0], (L, E, H, I))).astype(jnp.bfloat16),
             "w_up": (0.2 * jax.random.normal(keys[1], (L, E, H, I))).astype(jnp.bfloat16),
             "w_down": (0.2 * jax.random.normal(keys[2], (L, E, I, H))).astype(jnp.bfloat16)}
    x = jax.random.normal(keys[3], (1, H), jnp.float32).astype(jnp.bfloat16)
    weights = jax.nn.softmax(jax.random.normal(keys[4], (1, k)), axis=-1)
    ids = jnp.asarray([[5, 0, 2]], jnp.int32)
    run = lambda: moe.experts(stack, (1,), x, weights, ids)  # noqa: E731
    want = np.asarray(run(), np.float32)
    monkeypatch.setattr(Q, "PAIR_GEMV_FLOAT", True)
    real_impl = Q._impl
    monkeypatch.setattr(Q, "_impl", lambda impl: "interpret" if impl == "auto" else real_impl(impl))
    jaxpr = str(jax.make_jaxpr(run)())
    calls = re.findall(r"jaxpr=pair_gemv\d*", jaxpr)  # gate/up fused: 2 calls (unfused: gate, up, down = 3)
    assert len(calls) == 2, calls
    got = np.asarray(run(), np.float32)
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * np.abs(want).max())
