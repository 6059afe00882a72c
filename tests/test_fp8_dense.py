"""Dense weights kept in FP8 with block scales (mimo_jax/fp8.py): the format's round trip, the GEMV kernel (interpret
mode) == the jnp reference on random shapes and configs, the model and the Engine with FP8 q/k/v and dense MLP ==
the same model with those weights dequantized, and the sharding table's specs for them."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import fp8, model, sharding
from mimo_jax.config import load_config
from mimo_jax.quantize_model import quantize_dense
from pallas_kernels import gemv as G

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _weight(K, N, seed=0):
    w = 0.05 * jax.random.normal(jax.random.PRNGKey(seed), (K, N), jnp.float32)
    return w.at[:128, :128].multiply(40.0)  # one block far larger than the rest: per-block scales matter


def test_quantize_round_trip_and_block_scales():
    w = _weight(300, 200)  # neither side a multiple of the block: the last blocks are partial
    fw = fp8.quantize(w, layout="kn")
    assert fw.w.dtype == jnp.float8_e4m3fn and fw.w.shape == (300, 200) and fw.scale.shape == (3, 2)
    back = fp8.dequantize(fw)
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself relative to its block's largest
    for kb in range(3):
        for nb in range(2):
            blk = (slice(128 * kb, 128 * kb + 128), slice(128 * nb, 128 * nb + 128))
            amax = float(jnp.abs(w[blk]).max())
            assert float(jnp.abs(back[blk] - w[blk]).max()) <= amax / 16 + 1e-12
            np.testing.assert_allclose(float(fw.scale[kb, nb]), amax / 448, rtol=1e-6)
    # values already on the grid (the hub's) come back (up to the scale's float32 rounding)
    again = fp8.quantize(back)
    np.testing.assert_allclose(np.asarray(fp8.dequantize(again)), np.asarray(back), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_from_checkpoint_keeps_the_values(layout):
    fw = fp8.quantize(_weight(256, 384), layout="kn")
    hub_w, hub_s = jnp.swapaxes(fw.w, 0, 1), jnp.swapaxes(fw.scale, 0, 1)  # the hub's "out, in" + scale_inv
    got = fp8.from_checkpoint(hub_w, hub_s, layout=layout)
    assert got.layout == layout and got.shape == (256, 384)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(got)), np.asarray(fp8.dequantize(fw)))
    with pytest.raises(ValueError, match="scale shape"):
        fp8.from_checkpoint(hub_w, hub_s[:, :1])


def test_layouts_hold_the_same_values():
    w = _weight(384, 256)
    a, b = fp8.quantize(w, layout="kn"), fp8.quantize(w, layout="nk")
    assert a.w.shape == (384, 256) and b.w.shape == (256, 384) and a.shape == b.shape == (384, 256)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(a)), np.asarray(fp8.dequantize(b)))


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_concat_out_is_exact_and_checks_blocks(layout):
    parts = [fp8.quantize(_weight(256, n, seed=n), layout=layout) for n in (384, 128, 256)]
    fused = fp8.concat_out(parts)
    want = jnp.concatenate([fp8.dequantize(p) for p in parts], axis=-1)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(fused)), np.asarray(want))
    with pytest.raises(ValueError, match="multiple"):
        fp8.concat_out([fp8.quantize(_weight(256, 192), layout=layout), parts[0]])


CASES = [  # (M, K, N, config or None = the default)
    (1, 512, 384, None), (1, 256, 512, G.GemvConfig(bn=64, bk=64, split_k=2)),
    (1, 256, 256, G.GemvConfig(bn=128, bk=128, dot=True)), (1, 384, 256, G.GemvConfig(bn=32, bk=128, split_k=3)),
    (9, 512, 384, None), (9, 256, 256, G.GemvConfig(bn=128, bk=128, split_k=2)), (16, 256, 640, None),
    (3, 1024, 128, G.GemvConfig(bn=64, bk=32, split_k=4, num_warps=8)),
]


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("M,K,N,cfg", CASES)
def test_kernel_matches_reference(M, K, N, cfg, layout):
    fw = fp8.quantize(_weight(K, N, seed=K + N), layout=layout)
    x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.float32).astype(jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(fp8.dequantize(fw), np.float64)
    got = np.asarray(fp8.matmul(x, fw, cfg=cfg, impl="interpret"), np.float64)
    assert got.shape == (M, N)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 8e-3, err  # the bf16 output's rounding
    xla = np.asarray(fp8.matmul(x, fw, impl="xla"), np.float64)
    assert np.abs(xla - ref).max() / np.abs(ref).max() < 2e-2


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_kernel_in_chunks_of_16_rows(layout):
    """More than 16 rows (a batched decode) run the kernel per 16-row chunk: == the float64 product."""
    fw = fp8.quantize(_weight(256, 384, seed=5), layout=layout)
    x = jax.random.normal(jax.random.PRNGKey(2), (37, 256), jnp.float32).astype(jnp.bfloat16)
    got = np.asarray(fp8.matmul(x, fw, impl="interpret"), np.float64)
    want = np.asarray(x, np.float64) @ np.asarray(fp8.dequantize(fw), np.float64)
    assert got.shape == (37, 384) and np.abs(got - want).max() / np.abs(want).max() < 8e-3  # the bf16 output's rounding
    tail = np.asarray(fp8.matmul(x[32:], fw, impl="interpret"), np.float64)  # the last chunk, alone
    np.testing.assert_array_equal(got[32:], tail)


def test_kernel_refuses_tiles_across_blocks():
    fw = fp8.quantize(_weight(256, 256))
    x = jnp.ones((1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="scale blocks"):
        fp8.matmul(x, fw, cfg=G.GemvConfig(bn=256, bk=64), impl="interpret")


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(CONFIGS / "tiny_mimo.json")
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    return cfg, params


def _dequantized(params):
    return jax.tree_util.tree_map(lambda w: fp8.dequantize(w) if isinstance(w, fp8.Fp8Weight) else w, params,
                                  is_leaf=lambda w: isinstance(w, fp8.Fp8Weight))


@pytest.mark.parametrize("fmt", ["fp8", "fp8_layers", "fp8_all"])
def test_model_with_fp8_dense_equals_dequantized(tiny, fmt):
    cfg, params = tiny
    qp = quantize_dense(params, fmt)
    kinds = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(qp, is_leaf=lambda w: isinstance(w, fp8.Fp8Weight))[0]:
        name = getattr(path[-1], "key", None)
        if isinstance(leaf, fp8.Fp8Weight):
            kinds[name] = kinds.get(name, 0) + 1
    assert {"wq", "wk", "wv", "w_gate", "w_down"} <= set(kinds) and "router" not in kinds and "embed" not in kinds
    assert ("wo" in kinds) == (fmt != "fp8") and ("lm_head" in kinds) == (fmt == "fp8_all")
    assert not any(isinstance(w, fp8.Fp8Weight) for w in jax.tree_util.tree_leaves(qp.get("mtp", []), is_leaf=_is_fp8))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    pos = jnp.arange(12, dtype=jnp.int32)

    def logits(p):
        out, _ = model.forward(p, ids, pos, model.init_cache(cfg, 1, 32, jnp.float32), cfg)
        return np.asarray(out[0])

    a, b = logits(qp), logits(_dequantized(qp))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    # and the FP8 rounding moved the model (the weights really changed format)
    assert np.abs(a - logits(params)).max() > 1e-4 * np.abs(a).max()


@pytest.mark.parametrize("fmt", ["fp8", "fp8_layers", "fp8_all"])
def test_engine_greedy_with_fp8_dense_equals_dequantized(tiny, fmt):
    from mimo_jax.engine import Engine

    cfg, params = tiny
    qp = quantize_dense(params, fmt)
    prompt = [3, 17, 5, 9, 1]
    a = Engine(cfg, qp, max_seq_len=64).generate(prompt, max_new_tokens=8, temperature=0.0)
    b = Engine(cfg, _dequantized(qp), max_seq_len=64).generate(prompt, max_new_tokens=8, temperature=0.0)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8


def test_unrolled_layout_fuses_fp8_projections():
    """q/k/v and gate/up of whole blocks fuse into one Fp8Weight each, with the same products."""
    layer = {"attn": {k: fp8.quantize(_weight(256, n, seed=n)) for k, n in (("wq", 384), ("wk", 128), ("wv", 256))},
             "mlp": {k: fp8.quantize(_weight(256, 256, seed=i)) for i, k in enumerate(("w_gate", "w_up"))}}
    fused = model._fuse_projections(layer)
    assert isinstance(fused["attn"]["wqkv"], fp8.Fp8Weight) and fused["attn"]["wqkv"].shape == (256, 768)
    assert isinstance(fused["mlp"]["w_gate_up"], fp8.Fp8Weight)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 256), jnp.float32)
    q, k, v = jnp.split(fp8.matmul(x, fused["attn"]["wqkv"], impl="xla"), [384, 512], axis=-1)
    want = fp8.matmul(x, layer["attn"]["wk"], impl="xla")
    np.testing.assert_allclose(np.asarray(k), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_fp8_all_keeps_a_tied_lm_head_as_the_embedding(tiny):
    """A tied model has no lm_head leaf: fp8_all leaves the embedding (the head's table) as it is, rounds o_proj, and
    the model (its head reading the embedding) == the same model dequantized."""
    cfg, _ = tiny
    cfg = cfg.replace(tie_word_embeddings=True)
    tied = model.init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    assert "lm_head" not in tied
    qp = quantize_dense(tied, "fp8_all")
    assert "lm_head" not in qp and qp["embed"] is tied["embed"]
    assert any(_is_fp8(w) for w in jax.tree_util.tree_leaves(qp["layers"], is_leaf=_is_fp8))
    ids = jnp.asarray([[3, 9, 1, 7]], jnp.int32)
    pos = jnp.arange(4, dtype=jnp.int32)
    a, b = (np.asarray(model.forward(p, ids, pos, model.init_cache(cfg, 1, 16, jnp.float32), cfg)[0])
            for p in (qp, _dequantized(qp)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_columns_are_the_dequantized_columns(layout):
    """fp8.columns(W, idx) == dequantize(W)[:, idx].T (the block drafter's lm_head rows), K not a block multiple."""
    fw = fp8.quantize(_weight(200, 300, seed=3), layout=layout)
    idx = jnp.asarray([0, 5, 127, 128, 299, 5], jnp.int32)
    want = np.asarray(fp8.dequantize(fw))[:, np.asarray(idx)].T
    np.testing.assert_array_equal(np.asarray(fp8.columns(fw, idx)), want)


def test_block_drafter_head_rows_of_an_fp8_lm_head(tiny):
    from mimo_jax import block_drafter

    cfg, params = tiny
    qp = quantize_dense(params, "fp8_all")
    vocab = jnp.asarray([1, 7, 30, 2], jnp.int32)
    got = block_drafter.head_rows(qp, cfg, vocab)
    want = block_drafter.head_rows({**qp, "lm_head": fp8.dequantize(qp["lm_head"])}, cfg, vocab)
    assert got.shape == (4, cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_quantize_dense_rejects_unknown_format(tiny):
    from mimo_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="dense weight format"):
        quantize_dense(tiny[1], "int8")


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_sharding_specs_cover_both_arrays(tiny, layout, monkeypatch):
    """Each FP8 weight's values and scales get the bf16 weight's PartitionSpec, its last two axes swapped for
    "nk" (what a mesh of 2 would split: q/k/v by heads along N, the dense down along K)."""
    from jax.sharding import PartitionSpec as P

    cfg, params = tiny
    monkeypatch.setattr(fp8, "LAYOUT", layout)
    mesh = sharding.make_mesh(1)
    monkeypatch.setattr(sharding, "_mesh_axes", lambda *a: {"q_heads": "x", "kv_heads": "x", "ffn": "x",
                                                            "vocab": None, "experts": "x"})
    plain = sharding.specs(params, cfg, mesh)
    q = sharding.specs(quantize_dense(params, "fp8"), cfg, mesh)
    pairs = []
    is_spec = lambda s: isinstance(s, (P, fp8.Fp8Weight))  # noqa: E731
    for s_plain, s_q in zip(jax.tree_util.tree_leaves(plain, is_leaf=is_spec),
                            jax.tree_util.tree_leaves(q, is_leaf=is_spec)):
        if isinstance(s_q, fp8.Fp8Weight):
            pairs.append((s_plain, s_q))
    assert pairs
    for s_plain, s_q in pairs:
        want = P(*s_plain[:-2], s_plain[-1], s_plain[-2]) if layout == "nk" else s_plain
        # (tiny_mimo's dims are under one 128-block: where a device would hold part of a block, scales stay whole)
        assert s_q.w == want and s_q.scale in (want, P())
    assert any("x" in tuple(s) for s, _ in pairs)  # the table did split some of them


# ---- the loader: FP8 kept as stored (hub layout), quantized while loading (float checkpoints) ----

@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory):
    from hf_fixtures import fp8_round_trip, random_hf_model, save_hub_layout, save_transformers_layout

    hf = random_hf_model(7, num_layers=4, window=5, hidden_size=64, moe_intermediate_size=32, n_routed_experts=8)
    fp8_round_trip(hf)
    root = tmp_path_factory.mktemp("fp8ckpt")
    return save_hub_layout(hf, root / "hub", shards=2), save_transformers_layout(hf, root / "transformers")


def _is_fp8(x):
    return isinstance(x, fp8.Fp8Weight)


def _assert_same(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_hub_fp8_kept_as_stored(ckpt_dirs, layout, monkeypatch):
    """dense="fp8" on the hub layout: q/k/v and the dense MLP arrive as Fp8Weight holding the file's FP8 bytes, and
    dequantized they are the float32 load's tensors bit for bit (every other leaf identical too)."""
    from mimo_jax.loader import load_checkpoint

    monkeypatch.setattr(fp8, "LAYOUT", layout)
    _, ref = load_checkpoint(ckpt_dirs[0], jnp.float32)
    _, got = load_checkpoint(ckpt_dirs[0], jnp.float32, dense="fp8")
    kept = [w for w in jax.tree_util.tree_leaves(got, is_leaf=_is_fp8) if _is_fp8(w)]
    assert kept and all(w.layout == layout and w.w.dtype == jnp.float8_e4m3fn for w in kept)
    _assert_same(jax.tree_util.tree_map(lambda w: fp8.dequantize(w) if _is_fp8(w) else w, got, is_leaf=_is_fp8), ref)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_layers", "fp8_all"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_quantized_while_loading_equals_load_then_quantize(ckpt_dirs, dtype, fmt):
    """A float checkpoint (transformers layout) with dense="fp8" / "fp8_all": the same Fp8Weights as quantize_dense
    after a plain load in that dtype, bit for bit."""
    from mimo_jax.loader import load_checkpoint

    _, ref = load_checkpoint(ckpt_dirs[1], dtype)
    _, got = load_checkpoint(ckpt_dirs[1], dtype, dense=fmt)
    _assert_same(got, quantize_dense(ref, fmt))
    assert any(_is_fp8(w) for w in jax.tree_util.tree_leaves(got, is_leaf=_is_fp8))
    assert _is_fp8(got["lm_head"]) == (fmt == "fp8_all")


def test_hub_fp8_all_keeps_the_stored_and_quantizes_the_rest(ckpt_dirs):
    """dense="fp8_all" on the hub layout: q/k/v and the dense MLP as stored (== dense="fp8"), o_proj and lm_head
    (bf16 on the hub) quantized while loading in the checkpoint's own blocks (== fp8.quantize of the plain load's)."""
    from mimo_jax.loader import load_checkpoint

    _, ref = load_checkpoint(ckpt_dirs[0], jnp.float32)
    _, kept = load_checkpoint(ckpt_dirs[0], jnp.float32, dense="fp8")
    _, got = load_checkpoint(ckpt_dirs[0], jnp.float32, dense="fp8_all")
    block = got["lm_head"].block
    quantized = lambda w: fp8.quantize(w, block=block) if not _is_fp8(w) else w  # noqa: E731
    _assert_same(got["lm_head"], quantized(ref["lm_head"]))
    fresh = [(w, k) for w, k in zip(jax.tree_util.tree_leaves(got["layers"], is_leaf=_is_fp8),
                                    jax.tree_util.tree_leaves(kept["layers"], is_leaf=_is_fp8)) if _is_fp8(w) != _is_fp8(k)]
    assert fresh  # (o_proj)
    for w, k in fresh:  # o_proj: stacked [*, K, N]; quantized one layer's matrix at a time, as quantize_dense
        lead = k.shape[:-2]
        for idx in np.ndindex(*lead):
            _assert_same(w[idx], quantized(k[idx]))
    _assert_same([w for w in jax.tree_util.tree_leaves(got["layers"], is_leaf=_is_fp8) if not any(w is f for f, _ in fresh)],
                 [k for k in jax.tree_util.tree_leaves(kept["layers"], is_leaf=_is_fp8)
                  if not any(k is g for _, g in fresh)])


def test_on_a_mesh_of_two(tmp_path):
    """In a fresh process with 2 CPU devices (tests/fp8_mesh_worker.py): the GEMV kernel (interpret mode) under
    shard_map on each device's slice, N split and K split (a psum), both layouts, M = 1 and 9 == the float64
    product; an Engine with FP8 dense weights on 2 devices gives the 1-device greedy tokens, and the placed
    weights note their PartitionSpecs; a hub FP8 checkpoint loaded with dense="fp8" onto 2 devices holds the
    1-device load's arrays (split over the mesh) and decodes the same greedy tokens."""
    import json
    import subprocess
    import sys

    worker = Path(__file__).with_name("fp8_mesh_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert len(out["products"]) == 8 and all(err < 8e-3 for err in out["products"].values()), out["products"]
    assert out["engine"]["one"] == out["engine"]["two"] and len(out["engine"]["one"]) == 10
    assert out["engine"]["noted"] and any("model" in (s or []) for s in out["engine"]["noted"])
    every = out["engine_all"]  # o_proj and lm_head in FP8 too (lm_head split by vocab)
    assert every["one"] == every["two"] and len(every["one"]) == 10 and len(every["noted"]) > len(out["engine"]["noted"])
    loaded = out["loaded"]
    assert loaded["same_arrays"] and loaded["split"]
    assert loaded["greedy"][0] == loaded["greedy"][1] and len(loaded["greedy"][0]) == 6


def test_fp8_all_keeps_an_fp8_stored_o_proj_as_stored(tmp_path, monkeypatch):
    """A checkpoint that ships o_proj in FP8 too (MiMo's hub does not): dense="fp8_all" keeps its bytes (the
    dequantized values == the float32 load's, bit for bit), where dense="fp8" dequantizes it."""
    import hf_fixtures
    from hf_fixtures import fp8_round_trip, random_hf_model, save_hub_layout
    from mimo_jax.loader import load_checkpoint

    monkeypatch.setattr(hf_fixtures, "FP8_NAMES", re.compile(
        r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|eh_proj)\.weight$"))
    hf = random_hf_model(3, num_layers=3, window=5, hidden_size=64, moe_intermediate_size=32, n_routed_experts=8)
    fp8_round_trip(hf)
    path = save_hub_layout(hf, tmp_path / "hub", shards=1)
    _, ref = load_checkpoint(path, jnp.float32)
    _, got = load_checkpoint(path, jnp.float32, dense="fp8_all")
    wo = [w for p, w in jax.tree_util.tree_flatten_with_path(got["layers"], is_leaf=_is_fp8)[0]
          if "'wo'" in jax.tree_util.keystr(p)]
    assert wo and all(_is_fp8(w) and w.block == 8 for w in wo)  # the file's 8 x 8 blocks, as stored
    want = [w for p, w in jax.tree_util.tree_flatten_with_path(ref["layers"])[0] if "'wo'" in jax.tree_util.keystr(p)]
    for w, r in zip(wo, want):
        np.testing.assert_array_equal(np.asarray(fp8.dequantize(w)), np.asarray(r))
