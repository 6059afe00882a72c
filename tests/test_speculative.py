"""Speculative decoding: greedy output identical to plain greedy, sampling lossless, one compilation."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import block_drafter, model, speculative
from mimo_jax.config import load_config
from mimo_jax.engine import Engine
from drafters import FLAKY, ORACLE, WRONG, speculative_greedy
from sampling_stats import chi2_check, exact_dists

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny():
    # window 8, 2 MTP layers; the first 4 layers (full + dense, sliding + MoE, sliding + MoE, full + MoE): the
    # properties below hold layer by layer, the compile and per-call time grow with the layer count
    cfg = load_config(CONFIGS / "tiny_mimo.json").first_layers(4)
    return cfg, model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)


def engine(cfg, params, **kw):
    return Engine(cfg, params, max_seq_len=256, prefill_chunk=16, **kw)


BLOCK = "block"  # a random-weight block drafter for the test's config (block_file)


def block_file(cfg, directory, draft_vocab):
    """A random block drafter for cfg (draft vocabulary: every other token, so q is -inf on the rest), scaled so
    that its drafts are sometimes right on a random target."""
    d = block_drafter.BlockConfig.for_target(cfg, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                                             window=16, block_size=4, draft_vocab=draft_vocab)
    path = directory / f"block_{cfg.vocab_size}.safetensors"
    vocab = np.arange(cfg.vocab_size)[::cfg.vocab_size // draft_vocab][:draft_vocab]
    block_drafter.save(path, d, block_drafter.init_weights(d, jax.random.PRNGKey(5)), vocab, cfg)
    return str(path)


@pytest.mark.parametrize("drafter,k", [("mtp", 4), ("mtp", 8), (ORACLE, 8), (WRONG, 3), (FLAKY, 3), (FLAKY, 10),
                                       (BLOCK, 3), (BLOCK, 8)], ids=lambda v: getattr(v, "name", None))
def test_greedy_speculative_equals_plain_greedy(tiny, drafter, k, tmp_path):
    """Output identical to plain greedy whatever the drafts; FLAKY makes steps that accept only part of the
    drafts: the rejected positions were written to the caches, and the SWA rings' k + 1 spare slots must keep
    them from overwriting anything a later query sees (with k = 10 and no slack, the ring of 16 slots for window
    8 loses entries and the output differs)."""
    cfg, params = tiny
    if drafter == BLOCK:  # k = 8 runs 8 slots, more than the 4 it was made with
        drafter = block_file(cfg, tmp_path, 128)
    partial = 0  # steps that accepted some drafts but not all
    for seed in (0, 1):
        prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, 37).tolist()  # > 4 windows
        plain = engine(cfg, params).generate(prompt, max_new_tokens=50)  # > 6 windows
        spec = engine(cfg, params, speculative_k=k, drafter=drafter).generate(prompt, max_new_tokens=50)
        assert spec.token_ids == plain.token_ids
        hist = spec.stats.accepted_hist
        partial += sum(hist[1:k])
        if drafter is ORACLE:  # every step accepts all k (the last may be cut by the budget)
            assert sum(hist[:k]) <= 1 and hist[k] >= (50 - 1) // (k + 1) - 1
        if drafter is WRONG:
            assert hist[0] == spec.stats.spec_steps and spec.stats.mean_accepted == 0
        if drafter is FLAKY:
            assert hist[0] > 0 and hist[k] > 0, hist
    if drafter is FLAKY:
        assert partial >= 4


def test_speculative_step_compiles_once(tiny):
    cfg, params = tiny
    e = engine(cfg, params, speculative_k=4)
    e.generate([1, 2, 3], max_new_tokens=20)
    before = speculative.step._cache_size()
    for prompt in ([5, 6, 7, 8, 9], list(range(40)), [3] * 17):  # other prompts, same cache bucket
        out = e.generate(prompt, max_new_tokens=30)
        assert out.stats.spec_steps > 3
    assert speculative.step._cache_size() == before  # every step of every request reused one executable


def test_cpu_steps_of_eight_or_more_drafts_compile_with_eigen_dots(tiny):
    """On a CPU, k >= 8 runs a separate compile of the same step with YNNPACK off (its optimized HLO has no
    __ynn_fusion, the default compile's has), k < 8 and other backends the default one; the greedy-equality test
    above covers the Eigen compile's output (k = 8, 10)."""
    assert speculative.step_functions(7, "cpu") == (speculative.step, speculative.steps)
    assert speculative.step_functions(8, "gpu") == (speculative.step, speculative.steps)
    eigen = speculative.step_functions(8, "cpu")
    if not speculative._cpu_takes_eigen_options():
        pytest.skip("this jaxlib's XLA:CPU has no xla_cpu_experimental_ynn_fusion_type")
    assert eigen == (speculative._step_eigen, speculative._steps_eigen)
    cfg, params = tiny
    e = engine(cfg, params, speculative_k=8)
    default = speculative.step._cache_size(), speculative.steps._cache_size()
    e.generate([1, 2, 3], max_new_tokens=12)
    # the Engine took the Eigen compile (a cache entry; the k = 8 tests above may have made it) and not the default
    assert speculative._step_eigen._cache_size() + speculative._steps_eigen._cache_size() >= 1
    assert (speculative.step._cache_size(), speculative.steps._cache_size()) == default

    x, w = jnp.ones((9, 256), jnp.float32), jnp.ones((256, 256), jnp.float32)
    def hlo(options):
        return jax.jit(lambda a, b: a @ b, compiler_options=options).lower(x, w).compile().as_text()
    assert "__ynn_fusion" in hlo({}) or "ynn" not in hlo({}).lower()  # (a jaxlib without YNNPACK: nothing to see)
    assert "ynn" not in hlo(speculative.CPU_EIGEN_OPTIONS).lower()


@pytest.mark.parametrize("drafter,settings", [("mtp", (1.0, 0, 1.0)), ("mtp", (0.8, 5, 0.9)),
                                              ("mtp_vocab", (0.8, 5, 0.9)), (ORACLE, (1.0, 0, 1.0)),
                                              (BLOCK, (0.8, 5, 0.9))],
                         ids=lambda v: getattr(v, "name", None))
def test_sampling_is_lossless(drafter, settings, tmp_path):
    """Chi-square goodness of fit, over N = 1500 fixed seeds with k = 2, of the joint of tokens 1 and 2 (the
    first token, then the first speculative step) against p(t1) p(t2 | t1), and of the marginal of token 3
    (a later step) against the target's exact one; reject at p < 1e-3. A drafter that biases the output (e.g.
    always accepting), or a step drawing with the first token's key, fails this."""
    cfg = load_config(CONFIGS / "tiny_mimo.json").first_layers(2, vocab_size=16)  # (6000 generate calls)
    params = model.init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    params = {**params, "embed": params["embed"] * 0.5}
    if drafter == BLOCK:  # a draft vocabulary of 8 of the 16 tokens: q = 0 on the others
        drafter = block_file(cfg, tmp_path, 8)
    if drafter == "mtp_vocab":  # the model's own MTP layers from a file with a draft vocabulary of 8 of 16 tokens
        from mimo_jax import mtp_drafter

        drafter = str(tmp_path / "mtp.safetensors")
        mtp_drafter.save(drafter, params["mtp"], cfg, cfg, dtype=np.float32, vocab=np.arange(0, 16, 2))
    temperature, top_k, top_p = settings
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    p1, p2, p3 = exact_dists(cfg, params, prompt, (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)), 3)
    joint12 = p1[:, None] * p2
    m3 = np.einsum("ab,abc->c", joint12, p3)
    e = Engine(cfg, params, max_seq_len=64, prefill_chunk=16, speculative_k=2, drafter=drafter)
    n, v = 1500, cfg.vocab_size
    counts12, counts3 = np.zeros((v, v)), np.zeros(v)
    accepted = 0
    for seed in range(n):
        out = e.generate(prompt, max_new_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        counts12[out.token_ids[0], out.token_ids[1]] += 1
        counts3[out.token_ids[2]] += 1
        accepted += out.stats.accepted_hist[0] < out.stats.spec_steps
    assert 0.05 * n < accepted  # rejections and acceptances both happen
    chi2_check(counts12, joint12, n)
    chi2_check(counts3, m3, n)


def test_mtp_refresh_feeds_every_layer_true_inputs(tiny):
    """speculative.mtp_chain over a sequence in the pieces a decode makes (a prompt chunk, then steps of
    n + 1 accepted positions with the rest padding) leaves every MTP layer's cache and carry as one pass over
    the whole sequence does: the deeper layers hold true inputs, not the drafts' (before, only layer 0 did)."""
    cfg, params = tiny
    t = 30
    rng = np.random.default_rng(0)
    normed = jnp.asarray(rng.normal(size=(1, t, cfg.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)
    fresh = lambda: speculative.mtp_init(params, cfg, 4, jnp.float32)  # noqa: E731
    chain = jax.jit(speculative.mtp_chain, static_argnames="cfg")
    _, whole = chain(params, normed, tokens, jnp.arange(t, dtype=jnp.int32), fresh(), cfg=cfg)
    state, start = fresh(), 0
    for n in (11, 3, 1, 5, 2, 4, 4):  # positions per call; calls after the first hold k + 1 = 5 slots
        width = n if start == 0 else 5
        idx = np.minimum(start + np.arange(width), t - 1)
        pos = jnp.asarray(np.where(np.arange(width) < n, start + np.arange(width), -1), jnp.int32)
        _, state = chain(params, normed[:, idx], tokens[:, idx], pos, state, cfg=cfg)
        start += n
    assert start == t
    np.testing.assert_allclose(np.asarray(state["carry"]), np.asarray(whole["carry"]), atol=1e-5)
    for j in range(cfg.num_mtp_layers):
        for name in ("k", "v"):
            np.testing.assert_allclose(np.asarray(state["kv"][name][j]), np.asarray(whole["kv"][name][j]), atol=1e-5)


@pytest.mark.parametrize("layout", ["scan", "unrolled"])
def test_forward_hidden_taps_intermediate_layers(tiny, layout):
    """model.forward_hidden(..., taps=...) returns the named layers' outputs in both layouts (tiny_mimo's plan has
    runs and a loop): equal across layouts, the last layer's tap is the hidden state, and without taps the
    result is the 2-tuple it always was."""
    cfg, params = tiny
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 11)), jnp.int32)
    pos = jnp.arange(11, dtype=jnp.int32)
    taps = (0, 1, 2, cfg.num_layers - 1)
    fwd = jax.jit(model.forward_hidden, static_argnames=("cfg", "taps"))
    p = params if layout == "scan" else model.unroll_layers(params, cfg)
    hidden, _, got = fwd(p, tokens, pos, model.init_cache(cfg, 1, 32, jnp.float32), cfg=cfg, taps=taps)
    ref_hidden, _, ref = fwd(model.unroll_layers(params, cfg, fuse=False), tokens, pos,
                             model.init_cache(cfg, 1, 32, jnp.float32), cfg=cfg, taps=taps)
    assert len(got) == 4 and len(fwd(p, tokens, pos, model.init_cache(cfg, 1, 32, jnp.float32), cfg=cfg)) == 2
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got[-1]), np.asarray(hidden))
    assert not np.allclose(np.asarray(got[0]), np.asarray(got[1]))


def test_multi_layer_block_drafter_greedy_equals_plain(tiny, tmp_path):
    """A block drafter conditioned on target layers 1 and 2 and the last (random weights, the taps' fc rows
    non-zero so they matter): greedy speculative output == plain greedy, through the verify pass's taps and the
    prompt pass's (Engine.generate, and the reference loop tests/drafters.speculative_greedy); the file
    records the layers."""

    cfg, params = tiny
    d = block_drafter.BlockConfig.for_target(cfg, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                                             window=16, block_size=4, draft_vocab=128, target_layers=(1, 2))
    w = block_drafter.init_weights(d, jax.random.PRNGKey(5))
    w["fc"] = w["fc"] + 0.3 * jax.random.normal(jax.random.PRNGKey(6), w["fc"].shape) / np.sqrt(d.feature_size)
    path = tmp_path / "multi.safetensors"
    block_drafter.save(path, d, w, np.arange(0, 256, 2), cfg)
    assert block_drafter.load(path, target=cfg)[0].target_layers == (1, 2)
    spec = engine(cfg, params, speculative_k=4, drafter=str(path))
    assert spec.drafter.taps == (1, 2)
    for seed in (0, 1):
        prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, 37).tolist()
        plain = engine(cfg, params).generate(prompt, max_new_tokens=40, stop_at_eos=False)
        out, hist, _ = speculative_greedy(spec, prompt, 40)
        assert out == plain.token_ids and hist.sum() > 5
        assert spec.generate(prompt, max_new_tokens=40, stop_at_eos=False).token_ids == plain.token_ids
