"""The "nk" stored layout of 4-bit weights (packed [.., N, K/2]): the same bits as "kn" through quantize,
dequantize, the GGUF and MXFP4 imports, the pytree, the Pallas kernels (interpret mode) and the model."""
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import quant as Q
from mimo_jax import quantize_model
from pallas_kernels import int4_matmul as IM

FORMATS = ("int4_sym", "int4_asym", "mxfp4")


def _group(fmt):
    return 32 if fmt == "mxfp4" else 64


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_dequantize_and_convert_exactly(fmt):
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 256, 48), jnp.float32)
    kn, nk = Q.quantize(w, fmt, _group(fmt)), Q.quantize(w, fmt, _group(fmt), layout="nk")
    assert (kn.layout, nk.layout) == ("kn", "nk") and nk.shape == kn.shape == (3, 256, 48)
    assert nk.packed.shape == (3, 48, 128) and nk.scales.shape == kn.scales.shape
    np.testing.assert_array_equal(np.asarray(nk.packed), np.swapaxes(np.asarray(kn.packed), -1, -2))
    np.testing.assert_array_equal(Q.dequantize(nk, jnp.float32), Q.dequantize(kn, jnp.float32))
    back = Q.to_layout(nk, "kn")
    assert back.layout == "kn" and np.array_equal(np.asarray(back.packed), np.asarray(kn.packed))
    assert Q.to_layout(kn, "kn") is kn
    host = Q.to_layout(jax.tree_util.tree_map(np.asarray, kn), "nk")  # numpy stays numpy, made contiguous
    assert isinstance(host.packed, np.ndarray) and host.packed.flags.c_contiguous
    jitted = Q.quantize_jit(w[0], fmt=fmt, group_size=_group(fmt), layout="nk")
    np.testing.assert_array_equal(np.asarray(jitted.packed), np.asarray(nk.packed[0]))
    with pytest.raises(ValueError, match="layout 'mn'"):
        Q.quantize(w, fmt, _group(fmt), layout="mn")


def test_layout_is_static_pytree_metadata():
    w = Q.quantize(jax.random.normal(jax.random.PRNGKey(1), (3, 64, 64)), "int4_sym", 32, layout="nk")
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert jax.tree_util.tree_unflatten(treedef, leaves).layout == "nk" and len(leaves) == 2
    assert w[1].layout == "nk" and w[1].shape == (64, 64) and w[1].packed.shape == (64, 32)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 64), jnp.float32)

    @jax.jit
    def run(x, stacked):  # the scan slices the leading (layer) dim of every array, layout kept
        return jax.lax.scan(lambda h, wl: (Q.qmatmul(h, wl, impl="xla"), None), x, stacked)[0]

    h = x
    for i in range(3):
        h = h @ Q.dequantize(w[i], jnp.float32)
    np.testing.assert_allclose(run(x, w), h, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(run(x, w), run(x, Q.to_layout(w, "kn")))


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_gguf_import_in_either_layout(kind):
    qt = gguf.GGMLQuantizationType.Q4_0 if kind == "q4_0" else gguf.GGMLQuantizationType.Q4_1
    w = np.random.default_rng(0).standard_normal((2, 48, 96)).astype(np.float32)  # [experts, out, in]
    blocks = gguf.quants.quantize(w, qt)
    make = Q.from_gguf_q4_0 if kind == "q4_0" else Q.from_gguf_q4_1
    kn, nk = make(blocks, w.shape), make(blocks, w.shape, layout="nk")
    assert nk.layout == "nk" and nk.packed.shape == (2, 48, 48)
    # "nk" is GGUF's own byte order: each block's 16 nibble bytes, blocks in order along `in`
    head = 2 if kind == "q4_0" else 4
    raw = np.asarray(blocks, np.uint8).reshape(2, 48, 96 // 32, -1)[..., head:].reshape(2, 48, 48)
    np.testing.assert_array_equal(np.asarray(nk.packed), raw)
    ref = np.swapaxes(gguf.quants.dequantize(blocks, qt), -1, -2)
    np.testing.assert_array_equal(Q.dequantize(nk, jnp.float32), ref)
    np.testing.assert_array_equal(Q.dequantize(kn, jnp.float32), ref)


def test_mxfp4_blocks_round_trip_through_nk():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 40, 64), dtype=np.uint8)       # [E, out, in/2]
    scales = rng.integers(120, 134, (3, 40, 4), dtype=np.uint8)      # [E, out, in/32]
    nk = Q.from_mxfp4_blocks(blocks, scales, layout="nk")
    kn = Q.from_mxfp4_blocks(blocks, scales)
    assert nk.layout == "nk" and nk.shape == (3, 128, 40)
    np.testing.assert_array_equal(Q.dequantize(nk, jnp.float32), Q.dequantize(kn, jnp.float32))
    b2, s2 = Q.to_mxfp4_blocks(nk)
    np.testing.assert_array_equal(b2, blocks)
    np.testing.assert_array_equal(s2, scales)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernels_read_nk_as_kn(fmt):
    """Interpret mode: every kernel path (decode pairs -> int4_m1 with the M1_NK forms, the grouped kernel with
    group sizes and a row scale, dense) gives the same result from either layout, and matches the reference.
    Odd M, an expert with no rows, and a skipped pair (id E) included."""
    E, K, N, gs = 4, 256, 64, _group(fmt)
    kw = jax.random.split(jax.random.PRNGKey(3), 4)
    wg, wu = (Q.quantize(jax.random.normal(k, (E, K, N)) * 0.1, fmt, gs) for k in kw[:2])
    wd = Q.quantize(jax.random.normal(kw[2], (E, N, K)) * 0.1, fmt, gs)
    x = jax.random.normal(kw[3], (5, K), jnp.float32).astype(jnp.bfloat16)
    nk = lambda w: Q.to_layout(w, "nk")  # noqa: E731
    ids = jnp.array([2, 0, E, 3, 1], jnp.int32)
    deq = lambda w: Q.dequantize(w, jnp.float32)  # noqa: E731
    xf = x.astype(jnp.float32)

    def check(got_nk, got_kn, ref):
        got_nk, got_kn = np.asarray(got_nk, np.float32), np.asarray(got_kn, np.float32)
        assert _rel(got_nk, ref) < 2e-2, _rel(got_nk, ref)
        np.testing.assert_allclose(got_nk, got_kn, rtol=2e-2, atol=2e-2 * np.abs(ref).max())

    # decode pairs: fused gate/up and down (int4_m1, routed with the nk forms)
    h_ref = np.stack([np.zeros(N) if e == E else
                      np.asarray(jax.nn.silu(xf[r] @ deq(wg[e])) * (xf[r] @ deq(wu[e])))
                      for r, e in enumerate(np.asarray(ids))])
    check(Q.pair_qmatmul_gate_up(x, nk(wg), nk(wu), ids, impl="interpret"),
          Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="interpret"), h_ref)
    h = jnp.asarray(h_ref, jnp.bfloat16)
    d_ref = np.stack([np.zeros(K) if e == E else np.asarray(h[r].astype(jnp.float32) @ deq(wd[e]))
                      for r, e in enumerate(np.asarray(ids))])
    check(Q.pair_qmatmul(h, nk(wd), ids, impl="interpret"), Q.pair_qmatmul(h, wd, ids, impl="interpret"), d_ref)
    # verify / prefill: the grouped kernel (rows sorted by expert; expert 1 has none)
    gsz = jnp.array([2, 0, 1, 2], jnp.int32)
    scale = jnp.array([0.5, 1.0, 0.25, 2.0, 1.5], jnp.float32)
    g_ref = jax.lax.ragged_dot(xf, deq(wg), gsz)
    u_ref = jax.lax.ragged_dot(xf, deq(wu), gsz)
    check(Q.ragged_qmatmul_gate_up(x, nk(wg), nk(wu), gsz, scale, impl="interpret"),
          Q.ragged_qmatmul_gate_up(x, wg, wu, gsz, scale, impl="interpret"),
          np.asarray(jax.nn.silu(g_ref) * u_ref * scale[:, None]))
    check(Q.ragged_qmatmul(x, nk(wg), gsz, impl="interpret"), Q.ragged_qmatmul(x, wg, gsz, impl="interpret"),
          np.asarray(g_ref))
    # dense, M = 3
    check(Q.qmatmul(x[:3], nk(wg[0]), impl="interpret"), Q.qmatmul(x[:3], wg[0], impl="interpret"),
          np.asarray(xf[:3] @ deq(wg[0])))
    # a gate in one layout and an up in the other: not fused, still right
    check(Q.pair_qmatmul_gate_up(x, nk(wg), wu, ids, impl="interpret"),
          Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="interpret"), h_ref)


def test_routed_decode_takes_the_nk_forms():
    for fmt, kind in (("int4_sym", "int4"), ("int4_asym", "int4"), ("mxfp4", "mxfp4")):
        for n_weights, (K, N) in ((2, (4096, 2048)), (1, (2048, 4096))):
            gs = 32 if fmt == "mxfp4" else 128
            cfg = IM.routed_m1_config(fmt, 8, K, N, gs, n_weights, "nk")
            form = IM.M1_NK[(kind, n_weights)]
            assert cfg.layout == "nk" and all(getattr(cfg, k) == v for k, v in form.items()), (fmt, n_weights, cfg)
            kn = IM.routed_m1_config(fmt, 8, K, N, gs, n_weights)
            assert (kn.layout, kn.orient) == ("kn", "xw")


def test_gemv_path_refuses_nk():
    w = Q.to_layout(Q.quantize(jax.random.normal(jax.random.PRNGKey(4), (64, 64)), "int4_sym", 32), "nk")
    with pytest.raises(ValueError, match="kn layout only"):
        IM.int4_matmul(jnp.ones((1, 64), jnp.bfloat16), w.packed, w.scales, None, fmt="int4_sym", group_size=32,
                       cfg=IM.KernelConfig(bm=1, bn=64), interpret=True, layout="nk")


@pytest.mark.parametrize("fmt", ["int4_asym"])  # the others: test_loader / test_convert nk tests
def test_model_with_nk_experts_equals_kn(fmt, monkeypatch):
    from pathlib import Path

    from mimo_jax import model
    from mimo_jax.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_mimo.json")
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    kn = quantize_model.quantize_experts(params, fmt, 32, layout="kn")
    monkeypatch.setattr(quantize_model, "EXPERT_LAYOUT", "nk")  # the table's default for every format
    nk = quantize_model.quantize_experts(params, fmt, 32)
    is_q = lambda w: isinstance(w, Q.QuantizedWeight)  # noqa: E731
    qs = [w for w in jax.tree_util.tree_leaves(nk, is_leaf=is_q) if is_q(w)]
    assert qs and all(w.layout == "nk" for w in qs)
    for a, b in zip(qs, [w for w in jax.tree_util.tree_leaves(kn, is_leaf=is_q) if is_q(w)]):
        np.testing.assert_array_equal(np.asarray(Q.to_layout(a, "kn").packed), np.asarray(b.packed))

    def logits(p):
        pos = jnp.arange(ids.shape[1], dtype=jnp.int32)
        return np.asarray(model.forward(p, ids, pos, model.init_cache(cfg, 1, 32, jnp.float32), cfg)[0])

    np.testing.assert_array_equal(logits(nk), logits(kn))
