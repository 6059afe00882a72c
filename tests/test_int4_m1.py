"""pallas_kernels.int4_m1 (one-token int4 dequant-matmul) == jnp reference, in interpret mode on CPU; the decode
pair path of int4_grouped_matmul routes to it; Triton lowering check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import quant as Q
from pallas_kernels.int4_m1 import M1Config, default_m1_config, int4_m1_matmul, to_nk
from pallas_kernels.int4_matmul import KernelConfig, routes_to_m1
from pallas_kernels.mxfp4_fold import fold_x

_GROUPED = KernelConfig(bm=16, bn=16)  # an explicit config: the grouped kernel
TOL = 1e-2  # bf16 activations and output against an f32 reference


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _case(fmt, gs, E=5, K=192, N=48, M=5):
    wg = Q.quantize(jax.random.normal(jax.random.PRNGKey(1), (E, K, N)), fmt, gs)
    wu = Q.quantize(jax.random.normal(jax.random.PRNGKey(2), (E, K, N)), fmt, gs)
    x = jax.random.normal(jax.random.PRNGKey(3), (M, K), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.array([4, 0, E, 2, 4][:M], jnp.int32)  # id E: a zero row
    pick, live = jnp.minimum(ids, E - 1), (ids < E)[:, None]
    g = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32), Q.dequantize(wg, jnp.float32)[pick]) * live
    u = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32), Q.dequantize(wu, jnp.float32)[pick]) * live
    return wg, wu, x, ids, g, u


def _arrays(w, layout):
    return ((to_nk(w.packed) if layout == "nk" else w.packed), w.scales, w.mins)


@pytest.mark.parametrize("fmt", ["int4_sym", "int4_asym"])
@pytest.mark.parametrize("orient,layout,method,split", [
    ("xw", "kn", "asm", 1), ("xw", "nk", "asm", 3), ("xw", "nk", "magic", 1),
    ("wx", "nk", "asm", 3), ("wx", "kn", "magic", 1),
])
def test_pairs_match_reference(fmt, orient, layout, method, split):
    """Odd shapes (K = 3 groups of 64, N = 48, 5 pairs), a skip id, single weight and fused SiLU(g) * u."""
    wg, wu, x, ids, g, u = _case(fmt, 64)
    cfg = M1Config(orient=orient, layout=layout, method=method, bn=16, split_k=split)
    run = lambda w, **kw: int4_m1_matmul(x, w, ids, fmt=fmt, group_size=64, cfg=cfg, interpret=True, **kw)
    y = run((_arrays(wg, layout),))
    assert y.shape == (5, 48) and y.dtype == jnp.bfloat16
    assert _rel(y, g) < TOL and not np.asarray(y[2]).any()
    h = run((_arrays(wg, layout), _arrays(wu, layout)), epilogue="silu_mul")
    assert _rel(h, jax.nn.silu(g) * u) < TOL and not np.asarray(h[2]).any()


@pytest.mark.parametrize("orient,layout,split", [("xw", "kn", 1), ("xw", "kn", 2), ("xw", "nk", 3), ("wx", "nk", 1)])
def test_mxfp4_pairs_match_reference(orient, layout, split):
    """MXFP4 (e2m1 codes, e8m0 scales per 32): K = 6 groups of 32, a skip id, single weight and fused SiLU(g) * u."""
    wg, wu, x, ids, g, u = _case("mxfp4", 32)
    cfg = M1Config(orient=orient, layout=layout, bn=16, split_k=split)
    run = lambda w, **kw: int4_m1_matmul(x, w, ids, fmt="mxfp4", group_size=32, cfg=cfg, interpret=True, **kw)
    y = run((_arrays(wg, layout),))
    assert _rel(y, g) < TOL and not np.asarray(y[2]).any()
    h = run((_arrays(wg, layout), _arrays(wu, layout)), epilogue="silu_mul")
    assert _rel(h, jax.nn.silu(g) * u) < TOL and not np.asarray(h[2]).any()


@pytest.mark.parametrize("orient,layout,split,fold,K,in_decode", [
    ("xw", "kn", 1, 2, 192, False), ("xw", "nk", 3, 2, 192, False), ("wx", "nk", 1, 2, 192, False),
    ("wx", "kn", 2, 4, 256, False), ("xw", "kn", 1, 8, 256, False), ("xw", "kn", 2, 4, 256, True),
    ("wx", "nk", 1, 2, 192, True),
])
def test_mxfp4_folded_scales_match_reference(orient, layout, split, fold, K, in_decode):
    """fold > 1: several 32-wide groups per dot, their e8m0 scales applied to the bf16 weights (exact for powers
    of two): the same products as the per-group path, with a skip id, single weight and fused SiLU(g) * u; also
    with the scales inside the decode (x times 2^64, weights times 2^-64)."""
    wg, wu, x, ids, g, u = _case("mxfp4", 32, K=K)
    cfg = M1Config(orient=orient, layout=layout, bn=16, split_k=split, fold=fold, scale_in_decode=in_decode)
    run = lambda w, c=cfg, **kw: int4_m1_matmul(x, w, ids, fmt="mxfp4", group_size=32, cfg=c, interpret=True, **kw)
    y = run((_arrays(wg, layout),))
    assert _rel(y, g) < TOL and not np.asarray(y[2]).any()
    per_group = run((_arrays(wg, layout),), c=M1Config(orient=orient, layout=layout, bn=16, split_k=split))
    assert _rel(y, per_group) < 1e-2
    h = run((_arrays(wg, layout), _arrays(wu, layout)), epilogue="silu_mul")
    assert _rel(h, jax.nn.silu(g) * u) < TOL and not np.asarray(h[2]).any()


def test_fold_x_lines_columns_up_with_packed_rows():
    """Packed byte row g * G/2 + j holds K rows g * G + j (low nibble) and g * G + G/2 + j (high nibble):
    fold_x puts x's matching columns at g * G/2 + j and K/2 + g * G/2 + j."""
    K, G = 96, 32
    x = jnp.arange(2 * K, dtype=jnp.float32).reshape(2, K)
    f = np.asarray(fold_x(x, G))
    for g in range(K // G):
        for j in range(G // 2):
            assert f[1, g * G // 2 + j] == x[1, g * G + j]
            assert f[1, K // 2 + g * G // 2 + j] == x[1, g * G + G // 2 + j]


@pytest.mark.parametrize("fmt,layout,M", [("int4_sym", "kn", 1), ("int4_asym", "nk", 3), ("int4_sym", "nk", 17)])
def test_dense_matches_reference(fmt, layout, M):
    w = Q.quantize(jax.random.normal(jax.random.PRNGKey(4), (256, 64)), fmt, 128)
    x = jax.random.normal(jax.random.PRNGKey(5), (M, 256), jnp.float32).astype(jnp.bfloat16)
    cfg = default_m1_config(-(-M // 16), 256, 64, 128, layout=layout, bn=32)
    y = int4_m1_matmul(x, (_arrays(w, layout),), fmt=fmt, group_size=128, cfg=cfg, interpret=True)
    assert y.shape == (M, 64) and _rel(y, x.astype(jnp.float32) @ Q.dequantize(w, jnp.float32)) < TOL


def test_decode_pairs_route_to_this_kernel():
    """quant.pair_qmatmul(_gate_up) without a config runs int4_m1 (mxfp4 too, with folded scales since session
    10's measurement); explicit configs keep int4_matmul."""
    wg, wu, x, ids, g, u = _case("int4_sym", 64)
    jaxpr = str(jax.make_jaxpr(lambda x, a, b, i: Q.pair_qmatmul_gate_up(x, a, b, i, impl="interpret"))(x, wg, wu, ids))
    assert "int4_m1_xw_kn" in jaxpr
    assert _rel(Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="interpret"), jax.nn.silu(g) * u) < TOL
    wm = Q.quantize(jax.random.normal(jax.random.PRNGKey(6), (5, 64, 32)), "mxfp4", 32)
    jaxpr = str(jax.make_jaxpr(lambda x, w, i: Q.pair_qmatmul(x, w, i, impl="interpret"))(x[:, :64], wm, ids))
    assert "int4_m1" in jaxpr and "int4_grouped_mxfp4" not in jaxpr  # (the kernel's name; the jit's is _matmul)
    jaxpr = str(jax.make_jaxpr(lambda x, a, b, i: Q.pair_qmatmul_gate_up(x, a, b, i, impl="interpret"))(
        x[:, :64], wm, wm, ids))
    assert "int4_m1" in jaxpr and "int4_grouped_mxfp4" not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda x, w, i: Q.pair_qmatmul(x, w, i, impl="interpret", cfg=_GROUPED))(x, wg, ids))
    assert "int4_m1" not in jaxpr and "int4_grouped" in jaxpr


def test_mxfp4_routed_with_folded_scales(monkeypatch, request):
    """Routing mxfp4 pairs (gate/up and down) to int4_m1 with folded scales, as a measurement may decide
    (int4_matmul.M1_ROUTES / M1_FOLD / GROUPED_FOLD), keeps the decode MoE's products. The routes are read when
    a jit traces: caches are cleared around each change."""
    from pallas_kernels import int4_matmul
    request.addfinalizer(jax.clear_caches)
    jax.clear_caches()
    monkeypatch.setitem(int4_matmul.M1_ROUTES, "mxfp4", (1, 2))
    monkeypatch.setitem(int4_matmul.M1_FOLD, "mxfp4", 4)
    monkeypatch.setitem(int4_matmul.GROUPED_FOLD, "mxfp4", 4)
    wg, wu, x, ids, g, u = _case("mxfp4", 32, K=512)  # 16 groups: the grouped default splits K 8 ways, fold fits 2
    jaxpr = str(jax.make_jaxpr(lambda x, a, b, i: Q.pair_qmatmul_gate_up(x, a, b, i, impl="interpret"))(x, wg, wu, ids))
    assert "int4_m1" in jaxpr and "permutation=(0, 2, 1, 3)" in jaxpr  # x permuted by fold_x: the folded path
    assert _rel(Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="interpret"), jax.nn.silu(g) * u) < TOL
    assert _rel(Q.pair_qmatmul(x, wg, ids, impl="interpret"), g) < TOL
    monkeypatch.setitem(int4_matmul.M1_ROUTES, "mxfp4", ())  # the grouped kernel's default config, folded
    jax.clear_caches()
    jaxpr = str(jax.make_jaxpr(lambda x, a, b, i: Q.pair_qmatmul_gate_up(x, a, b, i, impl="interpret"))(x, wg, wu, ids))
    assert "int4_grouped_mxfp4" in jaxpr and "permutation=(0, 2, 1, 3)" in jaxpr
    assert _rel(Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="interpret"), jax.nn.silu(g) * u) < TOL


def test_default_config_for_the_decode_shapes():
    """8 pairs: gate/up (2 weights, K=4096 N=2048) and down (K=2048 N=4096) both split K in 2 (measured best)."""
    assert default_m1_config(8, 4096, 2048, 128, 2).split_k == 2
    assert default_m1_config(8, 2048, 4096, 128, 1).split_k == 2
    assert default_m1_config(1, 4096, 16384, 128, 1).split_k == 4
    # mxfp4's groups per dot: as asked where a split's groups divide, else the largest power of two that does
    assert default_m1_config(8, 2048, 4096, 32, 1, fold=4).fold == 4  # 64 groups, split 2
    assert default_m1_config(8, 96, 64, 32, 1, fold=4).fold == 1      # 3 groups
    assert default_m1_config(8, 2048, 4096, 32, 1).fold == 1



def test_scale_in_decode_knob_reaches_the_folded_configs(monkeypatch):
    """int4_matmul.FOLD_SCALE_IN_DECODE (off until measured) turns it on for the folded routes only."""
    from pallas_kernels import int4_matmul
    assert not int4_matmul.routed_m1_config("mxfp4", 8, 2048, 4096, 32, 1).scale_in_decode
    monkeypatch.setattr(int4_matmul, "FOLD_SCALE_IN_DECODE", True)
    assert int4_matmul.routed_m1_config("mxfp4", 8, 2048, 4096, 32, 1).scale_in_decode
    assert not int4_matmul.routed_m1_config("int4_sym", 8, 2048, 4096, 128, 1).scale_in_decode  # fold 1


def test_rejects_what_it_does_not_handle():
    wg, _, x, ids, _, _ = _case("int4_sym", 64)
    with pytest.raises(ValueError, match="int8"):
        int4_m1_matmul(x, (_arrays(wg, "kn"),), ids, fmt="int8", group_size=64, interpret=True)
    with pytest.raises(ValueError, match="mxfp4 takes method 'asm'"):
        int4_m1_matmul(x, (_arrays(wg, "kn"),), ids, fmt="mxfp4", group_size=64, cfg=M1Config(method="magic", bn=16),
                       interpret=True)
    with pytest.raises(ValueError, match="fold=2 needs mxfp4"):
        int4_m1_matmul(x, (_arrays(wg, "kn"),), ids, fmt="int4_sym", group_size=64, cfg=M1Config(bn=16, fold=2),
                       interpret=True)
    wm, _, _, _, _, _ = _case("mxfp4", 32)  # 6 groups
    with pytest.raises(ValueError, match="not divisible by fold=4"):
        int4_m1_matmul(x, (_arrays(wm, "kn"),), ids, fmt="mxfp4", group_size=32, cfg=M1Config(bn=16, fold=4),
                       interpret=True)
    with pytest.raises(ValueError, match="scale_in_decode needs fold > 1"):
        int4_m1_matmul(x, (_arrays(wm, "kn"),), ids, fmt="mxfp4", group_size=32,
                       cfg=M1Config(bn=16, scale_in_decode=True), interpret=True)
    with pytest.raises(ValueError, match="bn=32"):
        int4_m1_matmul(x, (_arrays(wg, "kn"),), ids, fmt="int4_sym", group_size=64, cfg=M1Config(bn=32),
                       interpret=True)


@pytest.mark.parametrize("fmt", ["int4_sym", "int4_asym", "mxfp4"])
def test_lowers_to_triton(fmt):
    """The routed decode path and the wx / nk variants (every format) lower to Triton IR on CPU."""
    gs = 32 if fmt == "mxfp4" else 64
    wg, wu, x, ids, _, _ = _case(fmt, gs, K=256, N=128)
    f = jax.jit(lambda x, a, b, i: Q.pair_qmatmul_gate_up(x, a, b, i, impl="pallas"))
    routed = f.trace(x, wg, wu, ids).lower(lowering_platforms=("cuda",)).as_text()
    down = jax.jit(lambda x, a, i: Q.pair_qmatmul(x, a, i, impl="pallas")).trace(x, wg, ids) \
        .lower(lowering_platforms=("cuda",)).as_text()
    # routed to int4_m1 by measurement (int4_matmul.M1_ROUTES: gate/up and down, every format)
    assert ("int4_m1" in routed) == routes_to_m1(fmt, 2) is True
    assert ("int4_m1" in down) == routes_to_m1(fmt, 1) is True
    kernel = f"int4_grouped_{fmt}"  # the grouped kernel's name (the jit around either kernel is int4_grouped_matmul)
    assert kernel not in routed and kernel not in down
    # mxfp4's folded-scale variants too (the scales inside the PTX decode: its 5-operand asm)
    folds = ((("xw", "kn", 4, False), ("wx", "nk", 2, False), ("xw", "kn", 4, True), ("wx", "nk", 2, True))
             if fmt == "mxfp4" else ())
    for orient, layout, fold, in_decode in (("wx", "nk", 1, False), ("wx", "kn", 1, False)) + folds:
        cfg = M1Config(orient=orient, layout=layout, bn=64, split_k=2, num_warps=4, fold=fold,
                       scale_in_decode=in_decode)
        jax.jit(lambda x, w, i: int4_m1_matmul(x, (w,), i, fmt=fmt, group_size=gs, cfg=cfg)) \
            .trace(x, _arrays(wg, layout), ids).lower(lowering_platforms=("cuda",))
