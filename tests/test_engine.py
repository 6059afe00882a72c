"""Engine: plain sampling draws each token with its own key (the joint of tokens 1 and 2 is the model's)."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import model
from mimo_jax.config import load_config
from mimo_jax.engine import Engine
from sampling_stats import chi2_check, exact_dists

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]


@pytest.fixture(scope="module")
def small_vocab():
    """tiny_mimo with 8 tokens and a flattened embedding: every token pair has visible probability."""
    cfg = load_config(CONFIGS / "tiny_mimo.json").replace(vocab_size=8, num_mtp_layers=0)
    params = model.init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    return cfg, {**params, "embed": params["embed"] * 0.5}


@pytest.mark.parametrize("settings", [(1.0, 0, 1.0), (0.8, 5, 0.9)])
def test_plain_sampling_joint_of_first_two_tokens(small_vocab, settings):
    """Chi-square of (t1, t2) over N = 1500 fixed seeds against p(t1) p(t2 | t1), reject at p < 1e-3.
    Tokens 1 and 2 drawn with one key share their Gumbel noise (t2 copies t1 far too often) and fail this."""
    cfg, params = small_vocab
    temperature, top_k, top_p = settings
    p1, p2 = exact_dists(cfg, params, PROMPT, (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)), 2)
    e = Engine(cfg, params, max_seq_len=64, prefill_chunk=16)
    n, counts = 1500, np.zeros((cfg.vocab_size, cfg.vocab_size))
    for seed in range(n):
        t1, t2 = e.generate(PROMPT, max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_at_eos=False).token_ids
        counts[t1, t2] += 1
    chi2_check(counts, p1[:, None] * p2, n)
