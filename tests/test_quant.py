"""4-bit formats: pack/unpack, quantize error, GGUF Q4_0/Q4_1 exactness, pytree behaviour, XLA paths."""
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import quant as Q


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_pack_unpack_roundtrip():
    q = jax.random.randint(jax.random.PRNGKey(0), (2, 128, 48), 0, 16).astype(jnp.uint8)
    for gs in (32, 64, 128):
        p = Q.pack_codes(q, gs)
        assert p.shape == (2, 64, 48) and p.dtype == jnp.uint8
        np.testing.assert_array_equal(Q.unpack_codes(p, gs), q)


@pytest.mark.parametrize("fmt,gs,bound", [("int4_sym", 32, 0.10), ("int4_sym", 128, 0.12),
                                          ("int4_asym", 64, 0.10), ("mxfp4", 32, 0.13)])
def test_quantize_error_reported_and_bounded(fmt, gs, bound):
    w = jax.random.normal(jax.random.PRNGKey(1), (256, 64), jnp.float32).astype(jnp.bfloat16)
    qw = Q.quantize(w, fmt, gs)
    assert qw.shape == (256, 64) and qw.dtype == "bfloat16" and qw.fmt == fmt
    err = Q.quantization_error(w, qw)
    assert 0.01 < err["rel_rms"] < bound, err
    assert err["snr_db"] > 15
    # requantizing the dequantized weight is a fixed point (the grid is representable)
    again = Q.quantize(Q.dequantize(qw, jnp.float32), fmt, gs)
    np.testing.assert_allclose(Q.dequantize(again, jnp.float32), Q.dequantize(qw, jnp.float32), rtol=1e-3,
                               atol=1e-6)


def test_mxfp4_values_exact_on_grid():
    # values that are e2m1 times a power of two quantize exactly
    vals = np.array(Q.E2M1_VALUES.tolist() + [-v for v in Q.E2M1_VALUES], np.float32)
    w = np.resize(vals, (64, 8)) * np.float32(2.0 ** -3)
    w[0] = 6 * 2.0 ** -3  # make every group's amax 6 * 2^-3
    w[32] = -6 * 2.0 ** -3
    qw = Q.quantize(w, "mxfp4", 32)
    np.testing.assert_array_equal(np.asarray(Q.dequantize(qw, jnp.float32)), w)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_gguf_blocks_load_exactly(kind):
    qt = gguf.GGMLQuantizationType.Q4_0 if kind == "q4_0" else gguf.GGMLQuantizationType.Q4_1
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 48, 96)).astype(np.float32)  # [experts, out, in] in torch order
    blocks = gguf.quants.quantize(w, qt)
    ref = gguf.quants.dequantize(blocks, qt)  # [3, 48, 96]
    make = Q.from_gguf_q4_0 if kind == "q4_0" else Q.from_gguf_q4_1
    qw = make(blocks, w.shape)
    assert qw.shape == (3, 96, 48) and qw.group_size == 32
    np.testing.assert_array_equal(np.asarray(Q.dequantize(qw, jnp.float32)), np.swapaxes(ref, -1, -2))
    with pytest.raises(ValueError, match="bytes"):
        make(blocks[..., :-1], w.shape)


def test_pytree_jit_and_scan_over_stacked_layers():
    L, K, N = 3, 64, 32
    w = jax.random.normal(jax.random.PRNGKey(2), (L, K, N), jnp.float32)
    qw = Q.quantize(w, "int4_asym", 32)
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 3 and all(leaf.shape[0] == L for leaf in leaves)
    assert qw[1].shape == (K, N)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, K), jnp.float32)

    @jax.jit
    def run(x, stacked):
        return jax.lax.scan(lambda h, wl: (Q.qmatmul(h, wl, impl="xla"), None), x, stacked)[0]

    Ksq = Q.quantize(jax.random.normal(jax.random.PRNGKey(4), (L, K, K)), "int4_sym", 32)
    out = run(x, Ksq)
    h = x
    for i in range(L):
        h = h @ Q.dequantize(Ksq[i], jnp.float32)
    np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-4)
    mapped = jax.tree_util.tree_map(lambda a: a[:2], qw)
    assert isinstance(mapped, Q.QuantizedWeight) and mapped.shape == (2, K, N)


def test_xla_paths_match_dequantized_reference():
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 64), jnp.float32)
    qw = Q.quantize(jax.random.normal(jax.random.PRNGKey(6), (64, 48)), "mxfp4", 32)
    ref = x @ Q.dequantize(qw, jnp.float32)
    np.testing.assert_allclose(Q.qmatmul(x, qw, impl="xla"), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Q.qmatmul(x, Q.dequantize(qw, jnp.float32)), ref, rtol=1e-5, atol=1e-5)
    we = Q.quantize(jax.random.normal(jax.random.PRNGKey(7), (4, 64, 48)), "int4_sym", 64)
    xs = x.reshape(6, 64)
    gsz = jnp.array([2, 0, 3, 1], jnp.int32)
    ref = jax.lax.ragged_dot(xs, Q.dequantize(we, jnp.float32), gsz)
    np.testing.assert_allclose(Q.ragged_qmatmul(xs, we, gsz, impl="xla"), ref, rtol=1e-5, atol=1e-5)
    h = Q.ragged_qmatmul_gate_up(xs, we, we, gsz, impl="xla")
    np.testing.assert_allclose(h, jax.nn.silu(ref) * ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_formats_raise():
    with pytest.raises(ValueError, match="K=48"):
        Q.quantize(jnp.ones((48, 16)), "int4_sym", 32)
    with pytest.raises(ValueError, match="unknown 4-bit format"):
        Q.quantize(jnp.ones((64, 16)), "int3", 32)
    with pytest.raises(ValueError, match="mxfp4"):
        Q.quantize(jnp.ones((64, 16)), "mxfp4", 64)
    qw = Q.quantize(jnp.ones((64, 16)), "int4_sym", 32)
    with pytest.raises(ValueError, match="K=64"):
        Q.qmatmul(jnp.ones((2, 32)), qw)
