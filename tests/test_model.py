"""Cached decoding == one full forward, for MiMo-shaped and Llama-shaped configs; the unrolled layout == the
scanned one; the layer plan."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import model, ops
from mimo_jax.config import load_config
from mimo_jax.engine import Engine
from mimo_jax.plan import Loop, Run, layer_slots, make_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def setup(name, seed=0, capacity=96):
    cfg = load_config(CONFIGS / f"{name}.json")
    params = model.init_params(cfg, jax.random.PRNGKey(seed), jnp.float32)
    return cfg, params, capacity


def full_forward(cfg, params, ids, capacity):
    cache = model.init_cache(cfg, 1, capacity, jnp.float32)
    logits, _ = model.forward(params, jnp.asarray([ids]), jnp.arange(len(ids), dtype=jnp.int32), cache, cfg)
    return np.asarray(logits[0])


def chunked_forward(cfg, params, ids, capacity, chunk, pad_to):
    """Feed ids `chunk` at a time, each padded to `pad_to` with position -1; collect the real rows."""
    cache = model.init_cache(cfg, 1, capacity, jnp.float32)
    rows = []
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        tokens = np.zeros((1, pad_to), np.int32)
        tokens[0, :len(piece)] = piece
        positions = np.where(np.arange(pad_to) < len(piece), start + np.arange(pad_to), -1).astype(np.int32)
        logits, cache = model.forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, cfg)
        rows.append(np.asarray(logits[0, :len(piece)]))
    return np.concatenate(rows)


@pytest.mark.parametrize("name,chunk,pad_to", [("tiny_mimo", 1, 1), ("tiny_mimo", 3, 4), ("tiny_mimo", 20, 32),
                                               ("tiny_llama", 1, 1), ("tiny_llama", 11, 16)])
def test_cached_decode_equals_full_forward(name, chunk, pad_to):
    cfg, params, capacity = setup(name)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=5 * 8 + 3).tolist()  # 5+ windows
    ref = full_forward(cfg, params, ids, capacity)
    got = chunked_forward(cfg, params, ids, capacity, chunk, pad_to)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["tiny_mimo", "tiny_llama"])
@pytest.mark.parametrize("fuse", [False, True])
def test_unrolled_layout_equals_scan(name, fuse):
    """model.unroll_layers (one buffer per layer, straight-line layers, q/k/v and gate/up fused) computes what
    the stacked scan computes: chunked prefill with padding, then decode, logits and caches."""
    cfg, params, capacity = setup(name, seed=5)
    unrolled = model.unroll_layers(params, cfg, fuse=fuse)
    assert len(unrolled["unrolled"]) == cfg.num_layers
    assert ("wqkv" in unrolled["unrolled"][0]["attn"]) == fuse and ("wq" in unrolled["unrolled"][0]["attn"]) != fuse
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, size=2 * 8 + 5).tolist()
    ref = chunked_forward(cfg, params, ids, capacity, 5, 8)
    got = chunked_forward(cfg, unrolled, ids, capacity, 5, 8)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_unrolled_engine_greedy_and_speculative_equal_scan():
    cfg, params, capacity = setup("tiny_mimo", seed=7)
    prompt = np.random.default_rng(8).integers(0, cfg.vocab_size, size=19).tolist()
    ref = Engine(cfg, params, max_seq_len=capacity, prefill_chunk=16, layout="scan")  # (CPU's auto is unrolled)
    ref = ref.generate(prompt, max_new_tokens=20).token_ids
    for k in (0, 3):
        e = Engine(cfg, params, max_seq_len=capacity, prefill_chunk=16, speculative_k=k, layout="unrolled")
        assert e.generate(prompt, max_new_tokens=20).token_ids == ref, k


@pytest.mark.parametrize("name", ["tiny_mimo", "tiny_llama"])
@pytest.mark.parametrize("layout,fuse,fold", [("scan", False, False), ("unrolled", False, False), ("scan", True, False),
                                             ("scan", False, True), ("unrolled", False, True), ("scan", True, True)])
def test_out_in_weights_compute_the_same(name, layout, fuse, fold):
    """ops.out_in_layout (small dense weights stored [N, K], what the Engine does on one GPU) keeps the logits
    of chunked prefill + decode; MoE expert stacks and non-layer weights are left as they are (routers go out-in:
    ops.OUT_IN_ROUTER)."""
    from mimo_jax import ops

    cfg, params, capacity = setup(name, seed=9)
    base = params if layout == "scan" else model.unroll_layers(params, cfg)
    conv = ops.out_in_layout(base, fuse=fuse, fold_norms=fold)
    leaves = jax.tree_util.tree_leaves(conv, is_leaf=lambda a: isinstance(a, ops.OutInWeight))
    moved = [w for w in leaves if isinstance(w, ops.OutInWeight)]
    assert moved and all(w.t.shape[-2:] == w.shape[-2:][::-1] for w in moved)
    if fuse:  # q/k/v and a dense layer's gate/up concatenated, then stored out-in
        attn = conv["layers"][0]["attn"] if isinstance(conv["layers"][0], dict) else conv["layers"][0][0]["attn"]
        assert isinstance(attn["wqkv"], ops.OutInWeight) and "wq" not in attn
    first = (conv["layers"][0] if isinstance(conv["layers"][0], dict) else conv["layers"][0][0]) if layout == "scan" \
        else conv["unrolled"][0]
    assert isinstance(first["attn_norm"], ops.FoldedNorm) == fold  # (a MoE block's mlp_norm is never folded)
    assert isinstance(first["mlp_norm"], ops.FoldedNorm) == (fold and "router" not in first["mlp"])
    layers = conv["layers"] if layout == "scan" else conv["unrolled"]
    for mlp in (m for m in jax.tree_util.tree_leaves(layers, is_leaf=lambda d: isinstance(d, dict) and "router" in d)
                if isinstance(m, dict)):
        assert not any(isinstance(v, ops.OutInWeight) for k, v in mlp.items() if k != "router")  # experts untouched
    assert conv["embed"] is base["embed"] and ops.out_in_layout(conv)["layers"] is not None  # idempotent
    ids = np.random.default_rng(10).integers(0, cfg.vocab_size, size=2 * 8 + 5).tolist()
    ref = chunked_forward(cfg, base, ids, capacity, 5, 8)
    got = chunked_forward(cfg, conv, ids, capacity, 5, 8)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_out_in_router_computes_the_same(monkeypatch, layout="unrolled"):
    """ops.OUT_IN_ROUTER: a MoE block's router stored out-in as well (its expert stacks untouched) keeps the logits
    and the routing of chunked prefill + decode (in the unrolled layout, MiMo's on a GPU)."""
    from mimo_jax import ops

    monkeypatch.setattr(ops, "OUT_IN_ROUTER", True)
    cfg, params, capacity = setup("tiny_mimo", seed=9)
    base = params if layout == "scan" else model.unroll_layers(params, cfg)
    conv = ops.out_in_layout(base)
    blocks = [m for m in jax.tree_util.tree_leaves(conv, is_leaf=lambda d: isinstance(d, dict) and "router" in d)
              if isinstance(m, dict) and "router" in m]
    assert blocks and all(isinstance(b["router"], ops.OutInWeight) for b in blocks)
    assert not any(isinstance(b.get(k), ops.OutInWeight) for b in blocks for k in ("w_gate", "w_up", "w_down"))
    ids = np.random.default_rng(10).integers(0, cfg.vocab_size, size=2 * 8 + 5).tolist()
    ref = chunked_forward(cfg, base, ids, capacity, 5, 8)
    got = chunked_forward(cfg, conv, ids, capacity, 5, 8)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_out_in_folds_a_norm_only_where_its_readers_go_out_in(monkeypatch):
    """A norm is folded only when every matrix reading it is stored out-in: with fuse, the fused one decides
    (small parts whose concatenation is over the limit keep their norm, else the layer would fail to trace)."""
    from mimo_jax import ops

    monkeypatch.setattr(ops, "OUT_IN_ELEMENTS", 100)
    one = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    layer = {"attn_norm": one(8), "mlp_norm": one(8), "attn": {"wq": one(8, 8), "wk": one(8, 4), "wv": one(8, 4)},
             "mlp": {"w_gate": one(8, 4), "w_up": one(8, 4), "w_down": one(4, 8)}}
    fused = ops.out_in_layout({"layers": [layer]}, fuse=True, fold_norms=True)["layers"][0]
    assert not isinstance(fused["attn_norm"], ops.FoldedNorm) and not isinstance(fused["attn"]["wqkv"], ops.OutInWeight)
    assert isinstance(fused["mlp_norm"], ops.FoldedNorm) and isinstance(fused["mlp"]["w_gate_up"], ops.OutInWeight)
    apart = ops.out_in_layout({"layers": [layer]}, fold_norms=True)["layers"][0]
    assert isinstance(apart["attn_norm"], ops.FoldedNorm) and isinstance(apart["attn"]["wq"], ops.OutInWeight)


@pytest.mark.parametrize("fuse_fold", [False, True])
def test_out_in_engine_greedy_and_speculative_equal_plain_layout(fuse_fold):
    from mimo_jax import ops

    cfg, params, capacity = setup("tiny_mimo", seed=11)  # (MTP layers: the speculative step drafts with them)
    prompt = np.random.default_rng(12).integers(0, cfg.vocab_size, size=13).tolist()
    ref = Engine(cfg, params, max_seq_len=capacity, prefill_chunk=16, layout="scan").generate(
        prompt, max_new_tokens=16).token_ids
    for k in (0, 3):
        e = Engine(cfg, ops.out_in_layout(params, fuse=fuse_fold, fold_norms=fuse_fold), max_seq_len=capacity, prefill_chunk=16, speculative_k=k,
                   layout="scan")
        assert e.generate(prompt, max_new_tokens=16).token_ids == ref, k


def test_speculative_step_with_its_own_unrolled_params(monkeypatch):
    """engine.SPEC_LAYOUT = "unrolled": a scan Engine's speculative generation runs on an unrolled copy of the
    layers, its prompt pass too (so the plain step's folded norms never reach it: session 12), with the scan's
    cache layout, and produces plain greedy's tokens (MTP drafter)."""
    from mimo_jax import engine as engine_mod, speculative

    cfg, params, capacity = setup("tiny_mimo", seed=13)
    prompt = np.random.default_rng(14).integers(0, cfg.vocab_size, size=21).tolist()
    ref = Engine(cfg, params, max_seq_len=capacity, prefill_chunk=16, layout="scan").generate(
        prompt, max_new_tokens=18).token_ids
    monkeypatch.setattr(engine_mod, "SPEC_LAYOUT", "unrolled")
    e = Engine(cfg, params, max_seq_len=capacity, prefill_chunk=16, speculative_k=3, layout="scan")
    assert "unrolled" in e.step_params and "unrolled" not in e.params
    prompt_pass, seen = speculative.target_chunk, []
    monkeypatch.setattr(speculative, "target_chunk", lambda p, *a, **kw: seen.append("unrolled" in p) or prompt_pass(p, *a, **kw))
    assert e.generate(prompt, max_new_tokens=18).token_ids == ref
    assert seen == [True, True]  # 21 prompt tokens: two chunks of 16, both on the step's params
    assert "unrolled" not in Engine(cfg, params, max_seq_len=capacity, layout="scan").step_params  # plain: no copy


def test_gpu_params_fold_norms_in_the_plain_step_only():
    """On one GPU the Engine stores small dense weights out-in with the norms folded (ops.OUT_IN_FOLD_NORMS) for
    its own params, and without folding for the speculative step's unrolled copy (measured slower at T = 9)."""
    cfg, params, capacity = setup("tiny_llama", seed=15)
    e = Engine(cfg, params, max_seq_len=capacity, layout="scan")
    is_folded = lambda t: any(isinstance(x, ops.FoldedNorm) for x in jax.tree_util.tree_leaves(
        t, is_leaf=lambda a: isinstance(a, ops.FoldedNorm)))
    plain = e._for_device(e.params, "gpu")
    step = e._for_device(model.unroll_layers(e.params, cfg), "gpu", fold_norms=False)
    assert is_folded(plain) == ops.OUT_IN_FOLD_NORMS and not is_folded(step)
    assert any(isinstance(x, ops.OutInWeight) for x in jax.tree_util.tree_leaves(
        step, is_leaf=lambda a: isinstance(a, ops.OutInWeight)))
    assert not is_folded(e._for_device(e.params, "gpu", fold_norms=False))


def test_engine_fold_norms_argument_reaches_the_plain_params(monkeypatch):
    """Engine(fold_norms=False) (the drafter trainers' target) converts its own params unfolded; None: the knob."""
    cfg, params, capacity = setup("tiny_llama", seed=15)
    seen = []
    convert = Engine._for_device
    monkeypatch.setattr(Engine, "_for_device", lambda self, p, platform, fold_norms=None: seen.append(fold_norms)
                        or convert(self, p, platform, fold_norms))
    Engine(cfg, params, max_seq_len=capacity, layout="scan", fold_norms=False)
    Engine(cfg, params, max_seq_len=capacity, layout="scan")
    assert seen == [False, None]


def test_engine_greedy_equals_argmax_of_full_forward():
    cfg, params, capacity = setup("tiny_mimo", seed=3)
    engine = Engine(cfg, params, max_seq_len=capacity, prefill_chunk=16)
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, size=21).tolist()
    out = engine.generate(prompt, max_new_tokens=30).token_ids
    seq = list(prompt)
    for _ in range(30):  # no cache reuse: re-run the whole sequence each step (padded to 64: one compilation)
        tokens = np.zeros((1, 64), np.int32)
        tokens[0, :len(seq)] = seq
        positions = np.where(np.arange(64) < len(seq), np.arange(64), -1).astype(np.int32)
        logits, _ = model.forward(params, jnp.asarray(tokens), jnp.asarray(positions),
                                  model.init_cache(cfg, 1, capacity, jnp.float32), cfg)
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    assert out == seq[len(prompt):]


def test_score_matches_full_forward_across_chunks():
    cfg, params, capacity = setup("tiny_mimo", seed=4)
    engine = Engine(cfg, params, max_seq_len=capacity, prefill_chunk=16)
    ids = list(range(3, 3 + 50))
    np.testing.assert_allclose(engine.score(ids), full_forward(cfg, params, ids, capacity), rtol=2e-5, atol=1e-5)


def test_ring_buffer_size_is_the_window_not_the_context():
    cfg = load_config(CONFIGS / "mimo_v2_flash.json")
    shapes = model.cache_shapes(cfg, batch=1, capacity=65536)
    sizes = {leaf.shape[-3] for leaf in jax.tree_util.tree_leaves(shapes)}
    assert sizes == {65536, model.ring_length(cfg.sliding_window)} and model.ring_length(cfg.sliding_window) <= cfg.sliding_window + 16
    full_bytes = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes) if s.shape[-3] == 65536)
    all_bytes = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
    assert all_bytes < 1.1 * full_bytes  # the 39 SWA layers add < 10% at 64K context


def test_plan_covers_every_layer_once_in_order():
    for kinds in [(("f", "d"),) + (("s", "m"),) * 4 + ((("f", "m"),) + (("s", "m"),) * 5) * 7,
                  (("f", "d"),) * 30, tuple(("s" if i % 3 else "f", "m") for i in range(17)), (("f", "d"),)]:
        plan = make_plan(kinds)
        slots = layer_slots(plan)
        assert len(slots) == len(kinds)
        for kind, slot in zip(kinds, slots):
            item = plan[slot.item]
            run = item if isinstance(item, Run) else item.runs[slot.run]
            assert run.kind == kind
        assert len(set(slots)) == len(slots)


def test_flash_plan_traces_few_bodies():
    cfg = load_config(CONFIGS / "mimo_v2_flash.json")
    plan = model.plan_of(cfg)
    bodies = sum(1 if isinstance(i, Run) else len(i.runs) for i in plan)
    assert bodies <= 5 and any(isinstance(i, Loop) and i.repeats == 7 for i in plan)


def test_scan_unroll_computes_the_same(monkeypatch):
    """model.SCAN_UNROLL (layers per scan iteration; 3 layers at 2 per iteration leave a remainder): the lowered
    step changes, its logits do not."""
    cfg, params, capacity = setup("tiny_llama", seed=21)
    tokens, positions = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32), jnp.arange(5, dtype=jnp.int32)

    def run(unroll):
        monkeypatch.setattr(model, "SCAN_UNROLL", unroll)
        fwd = jax.jit(lambda p, c: model.forward_hidden(p, tokens, positions, c, cfg))  # a new trace per setting
        cache = model.init_cache(cfg, 1, capacity, jnp.float32)
        return np.asarray(fwd(params, cache)[0]), fwd.lower(params, cache).as_text()

    (one, text1), (two, text2) = run(1), run(2)
    assert text1 != text2
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-6)

