"""The fused decode-layer kernels (pallas_kernels/decode_layer.py) in interpret mode == their jnp references:
full and sliding (ring wrap-around) caches, sinks, partial RoPE with q/k dim != v dim, GQA with a group that is
not a power of two, and a padded MLP grid."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_layer as dl

F32, BF16 = jnp.float32, jnp.bfloat16

SMOL = dl.Geometry(hidden=128, num_heads=6, num_kv_heads=2, head_dim=32, v_head_dim=32, rope_dim=32,
                   rope_theta=10000.0, window=None, sink=False, value_scale=1.0, eps=1e-5, intermediate=96,
                   bk=32, bn=32, bi=32, bs=32)
MIMO_SWA = dl.Geometry(hidden=64, num_heads=4, num_kv_heads=2, head_dim=48, v_head_dim=16, rope_dim=32,
                       rope_theta=500.0, window=20, sink=True, value_scale=0.7, eps=1e-6, bk=32, bn=32, bs=16)
MIMO_FULL = dl.Geometry(hidden=64, num_heads=8, num_kv_heads=1, head_dim=48, v_head_dim=16, rope_dim=32,
                        rope_theta=500.0, window=None, sink=False, value_scale=0.7, eps=1e-6, bk=32, bn=32, bs=16)


@pytest.fixture
def fresh_traces():
    """The kernels' jits read decode_layer.DOTS when they trace: start and leave each test with no cached trace."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def _uses_dots(fn) -> bool:
    """Whether the kernel traced by fn() multiplies with dots (the DOTS form) rather than FMAs only."""
    return "dot_general" in str(jax.make_jaxpr(fn)())


def _setup(g, size, layers=3, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 12)
    h = g.hidden
    n = lambda k, shape, s=1.0: (s * jax.random.normal(k, shape, F32))
    w = {"norm": (1 + 0.1 * n(ks[0], (layers, h))).astype(BF16),
         "wq": n(ks[1], (layers, h, g.num_heads * g.head_dim), h ** -0.5).astype(BF16),
         "wk": n(ks[2], (layers, h, g.num_kv_heads * g.head_dim), h ** -0.5).astype(BF16),
         "wv": n(ks[3], (layers, h, g.num_kv_heads * g.v_head_dim), h ** -0.5).astype(BF16),
         "wo": n(ks[4], (layers, g.num_heads * g.v_head_dim, h), 0.1).astype(BF16),
         "sink": n(ks[5], (layers, g.num_heads)),
         "ck": n(ks[6], (layers, 1, size, g.num_kv_heads, g.head_dim)).astype(BF16),
         "cv": n(ks[7], (layers, 1, size, g.num_kv_heads, g.v_head_dim)).astype(BF16),
         "x": n(ks[8], (h,))}
    if g.intermediate:
        w.update(wg=n(ks[10], (layers, h, g.intermediate), h ** -0.5).astype(BF16),
                 wu=n(ks[11], (layers, h, g.intermediate), h ** -0.5).astype(BF16),
                 wd=n(ks[0], (layers, g.intermediate, h), g.intermediate ** -0.5).astype(BF16))
    return w


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6)
    assert err < tol, err


@pytest.mark.parametrize("g,size,pos", [(SMOL, 64, 0), (SMOL, 64, 40), (MIMO_SWA, 32, 5), (MIMO_SWA, 32, 77),
                                        (MIMO_FULL, 64, 63)])
@pytest.mark.parametrize("dot", [False, True])
def test_attention_kernels_match_reference(monkeypatch, fresh_traces, g, size, pos, dot):
    monkeypatch.setattr(dl, "DOTS", dot)  # the products as FMAs, or as pipelined 16-row dots
    assert dl.supported(g) is None
    w = _setup(g, size)
    layer, p = jnp.array([1], jnp.int32), jnp.array([pos], jnp.int32)
    q0 = jnp.zeros((g.num_kv_heads, g.group_pad, g.head_dim), BF16)
    args = (layer, p, w["x"], w["norm"], w["wq"], w["wk"], w["wv"])
    assert _uses_dots(lambda: dl.attn_in(*args, q0, w["ck"], w["cv"], g=g, interpret=True)) == dot
    got = dl.attn_in(*args, q0, w["ck"], w["cv"], g=g, interpret=True)
    want = dl.reference_attn_in(*args, q0, w["ck"], w["cv"], g=g)
    for a, b in zip(got, want):
        _close(a, b, 2e-2)  # bf16 outputs: one rounding apart at most
    slot = pos % size
    np.testing.assert_array_equal(np.asarray(got[1][0]), np.asarray(w["ck"][0]))  # other layers untouched
    assert not np.allclose(np.asarray(got[1][1, 0, slot]), np.asarray(w["ck"][1, 0, slot]))
    sink = dl.sink_table(w["sink"], g)
    q, ck, cv = want
    out, acc = dl.attn_out(layer, p, w["x"], q, ck, cv, sink, w["wo"], g=g, interpret=True)
    ref = dl.reference_attn_out(layer, p, w["x"], q, ck, cv, sink, w["wo"], g=g)
    _close(out, ref, 1e-2)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(out))


def test_attention_sees_exactly_the_window():
    """Changing a key just outside the window changes nothing; one just inside does."""
    g, size, pos = MIMO_SWA, 32, 77
    w = _setup(g, size)
    layer, p = jnp.array([0], jnp.int32), jnp.array([pos], jnp.int32)
    q = jax.random.normal(jax.random.PRNGKey(3), (g.num_kv_heads, g.group_pad, g.head_dim)).astype(BF16)
    sink = dl.sink_table(w["sink"], g)
    run = lambda ck: dl.attn_out(layer, p, w["x"], q, ck, w["cv"], sink, w["wo"], g=g, interpret=True)[0]
    base = run(w["ck"])
    outside, inside = (pos - g.window - 1) % size, (pos - g.window) % size
    np.testing.assert_array_equal(np.asarray(run(w["ck"].at[0, 0, outside].add(5.0))), np.asarray(base))
    assert not np.allclose(np.asarray(run(w["ck"].at[0, 0, inside].add(5.0))), np.asarray(base))


@pytest.mark.parametrize("dot", [False, True])
def test_mlp_kernel_matches_reference(monkeypatch, fresh_traces, dot):
    """Both forms of the MLP kernel: FMAs, and the products as 16-row dots in pipelined loops (decode_layer.DOTS)."""
    monkeypatch.setattr(dl, "DOTS", dot)
    g = SMOL
    w = _setup(g, 64)
    layer, x = jnp.array([2], jnp.int32), w["x"]
    acc = x + 1.0  # the residual the MLP output is added to
    assert _uses_dots(lambda: dl.mlp(layer, x, acc, w["norm"], w["wg"], w["wu"], w["wd"], g=g, interpret=True)) == dot
    got = dl.mlp(layer, x, acc, w["norm"], w["wg"], w["wu"], w["wd"], g=g, interpret=True)
    want = dl.reference_mlp(layer, x, acc, w["norm"], w["wg"], w["wu"], w["wd"], g=g)
    _close(got - acc, want - acc, 1e-2)


@pytest.mark.parametrize("dot", [False, True])
def test_kernels_lower_for_the_gpu(monkeypatch, fresh_traces, dot):
    """The three kernels lower to Triton IR for a GPU (on this CPU), with the products as FMAs or as dots."""
    monkeypatch.setattr(dl, "DOTS", dot)
    g, size, S = SMOL, 64, jax.ShapeDtypeStruct
    w = jax.tree_util.tree_map(lambda a: S(a.shape, a.dtype), _setup(g, size))
    i32 = S((1,), jnp.int32)
    q0 = S((g.num_kv_heads, g.group_pad, g.head_dim), BF16)
    lower = lambda f, *a: jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
    text = lower(lambda *a: dl.attn_in(*a, g=g), i32, i32, w["x"], w["norm"], w["wq"], w["wk"], w["wv"], q0, w["ck"],
                 w["cv"])
    assert "_attn_in_kernel" in text
    sink = S((3, g.num_kv_heads, g.group_pad), F32)
    text = lower(lambda *a: dl.attn_out(*a, g=g), i32, i32, w["x"], q0, w["ck"], w["cv"], sink, w["wo"])
    assert "_attn_out_kernel" in text
    text = lower(lambda *a: dl.mlp(*a, g=g), i32, w["x"], w["x"], w["norm"], w["wg"], w["wu"], w["wd"])
    assert "_mlp_kernel" in text
