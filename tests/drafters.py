"""Test-only drafters (STYLE 11): the target's own greedy continuation (speculative.ORACLE), made wrong where
a test wants it, so a test chooses how many drafts a step accepts.

  WRONG  every draft is wrong: each step accepts 0
  FLAKY  each draft is wrong with probability 0.15 (keyed by the step): steps accept 0 < n < k as well
"""
import functools

import jax
import jax.numpy as jnp

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
