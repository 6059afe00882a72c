"""Pallas int4 kernels == jnp dequantize + dot, in interpret mode on CPU; plus a Triton lowering check."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import quant as Q
from pallas_kernels.int4_matmul import (KernelConfig, default_grouped_config, tile_schedule)

# bf16 activations and output against an f32 reference: ~2e-3 typical, 1e-2 bound
TOL = 1e-2


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _weights(key, shape, fmt, gs):
    w = jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)
    return Q.quantize(w, fmt, gs)


def _x(key, M, K):
    return jax.random.normal(jax.random.PRNGKey(key), (M, K), jnp.float32).astype(jnp.bfloat16)


CASES = [  # fmt, group, M, K, N, kernel config
    ("int4_sym", 32, 1, 256, 64, KernelConfig(bn=32, split_k=2, unroll=2)),
    ("int4_sym", 64, 4, 256, 32, KernelConfig(bn=32, method="magic_sub")),
    ("int4_sym", 128, 5, 256, 32, KernelConfig(bn=32, method="convert")),
    ("int4_asym", 32, 16, 128, 48, KernelConfig(bn=16, unroll=2, method="magic_sub")),
    ("int4_asym", 64, 3, 256, 32, KernelConfig(bn=32, split_k=4, method="convert")),
    ("mxfp4", 32, 2, 128, 32, KernelConfig(bn=32, split_k=2)),
    ("mxfp4", 32, 37, 64, 16, KernelConfig(bm=16, bn=16)),  # several M tiles, last one partial
    ("int4_sym", 64, 1, 256, 64, KernelConfig(bm=1, bn=32, split_k=2)),  # M = 1 GEMV path
    ("int4_asym", 32, 1, 128, 32, KernelConfig(bm=1, bn=32)),
    ("mxfp4", 32, 1, 128, 32, KernelConfig(bm=1, bn=16, split_k=4)),
    ("mxfp4", 32, 3, 256, 32, KernelConfig(bn=32, split_k=2, fold=4)),  # 4 groups per dot, scales on the weights
    ("mxfp4", 32, 37, 256, 16, KernelConfig(bm=16, bn=16, unroll=2, fold=2)),
    ("mxfp4", 32, 5, 256, 32, KernelConfig(bn=32, split_k=2, fold=4, scale_in_decode=True)),  # scales in the decode
]


@pytest.mark.parametrize("fmt,gs,M,K,N,cfg", CASES)
def test_dense_kernel_matches_reference(fmt, gs, M, K, N, cfg):
    qw = _weights(M + K, (K, N), fmt, gs)
    x = _x(N, M, K)
    ref = x.astype(jnp.float32) @ Q.dequantize(qw, jnp.float32)
    out = Q.qmatmul(x, qw, impl="interpret", cfg=cfg)
    assert out.shape == (M, N) and out.dtype == jnp.bfloat16
    assert _rel(out, ref) < TOL


def test_qmatmul_leading_dims_and_default_config():
    qw = _weights(0, (128, 32), "int4_sym", 64)
    x = _x(1, 6, 128).reshape(2, 3, 128)
    ref = x.astype(jnp.float32) @ Q.dequantize(qw, jnp.float32)
    out = Q.qmatmul(x, qw, impl="interpret")
    assert out.shape == (2, 3, 32) and _rel(out, ref) < TOL


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("fmt,gs", [("int4_sym", 32), ("int4_asym", 64), ("mxfp4", 32)])
def test_grouped_kernel_matches_ragged_dot(fmt, gs, split):
    E, K, N = 6, 128, 32
    gsz = jnp.array([1, 0, 19, 3, 0, 1], jnp.int32)  # odd loads, empty experts, one > bm rows
    M = 26                                            # 2 trailing rows past sum(group_sizes): zeros
    we = _weights(3, (E, K, N), fmt, gs)
    x = _x(4, M, K)
    ref = jax.lax.ragged_dot(x.astype(jnp.float32), Q.dequantize(we, jnp.float32), gsz)
    cfg = KernelConfig(bm=16, bn=16, unroll=2 // split, split_k=split)  # split-K: partials summed outside
    out = Q.ragged_qmatmul(x, we, gsz, impl="interpret", cfg=cfg)
    assert out.shape == (M, N) and _rel(out, ref) < TOL
    np.testing.assert_array_equal(np.asarray(out[24:], np.float32), 0.0)

    wu = _weights(5, (E, K, N), fmt, gs)
    refu = jax.lax.ragged_dot(x.astype(jnp.float32), Q.dequantize(wu, jnp.float32), gsz)
    rs = jax.random.uniform(jax.random.PRNGKey(6), (M,))
    h = Q.ragged_qmatmul_gate_up(x, we, wu, gsz, rs, impl="interpret", cfg=cfg)
    assert _rel(h, jax.nn.silu(ref) * refu * rs[:, None]) < TOL


@pytest.mark.parametrize("split,unroll,fold,in_decode", [(1, 1, 4, False), (2, 1, 2, False), (1, 2, 2, False),
                                                        (2, 1, 2, True)])
def test_grouped_mxfp4_folded_scales_match_ragged_dot(split, unroll, fold, in_decode):
    """fold > 1: several mxfp4 groups per dot (their e8m0 scales applied to the bf16 weights): the same products as
    the reference and as one group per dot, sorted rows and the fused gate/up with row scales."""
    E, K, N = 6, 256, 32
    gsz = jnp.array([1, 0, 19, 3, 0, 1], jnp.int32)
    M = 26
    we, wu = _weights(3, (E, K, N), "mxfp4", 32), _weights(5, (E, K, N), "mxfp4", 32)
    x = _x(4, M, K)
    ref = jax.lax.ragged_dot(x.astype(jnp.float32), Q.dequantize(we, jnp.float32), gsz)
    refu = jax.lax.ragged_dot(x.astype(jnp.float32), Q.dequantize(wu, jnp.float32), gsz)
    cfg = KernelConfig(bm=16, bn=16, unroll=unroll, split_k=split, fold=fold, scale_in_decode=in_decode)
    out = Q.ragged_qmatmul(x, we, gsz, impl="interpret", cfg=cfg)
    assert _rel(out, ref) < TOL
    one = Q.ragged_qmatmul(x, we, gsz, impl="interpret", cfg=KernelConfig(bm=16, bn=16, unroll=unroll, split_k=split))
    assert _rel(out, one) < TOL
    np.testing.assert_array_equal(np.asarray(out[24:], np.float32), 0.0)
    rs = jax.random.uniform(jax.random.PRNGKey(6), (M,))
    h = Q.ragged_qmatmul_gate_up(x, we, wu, gsz, rs, impl="interpret", cfg=cfg)
    assert _rel(h, jax.nn.silu(ref) * refu * rs[:, None]) < TOL


def test_fold_is_refused_where_it_does_not_apply():
    """fold > 1 needs mxfp4's power-of-two scales, groups it divides, and not the M = 1 GEMV path."""
    x = _x(0, 2, 128)
    with pytest.raises(ValueError, match="fold=2 needs mxfp4"):
        Q.qmatmul(x, _weights(0, (128, 32), "int4_sym", 32), impl="interpret", cfg=KernelConfig(bn=32, fold=2))
    qm = _weights(0, (128, 32), "mxfp4", 32)  # 4 groups
    with pytest.raises(ValueError, match="not divisible"):
        Q.qmatmul(x, qm, impl="interpret", cfg=KernelConfig(bn=32, split_k=2, fold=4))
    with pytest.raises(ValueError, match="GEMV"):
        Q.qmatmul(x[:1], qm, impl="interpret", cfg=KernelConfig(bm=1, bn=32, fold=2))
    with pytest.raises(ValueError, match="scale_in_decode needs fold > 1"):
        Q.qmatmul(x, qm, impl="interpret", cfg=KernelConfig(bn=32, scale_in_decode=True))


@pytest.mark.parametrize("shift", [-50, 0, 50])
def test_scales_in_the_decode_across_the_e8m0_range(shift):
    """scale_in_decode (weights times 2^-64 by the decode's multiply, x times 2^64): the same products for
    weights far from 1 (e8m0 scales near 2^-52 and 2^48), against both the reference and the default fold."""
    qw = Q.quantize(jax.random.normal(jax.random.PRNGKey(9), (256, 32)) * 2.0 ** shift, "mxfp4", 32)
    x = _x(9, 3, 256)
    ref = x.astype(jnp.float32) @ Q.dequantize(qw, jnp.float32)
    out = Q.qmatmul(x, qw, impl="interpret", cfg=KernelConfig(bn=32, fold=4, scale_in_decode=True))
    assert _rel(out, ref) < TOL and np.isfinite(np.asarray(out, np.float32)).all()
    plain = Q.qmatmul(x, qw, impl="interpret", cfg=KernelConfig(bn=32, fold=4))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(plain, np.float32), rtol=1e-2,
                               atol=1e-2 * float(np.abs(np.asarray(plain, np.float32)).max()))


def test_grouped_single_token_top_k():
    # decode: one token, 4 of 8 experts, one row each
    E, K, N = 8, 64, 32
    we = _weights(7, (E, K, N), "int4_sym", 32)
    gsz = jnp.array([0, 1, 0, 1, 1, 0, 0, 1], jnp.int32)
    x = _x(8, 4, K)
    ref = jax.lax.ragged_dot(x.astype(jnp.float32), Q.dequantize(we, jnp.float32), gsz)
    assert default_grouped_config(4, K, N, 32, E).split_k == 2  # few busy tiles: K is split
    assert _rel(Q.ragged_qmatmul(x, we, gsz, impl="interpret"), ref) < TOL


def test_tile_schedule_skips_empty_experts():
    t = np.asarray(tile_schedule(jnp.array([0, 2, 0, 17], jnp.int32), 20, 16))
    live = [tuple(c) for c in t.T if c[2] > c[1]]
    assert live == [(1, 0, 2), (3, 2, 18), (3, 18, 19), (4, 19, 20)]  # expert 4 = rows past the total


def test_unsupported_shapes_raise_with_the_shape():
    qw = _weights(0, (64, 40), "int4_sym", 32)  # N = 40: not a multiple of 16
    with pytest.raises(ValueError, match=r"K=64, N=40"):
        Q.qmatmul(_x(0, 1, 64), qw, impl="interpret")
    qw = _weights(0, (64, 32), "int4_sym", 32)
    with pytest.raises(ValueError, match=r"K=64, N=32"):
        Q.qmatmul(_x(0, 1, 64), qw, impl="interpret", cfg=KernelConfig(bn=64))
    with pytest.raises(ValueError, match=r"K=64, N=32"):
        Q.qmatmul(_x(0, 1, 64), qw, impl="interpret", cfg=KernelConfig(bn=32, split_k=4))
    we = _weights(0, (2, 64, 24), "int4_sym", 32)
    with pytest.raises(ValueError, match=r"K=64, N=24"):
        Q.ragged_qmatmul(_x(0, 2, 64), we, jnp.array([1, 1], jnp.int32), impl="interpret")


@pytest.mark.parametrize("fmt", ["int4_sym", "int4_asym", "mxfp4"])
def test_kernels_lower_to_triton(fmt):
    """Lowering to Triton IR runs on CPU; catches ops the Triton backend does not support."""
    qw = _weights(0, (256, 64), fmt, 32)
    we = _weights(1, (4, 256, 64), fmt, 32)
    x = _x(2, 9, 256)
    gsz = jnp.array([3, 0, 4, 2], jnp.int32)
    low = jax.jit(lambda x, w: Q.qmatmul(x, w, impl="pallas")).trace(x, qw).lower(lowering_platforms=("cuda",))
    assert "triton" in low.as_text()
    for row_scale in (None, jnp.ones((9,))):
        jax.jit(lambda x, w, g: Q.ragged_qmatmul_gate_up(x, w, w, g, row_scale, impl="pallas")) \
            .trace(x, we, gsz).lower(lowering_platforms=("cuda",))
    if fmt == "mxfp4":  # the folded-scale variant (4 groups per dot) too
        cfg = KernelConfig(bn=64, split_k=2, fold=4)
        jax.jit(lambda x, w: Q.qmatmul(x, w, impl="pallas", cfg=cfg)).trace(x, qw).lower(lowering_platforms=("cuda",))
        jax.jit(lambda x, w, g: Q.ragged_qmatmul_gate_up(x, w, w, g, None, impl="pallas", cfg=cfg)) \
            .trace(x, we, gsz).lower(lowering_platforms=("cuda",))


def e2m1_bits_reference(b0: int, b1: int, half: str) -> tuple[int, int]:
    """What nibble_decode._e2m1_asm's integer steps (its shifts and lop3 masks) make of two bytes spread into one
    32-bit register (b0 in the low 16 bits, b1 in the high), low or high nibbles: the two bf16 bit patterns before
    the multiply by 2^126."""
    t = (b0 & 0xFF) | (b1 & 0xFF) << 16
    if half == "lo":
        r = ((t << 6) | (t << 12)) & 0x81C081C0
    else:
        r = ((t << 2) & 0x01C001C0) | ((t << 8) & 0x80008000)
    return r & 0xFFFF, (r >> 16) & 0xFFFF


def test_e2m1_asm_bit_steps_give_the_e2m1_values():
    """The integer steps of the mxfp4 PTX decode (method "asm", `_e2m1_asm`), for every pair of bytes sharing a
    register and both nibbles: bf16 bits that are e2m1(code) * 2^-126 exactly (the PTX then multiplies by 2^126;
    subnormal for codes 0, 1, 8, 9). The PTX itself is checked on a GPU (benchmarks/ab_decode_experts.py)."""
    b0, b1 = (a.ravel().astype(np.uint32) for a in np.meshgrid(np.arange(256), np.arange(256)))
    e2m1 = np.concatenate([Q.E2M1_VALUES, -Q.E2M1_VALUES]).astype(np.float64)
    for half, shift in (("lo", 0), ("hi", 4)):
        for bits, byte in zip(e2m1_bits_reference(b0, b1, half), (b0, b1)):
            got = (np.asarray(bits, np.uint32) << 16).view(np.float32).astype(np.float64) * 2.0 ** 126
            np.testing.assert_array_equal(got, e2m1[(byte >> shift) & 15])


def test_impl_is_a_static_argument_not_the_environment(monkeypatch):
    """The kernel choice is qmatmul's `impl` argument: under one jit, each value traces its own path (no stale
    cache), and an environment variable changes nothing (auto is the XLA path on CPU)."""
    qw = _weights(0, (128, 32), "int4_sym", 32)
    x = _x(1, 3, 128)

    def uses_kernel(**kw):
        return "pallas_call" in str(jax.make_jaxpr(lambda x, w: Q.qmatmul(x, w, **kw))(x, qw))

    assert uses_kernel(impl="interpret") and uses_kernel(impl="pallas")
    assert not uses_kernel(impl="xla") and not uses_kernel()
    f = jax.jit(Q.qmatmul, static_argnames=("impl", "cfg"))
    for impl in ("xla", "interpret", "xla"):
        np.testing.assert_allclose(np.asarray(f(x, qw, impl=impl), np.float32),
                                   np.asarray(Q.qmatmul(x, qw, impl=impl), np.float32), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("MIMO_QUANT_IMPL", "interpret")
    assert not uses_kernel()
    with pytest.raises(ValueError, match="unknown quantized matmul impl 'triton'"):
        Q.qmatmul(x, qw, impl="triton")


@pytest.mark.parametrize("fmt,gs,cfg", [
    ("int4_sym", 64, None),
    ("int4_asym", 32, KernelConfig(bn=32, split_k=2)),
    ("mxfp4", 32, KernelConfig(bn=16)),
])
def test_pair_rows_match_gathered_reference(fmt, gs, cfg):
    """Row tiles in pair order (decode's one token x top-k): row r uses expert ids[r], id E = a zero row."""
    E, K, N = 10, 128, 64
    wg, wu = _weights(1, (E, K, N), fmt, gs), _weights(2, (E, K, N), fmt, gs)
    ids = jnp.array([7, 0, 10, 3, 9], jnp.int32)
    x = _x(3, 5, K)
    pick = jnp.minimum(ids, E - 1)
    valid = (ids < E)[:, None]
    g = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32), Q.dequantize(wg, jnp.float32)[pick]) * valid
    u = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32), Q.dequantize(wu, jnp.float32)[pick]) * valid
    y = Q.pair_qmatmul(x, wg, ids, impl="interpret", cfg=cfg)
    assert y.shape == (5, N) and _rel(y, g) < TOL
    assert not np.asarray(y[2]).any()
    h = Q.pair_qmatmul_gate_up(x, wg, wu, ids, impl="interpret", cfg=cfg)
    assert _rel(h, jax.nn.silu(g) * u) < TOL
    assert _rel(Q.pair_qmatmul(x, wg, ids, impl="xla"), g) < TOL  # the CPU fallback agrees


def test_offsets_fit_kernel_flags_stacks_the_32_bit_indexing_would_wrap():
    """The Triton lowering indexes arrays of <= 2^32 bytes with signed 32-bit offsets: a uint8 expert stack of
    more than 2^31 elements (MiMo-V2-Flash's flattened [4 * 256, 2048, 2048] on one GPU) must not be flattened."""
    S = jax.ShapeDtypeStruct
    assert not Q.offsets_fit_kernel([S((4 * 256, 2048, 2048), jnp.uint8)])     # exactly 2^32 bytes
    assert Q.offsets_fit_kernel([S((2 * 256, 2048, 2048), jnp.uint8)])         # 2^31 elements: last offset fits
    assert Q.offsets_fit_kernel([S((5 * 256, 2048, 2048), jnp.uint8)])         # > 2^32 bytes: 64-bit offsets
    assert Q.offsets_fit_kernel([S((3 * 256, 2048, 2048), jnp.float16)])       # 2^31.6 elements but 6 GiB: 64-bit


def test_pad_to_fit_kernel_pads_only_the_stacks_that_would_wrap():
    """A stack of exactly 2^32 bytes (Flash's [8 layers x 128 experts] per device on 2 GPUs) gets one zero layer,
    so the lowering switches to 64-bit offsets; Flash's [7 repeats x 1 layer x 128 experts] run gets two (+29%);
    one that fits, or whose padding would cost > 50%, is unchanged."""
    S = jax.ShapeDtypeStruct

    def stack(*lead):
        return Q.QuantizedWeight(S(lead + (128, 1024, 4096), jnp.uint8), S(lead + (128, 16, 4096), jnp.float16),
                                 None, "int4_sym", 128, (2048, 4096))

    for lead, padded_to in (((8,), 9), ((7, 1), 9), ((6,), 9)):
        padded = jax.eval_shape(Q.pad_to_fit_kernel, stack(*lead))
        assert padded.packed.shape[0] == padded.scales.shape[0] == padded_to and Q.offsets_fit_kernel(padded.packed)
        assert padded.packed.shape[1:] == stack(*lead).packed.shape[1:]
    for layers in (4, 5, 9):  # fits (2^31 elements), padding would add 80%, > 2^32 bytes
        assert jax.eval_shape(Q.pad_to_fit_kernel, stack(layers)).packed.shape[0] == layers


@pytest.mark.parametrize("fmt,group", [("int4_sym", 128), ("int4_asym", 128), ("mxfp4", 32)])
def test_every_flash_expert_stack_reads_in_place_on_2_to_8_gpus(fmt, group):
    """MiMo-V2-Flash's expert stacks as one device holds them under expert parallelism on 2, 4 and 8 GPUs (one
    H200 cannot hold its ~160 GB of 4-bit experts), after the Engine's padding: every array fits the kernel's
    offsets, so no layer's experts are sliced (copied) per step. The 2-GPU full-layer run [7 x 1 x 128 experts] did
    not (its padding was refused): a 19.7 ms step on 2 x H200, 12.1 ms once padded."""
    from mimo_jax import model
    from mimo_jax.config import load_config
    from mimo_jax.quantize_model import _is_expert, quantized_struct

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mimo_v2_flash.json")
    leaves = jax.tree_util.tree_flatten_with_path(model.param_shapes(cfg, jnp.bfloat16))[0]
    stacks = [(jax.tree_util.keystr(p), s) for p, s in leaves if _is_expert(p, s)]
    assert len(stacks) == 12  # gate, up, down of four expert runs ([4], [7 x 1], [7 x 5], [1] layers)
    for n in (2, 4, 8):
        for where, s in stacks:
            local = jax.ShapeDtypeStruct(s.shape[:-3] + (s.shape[-3] // n,) + s.shape[-2:], s.dtype)
            w = jax.eval_shape(Q.pad_to_fit_kernel, quantized_struct(local, fmt, group))
            assert Q.offsets_fit_kernel(w), (n, where, w.packed.shape)


def test_zero_layers_after_a_stack_leave_every_layer_s_experts_unchanged():
    """moe.experts on a stack padded along its layer axis (pad_to_fit_kernel) == on the stack itself."""
    from mimo_jax import moe

    E, K, N, L = 8, 128, 64, 3
    rng = np.random.default_rng(3)
    stack = {name: Q.quantize(jnp.asarray(rng.normal(size=(L, E, K if name != "w_down" else N,
                                                                N if name != "w_down" else K)) * 0.05, jnp.float32),
                              "int4_sym", 64) for name in moe.EXPERT_KEYS}
    pad = lambda w: Q.QuantizedWeight(*(None if a is None else jnp.pad(a, [(0, 2)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
                                        for a in (w.packed, w.scales, w.mins)), w.fmt, w.group_size, w.kn, w.dtype)
    padded = {k: pad(v) for k, v in stack.items()}
    x = jnp.asarray(rng.normal(size=(1, K)), jnp.float32)
    ids = jnp.asarray([[1, 6, E]], jnp.int32)  # E: a pair to skip
    weights = jnp.asarray([[0.5, 0.3, 0.2]], jnp.float32)
    for layer in range(L):
        want = moe.experts(stack, (jnp.int32(layer),), x, weights, ids)
        got = moe.experts(padded, (jnp.int32(layer),), x, weights, ids)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
