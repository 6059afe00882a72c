"""Batched decoding: every slot's output equals its batch-1 Engine.generate (greedy and sampled, requests of
different lengths inserted at different times, cancelled ones freeing their slots), one compiled step; batched
speculative steps (batched_speculative.py) likewise, slot by slot."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafters import FLAKY
from mimo_jax import batch_state, batched_speculative, batching, model
from mimo_jax.batching import Batcher, Request
from mimo_jax.config import load_config
from mimo_jax.engine import Engine

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CAPACITY = 128  # the reference Engine's max_seq_len too: both attend over the same cache length


@pytest.fixture(scope="module")
def tiny():
    """tiny_mimo's first 4 layers: full and sliding (window 8) layers, sinks, dense and MoE, one MTP layer (every
    kind of cache and layer its 8 have, at half the compile time); an Engine with the batcher's capacity."""
    cfg = load_config(CONFIGS / "tiny_mimo.json").first_layers(4, num_mtp_layers=1)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    return Engine(cfg, params, max_seq_len=CAPACITY, prefill_chunk=16)


def prompt(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def drive(batcher, schedule):
    """Tick until every request is done; schedule: {tick number: [requests to submit then]}."""
    tick, requests = 0, []
    while True:
        for r in schedule.pop(tick, []):
            requests.append(batcher.submit(r))
        worked = batcher.tick()
        tick += 1
        if not worked and not schedule:
            return requests


# (prompt length, max_new_tokens, submitted at tick): prompts of 1 to 3 prefill chunks (16 tokens each), more
# requests than slots, some arriving while others decode, one that ends at its first token
REQUESTS = [(5, 20, 0), (21, 7, 0), (37, 30, 0), (9, 12, 0), (50, 25, 3), (3, 1, 4), (16, 18, 9), (2, 40, 30)]


@pytest.mark.slow
def test_greedy_slots_equal_batch_one(tiny):
    before = batch_state.generate._cache_size()
    schedule = {}
    for i, (n, new, at) in enumerate(REQUESTS):
        schedule.setdefault(at, []).append(Request(prompt(n, i), max_new_tokens=new, stop_at_eos=False))
    batcher = Batcher(tiny, batch_size=3, capacity=CAPACITY)
    calls = record_prefills(batcher)
    done = drive(batcher, schedule)
    assert len(done) == len(REQUESTS)
    for r in done:
        reference = tiny.generate(r.ids, max_new_tokens=r.max_new_tokens, stop_at_eos=False)
        assert r.token_ids == reference.token_ids
        assert r.finish_reason == "length" and r.stats.new_tokens == r.max_new_tokens
    assert len(set(done[2].token_ids)) > 6  # a model that does not repeat one token
    # one compiled step per power-of-two count of busy slots (1, 2, and all 3) for all 8 requests
    assert batch_state.generate._cache_size() - before <= 3
    # the first chunks of the 3 requests admitted at once in one call, the later chunks of two of them in another
    assert (True, 3, 16, 3) in calls and (False, 2, 16, 2) in calls, calls


@pytest.mark.slow
def test_sampling_per_slot_equals_batch_one(tiny):
    """Greedy and sampled slots side by side, each its own settings and seed: the same tokens as
    Engine.generate with those settings (each token keyed by its request's seed and position)."""
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=5, seed=4),
                dict(temperature=1.3, top_p=0.8, seed=5), dict(temperature=1.0, seed=3)]
    requests = [Request(prompt(7 + 5 * i, 10 + i), max_new_tokens=15, stop_at_eos=False, **s)
                for i, s in enumerate(settings)]
    done = drive(Batcher(tiny, batch_size=4, capacity=CAPACITY), {0: requests[:3], 5: requests[3:]})
    for r, s in zip(done, settings):
        assert r.token_ids == tiny.generate(r.ids, max_new_tokens=15, stop_at_eos=False, **s).token_ids


@pytest.mark.slow
def test_cancel_frees_the_slot_at_once(tiny):
    batcher = Batcher(tiny, batch_size=2, capacity=CAPACITY)
    a = batcher.submit(Request(prompt(10, 1), max_new_tokens=50))
    b = batcher.submit(Request(prompt(12, 2), max_new_tokens=50))
    waiting = batcher.submit(Request(prompt(6, 3), max_new_tokens=5))
    queued_then_cancelled = batcher.submit(Request(prompt(6, 4), max_new_tokens=5))
    for _ in range(6):
        batcher.tick()
    assert batcher.slots_in_use == 2 and len(a.token_ids) >= 3
    batcher.cancel(queued_then_cancelled)
    batcher.cancel(a)
    batcher.tick()
    assert a.finish_reason == "cancelled" and a.done.is_set()
    assert queued_then_cancelled.finish_reason == "cancelled" and not queued_then_cancelled.token_ids
    assert batcher.slots[0] is waiting  # the freed slot is taken by the next waiting request
    batcher.cancel(b)
    while batcher.tick():
        pass
    assert batcher.slots_in_use == 0 and batcher.requests_cancelled == 3
    assert waiting.token_ids == tiny.generate(waiting.ids, max_new_tokens=5).token_ids


def test_eos_and_first_token_finish(tiny):
    reference = tiny.generate(prompt(11, 7), max_new_tokens=12, stop_at_eos=False).token_ids
    eos = reference[4]
    engine = Engine(tiny.cfg, tiny.params, tokenizer=_EosOnly({eos}), max_seq_len=CAPACITY, prefill_chunk=16)
    batcher = Batcher(engine, batch_size=2, capacity=CAPACITY)
    r = batcher.submit(Request(prompt(11, 7), max_new_tokens=12))
    one = batcher.submit(Request(prompt(11, 7), max_new_tokens=1))
    while batcher.tick():
        pass
    assert r.token_ids == reference[:reference.index(eos) + 1] and r.finish_reason == "eos"
    assert one.token_ids == reference[:1] and one.finish_reason == "length"
    assert batcher.slots_in_use == 0


def test_context_limit(tiny):
    """A slot's capacity ends a request first: finish reason "context", as Engine with that max_seq_len."""
    ids = prompt(20, 8)
    batcher = Batcher(tiny, batch_size=2, capacity=CAPACITY)
    r = batcher.submit(Request(ids, max_new_tokens=500, stop_at_eos=False))
    while batcher.tick():
        pass
    assert r.finish_reason == "context" and len(r.token_ids) == CAPACITY - len(ids)
    assert r.token_ids == tiny.generate(ids, max_new_tokens=CAPACITY - len(ids), stop_at_eos=False).token_ids


def test_generate_all_in_input_order(tiny):
    prompts = [prompt(n, 20 + n) for n in (4, 30, 9, 17, 2)]
    seen = []
    out = batching.generate_all(tiny, prompts, batch_size=2, max_new_tokens=6, stop_at_eos=False,
                                on_done=lambda i, g: seen.append(i))
    assert sorted(seen) == list(range(len(prompts)))
    for p, g in zip(prompts, out):
        assert g.token_ids == tiny.generate(p, max_new_tokens=6, stop_at_eos=False).token_ids
        assert g.stats.new_tokens == 6 and g.stats.finish_reason == "length"
    compiled = batch_state.generate._cache_size()
    again = batching.generate_all(tiny, [prompt(n, 60 + n) for n in (7, 3, 25, 11, 5, 8)], batch_size=2,
                                  max_new_tokens=6, stop_at_eos=False)
    assert len(again) == 6 and batch_state.generate._cache_size() == compiled  # new requests, no new compilation


@pytest.mark.slow
def test_warm_up_compiles_what_serving_runs(tiny):
    """After Batcher.warm_up, requests of any prompt length, sampled or greedy, at any occupancy compile nothing."""
    batcher = Batcher(tiny, batch_size=4, capacity=CAPACITY)
    batcher.warm_up()
    assert batcher.requests_total == 0 and batcher.slots_in_use == 0
    compiled = batch_state.generate._cache_size(), batch_state.prefill._cache_size(), batch_state.free._cache_size()
    schedule = {0: [Request(prompt(n, n), max_new_tokens=5, temperature=t, seed=1)
                    for n, t in ((3, 0.0), (40, 1.0), (17, 0.0))],
                2: [Request(prompt(9, 1), max_new_tokens=9), Request(prompt(33, 2), max_new_tokens=3)]}
    calls = record_prefills(batcher)
    drive(batcher, schedule)
    assert (batch_state.generate._cache_size(), batch_state.prefill._cache_size(), batch_state.free._cache_size()) == compiled
    assert any(n > 1 for *_, n in calls)


def test_bad_requests_refused(tiny):
    from mimo_jax.errors import InputError

    batcher = Batcher(tiny, batch_size=1, capacity=CAPACITY)
    for bad in (Request([]), Request([1] * CAPACITY), Request([1], max_new_tokens=0), Request([999]),
                Request([1], temperature=-1.0), Request([1], top_p=0.0)):
        with pytest.raises(InputError):
            batcher.submit(bad)
    assert batcher.waiting == 0


@pytest.mark.slow
def test_per_row_positions_equal_shared_positions(tiny):
    """model.forward with positions [B, T] (each row its own offset; rows of -1 padding) == each row alone with
    positions [T]. Prefixes are padded to one chunk of 16 so that few shapes compile."""
    cfg, params = tiny.cfg, tiny.params
    rows, starts = [prompt(20, 40 + i) for i in range(3)], [3, 11, 16]  # 11, 16 > window 8: the rings wrap

    def chunk(ids, start, n, size):
        positions = np.where(np.arange(size) < n, start + np.arange(size), -1).astype(np.int32)
        tokens = np.zeros(size, np.int32)
        tokens[:n] = ids[start:start + n]
        return tokens, positions

    singles = []
    for ids, start in zip(rows, starts):
        c = model.init_cache(cfg, 1, 64, jnp.float32)
        tokens, positions = chunk(ids, 0, start, 16)
        _, c = model.forward(params, jnp.asarray(tokens[None]), jnp.asarray(positions), c, cfg)
        tokens, positions = chunk(ids, start, 4, 4)
        logits, _ = model.forward(params, jnp.asarray(tokens[None]), jnp.asarray(positions), c, cfg)
        singles.append(logits[0])
    cache = model.init_cache(cfg, 3, 64, jnp.float32)
    for b in range(3):  # row b's prefix, the other rows all padding (their caches must stay untouched)
        tokens, positions = np.zeros((3, 16), np.int32), np.full((3, 16), -1, np.int32)
        tokens[b], positions[b] = chunk(rows[b], 0, starts[b], 16)
        _, cache = model.forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, cfg)
    both = [chunk(ids, s, 4, 4) for ids, s in zip(rows, starts)]
    tokens, positions = np.stack([t for t, _ in both]), np.stack([p for _, p in both])
    logits, _ = model.forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, cfg)
    for b in range(3):
        np.testing.assert_allclose(logits[b], singles[b], atol=1e-5, rtol=1e-5)


def record_prefills(batcher):
    """Record (fresh, rows, chunk length, requests) of every batched prefill call the batcher makes."""
    calls, call = [], batcher._prefill_call

    def recording(group, fresh, rows, size):
        calls.append((fresh, rows, size, len(group)))
        return call(group, fresh, rows, size)

    batcher._prefill_call = recording
    return calls


@pytest.mark.slow
def test_batched_prefill_padding_never_reaches_the_rings(tiny):
    """Prompts of 37, 3, 20 and 9 tokens prefilled in ONE call of 4 rows x 64 tokens (the chunk bucket of the
    oldest): each row's padding spans positions up to 63, past the sliding layers' 16-slot rings several times
    over (window 8). Right after that call every slot's rings and full-layer positions equal a batch-1 prefill's
    cache (a padding entry written at p % 16 would replace a visible one), and decoding on gives every request
    its batch-1 greedy output."""
    from mimo_jax import engine as engine_module

    engine = Engine(tiny.cfg, tiny.params, max_seq_len=CAPACITY, prefill_chunk=64)
    batcher = Batcher(engine, batch_size=4, capacity=CAPACITY)
    calls = record_prefills(batcher)
    requests = [batcher.submit(Request(prompt(n, 70 + n), max_new_tokens=9, stop_at_eos=False))
                for n in (37, 3, 20, 9)]
    batcher._prefill_some()
    assert calls == [(True, 4, 64, 4)]
    full = batch_state._full_layers(tiny.cfg)
    rings = 0
    for r in requests:
        cache = engine.new_cache(CAPACITY)
        for tokens, positions, _ in engine._chunks(r.ids):
            _, cache = engine_module._prefill(engine.params, tokens, positions, cache, engine.cfg)

        def same(path, slot_leaf, one, is_full):
            nonlocal rings
            row = np.asarray(slot_leaf)[(slice(None),) * (slot_leaf.ndim - 4) + (r.slot,)]
            want = np.asarray(one)[(slice(None),) * (one.ndim - 4) + (0,)]
            if is_full:  # positions the prompt wrote (later ones are masked for every query)
                row, want = row[..., :len(r.ids), :, :], want[..., :len(r.ids), :, :]
            else:
                rings += 1
            np.testing.assert_allclose(row, want, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))

        jax.tree_util.tree_map_with_path(same, batcher.state["cache"], cache, full)
    assert rings > 0
    while batcher.tick():
        pass
    for r in requests:
        assert r.token_ids == engine.generate(r.ids, max_new_tokens=9, stop_at_eos=False).token_ids


# speculative: (prompt length, max_new_tokens, submitted at tick), 2 slots, requests waiting for a slot
SPEC_REQUESTS = [(5, 21, 0), (37, 9, 0), (21, 26, 0), (9, 1, 2), (3, 14, 5), (16, 17, 9)]


@pytest.mark.slow
def test_speculative_greedy_slots_equal_batch_one(tiny):
    """Batched speculative steps with a drafter whose drafts are each wrong with probability 0.15: slots accept
    different counts in the same step (0 < n < k included), and every slot's output is its batch-1 greedy output;
    one compiled step per slot bucket."""
    before = batched_speculative.generate._cache_size()
    schedule = {}
    for i, (n, new, at) in enumerate(SPEC_REQUESTS):
        schedule.setdefault(at, []).append(Request(prompt(n, 30 + i), max_new_tokens=new, stop_at_eos=False))
    batcher = Batcher(tiny, batch_size=2, capacity=CAPACITY, speculative_k=3, drafter=FLAKY)
    calls = record_prefills(batcher)
    done = drive(batcher, schedule)
    assert (True, 2, 16, 2) in calls  # the first two admitted together
    hist = np.sum([r.stats.accepted_hist for r in done if r.max_new_tokens > 1], axis=0)
    for r in done:
        assert r.token_ids == tiny.generate(r.ids, max_new_tokens=r.max_new_tokens, stop_at_eos=False).token_ids
        assert r.finish_reason == "length" and r.stats.new_tokens == r.max_new_tokens
    assert hist[0] > 0 and hist[3] > 0 and sum(hist[1:3]) > 0, hist
    assert batched_speculative.generate._cache_size() - before <= 2  # slot buckets 1 and 2, greedy


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [False, True])
def test_speculative_mtp_sampling_per_slot_equals_batch_one(tiny, tmp_path, vocab):
    """The MTP drafter, greedy and sampled slots in the same steps: a greedy slot gives plain greedy output, a
    sampled one exactly the tokens of the batch-1 speculative Engine with its seed (whose sampling is lossless:
    test_speculative.py), each keyed by its own seed and positions. vocab: the model's own MTP layers from a file
    with a draft vocabulary (half the tokens; its lm_head rows under params["drafter"])."""
    drafter = "mtp"
    if vocab:
        from mimo_jax import mtp_drafter

        drafter = str(tmp_path / "mtp.safetensors")
        mtp_drafter.save(drafter, tiny.params["mtp"], tiny.cfg, tiny.cfg, dtype=np.float32,
                         vocab=np.arange(0, tiny.cfg.vocab_size, 2))
    spec = Engine(tiny.cfg, tiny.params, max_seq_len=CAPACITY, prefill_chunk=16, speculative_k=2, drafter=drafter)
    assert ("drafter" in spec.step_params) == vocab
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=6, seed=4)]
    requests = [Request(prompt(6 + 13 * i, 50 + i), max_new_tokens=12 + 3 * i, stop_at_eos=False, **s)
                for i, s in enumerate(settings)]
    batcher = Batcher(spec, batch_size=2, capacity=CAPACITY)
    assert batcher.speculative_k == 2  # the engine's
    done = drive(batcher, {0: requests[:2], 3: requests[2:]})
    assert done[0].token_ids == tiny.generate(done[0].ids, max_new_tokens=12, stop_at_eos=False).token_ids
    for r, s in zip(done, settings):
        want = spec.generate(r.ids, max_new_tokens=r.max_new_tokens, stop_at_eos=False, **s)
        assert r.token_ids == want.token_ids, s
    assert batcher.slot_steps_total == sum(sum(r.stats.accepted_hist) for r in done)


@pytest.mark.slow
@pytest.mark.parametrize("taps", [(), (0,)])
def test_speculative_block_drafter_slots_equal_batch_one(tmp_path, taps):
    """A block drafter (its own state and prefill hooks, weights under params["drafter"]; random weights, a file
    as train_drafter writes them; conditioned on the last layer, or also on layer 0's output) on tiny_llama:
    greedy and sampled slots equal the batch-1 speculative Engine, accepted counts included."""
    from mimo_jax import block_drafter

    cfg = load_config(CONFIGS / "tiny_llama.json")
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    d = block_drafter.BlockConfig.for_target(cfg, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                                             window=32, block_size=4, draft_vocab=64, target_layers=taps)
    block_drafter.save(tmp_path / "d.safetensors", d, block_drafter.init_weights(d, jax.random.PRNGKey(1)),
                       np.arange(64), cfg)
    spec = Engine(cfg, params, max_seq_len=CAPACITY, prefill_chunk=16, speculative_k=3,
                  drafter=str(tmp_path / "d.safetensors"))
    requests = [Request(np.random.default_rng(n).integers(0, cfg.vocab_size, n).tolist(), max_new_tokens=m,
                        stop_at_eos=False, temperature=t, seed=3)
                for n, m, t in ((5, 14, 0.0), (23, 11, 1.0), (9, 8, 0.0))]
    done = drive(Batcher(spec, batch_size=2, capacity=CAPACITY), {0: requests[:2], 2: requests[2:]})
    for r in done:
        want = spec.generate(r.ids, max_new_tokens=r.max_new_tokens, stop_at_eos=False, temperature=r.temperature,
                             seed=3)
        assert r.token_ids == want.token_ids and r.stats.accepted_hist == want.stats.accepted_hist


class _EosOnly:
    def __init__(self, eos_ids):
        self.eos_ids = eos_ids

    def decode(self, ids):
        return ""
