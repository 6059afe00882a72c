"""Test-only drafters (STYLE 11): the target's own greedy continuation (speculative.ORACLE), made wrong where
a test wants it, so a test chooses how many drafts a step accepts; speculative_greedy, a reference loop; and
the trainers' tests' tiny random target with its greedy continuations (tiny_target, greedy_data).

  WRONG  every draft is wrong: each step accepts 0
  FLAKY  each draft is wrong with probability 0.15 (keyed by the step): steps accept 0 < n < k as well
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import speculative


def _corrupted_oracle(params, state, key, settings, cfg, k, is_greedy, wrong):
    drafts, _, mtp_cache = speculative.ORACLE.propose(params, state, key, settings, cfg, k, is_greedy)
    drafts = jnp.where(wrong(key, k)[None], (drafts + 1) % cfg.vocab_size, drafts).astype(jnp.int32)
    return drafts, speculative.one_hot_logits(drafts, cfg.vocab_size), mtp_cache


def _always(key, k):
    return jnp.ones((k,), bool)


def _sometimes(key, k):
    return jax.random.bernoulli(jax.random.fold_in(key, 7), 0.15, (k,))


ORACLE = speculative.ORACLE
WRONG = speculative.Drafter("wrong", functools.partial(_corrupted_oracle, wrong=_always), ORACLE.refresh, False)
FLAKY = speculative.Drafter("flaky", functools.partial(_corrupted_oracle, wrong=_sometimes), ORACLE.refresh, False)


def speculative_greedy(spec, ids: list[int], max_new: int):
    """Greedy speculative generation with `spec` (an Engine with speculative_k and a drafter) -> (tokens,
    accepted-length histogram, decode seconds after the first token): a host loop over speculative.step written
    apart from Engine's stream (the prompt pass with the drafter's taps, then one step dispatched ahead of the
    host's read), so tests can hold the two against each other."""
    from mimo_jax import speculative

    cfg, k, drafter, params = spec.cfg, spec.speculative_k, spec.drafter, spec.step_params
    cache = spec.new_cache(spec.capacity(len(ids), max_new), ring_slack=k + 1)
    chunks, feats = list(spec._chunks(ids)), []
    for tokens, positions, _ in chunks:
        f, logits, cache = speculative.target_chunk(spec.params, tokens, positions, cache, cfg, taps=drafter.taps)
        feats.append(f)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = [int(first[0])]
    greedy = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.PRNGKey(0)
    dstate = drafter.init(params, cfg, k, spec.cache_dtype) if drafter.init is not None else {}
    following = np.asarray(ids[1:] + out, np.int32)
    if drafter.init is not None:
        for (tokens, positions, n), f in zip(chunks, feats):
            nxt = np.zeros(tokens.shape, np.int32)
            nxt[0, :n] = following[int(positions[0]):int(positions[0]) + n]
            dstate = speculative.drafter_chunk(params, f, jnp.asarray(nxt), positions, dstate, key, *greedy, cfg=cfg,
                                               drafter=drafter, is_greedy=True)
    state = {"cache": cache, "token": first, "position": jnp.int32(len(ids)), "mtp_cache": dstate,
             "draft": jnp.zeros_like(first), "draft_logits": jnp.zeros((1, cfg.vocab_size), jnp.float32),
             "draft_hidden": jnp.zeros((1, cfg.hidden_size), spec.cache_dtype)}
    one_step = speculative.step_functions(k)[0]  # the compile the Engine runs for this k
    run = functools.partial(one_step, params, key=key, temperature=greedy[0], top_k=greedy[1],
                            top_p=greedy[2], cfg=cfg, k=k, drafter=drafter, is_greedy=True)
    hist, t1 = np.zeros(k + 1, int), time.perf_counter()
    pending = run(state=state)
    while True:
        emitted, n, state = pending
        if max_new - len(out) > 1:
            pending = run(state=state)
        emitted, n = np.asarray(emitted), int(n)
        hist[n] += 1
        out += emitted[0, :n + 1].tolist()
        if len(out) >= max_new:
            return out[:max_new], hist, time.perf_counter() - t1


def tiny_target():
    """The trainers' target: tiny_llama (3 layers) with random weights, f32, as an Engine."""
    from pathlib import Path

    from mimo_jax import model
    from mimo_jax.config import load_config
    from mimo_jax.engine import Engine

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_llama.json")
    params = model.init_params(cfg, jax.random.PRNGKey(3), jnp.float32)
    return Engine(cfg, params, max_seq_len=256, prefill_chunk=32)


def greedy_data(target, n_prompts: int):
    """(n random 12-token prompts, drafter_data.Data of the target's 40-token greedy continuations of them)."""
    from mimo_jax import drafter_data

    prompts = [np.random.default_rng(i).integers(0, target.cfg.vocab_size, 12).tolist() for i in range(n_prompts)]
    return prompts, drafter_data.make_data(target.params, target.cfg, prompts, gen_len=40, batch=8)
