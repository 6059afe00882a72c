"""Our model == transformers' MiMoV2FlashForCausalLM (torch CPU, float32) on random tiny configs."""
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import hf_greedy, hf_logits, random_hf_model, save_transformers_layout
from mimo_jax.engine import Engine

SEEDS = [0, 1, 2]
WINDOW = 6


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=SEEDS)
def pair(request, tmp_path_factory):
    hf = random_hf_model(request.param, num_layers=5, window=WINDOW)
    path = save_transformers_layout(hf, tmp_path_factory.mktemp(f"tf{request.param}"))
    engine = Engine.from_pretrained(path, dtype=jnp.float32, max_seq_len=128, prefill_chunk=32)
    return hf, engine


def test_config_read_from_transformers_dialect(pair):
    hf, engine = pair
    c, h = engine.cfg, hf.config
    assert c.sliding_window == h.sliding_window - 1
    assert c.swa_num_kv_heads == 2 * h.num_key_value_heads and c.num_kv_heads == h.num_key_value_heads
    assert c.layer_types == tuple("full" if t == "full_attention" else "sliding" for t in h.layer_types)


def test_teacher_forced_logits(pair):
    hf, engine = pair
    rng = np.random.default_rng(7)
    ids = rng.integers(0, hf.config.vocab_size, size=4 * WINDOW + 5).tolist()  # > 3x the window
    ours, ref = engine.score(ids), hf_logits(hf, ids)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4


def test_greedy_continuation(pair):
    hf, engine = pair
    rng = np.random.default_rng(11)
    ids = rng.integers(0, hf.config.vocab_size, size=3 * WINDOW + 3).tolist()
    ref = hf_greedy(hf, ids, 30)
    ours = engine.generate(ids, max_new_tokens=30, temperature=0.0).token_ids
    assert ours == ref


@pytest.mark.parametrize("rotary", [(0.5, 1.0), (1.0, 0.5)])
def test_partial_rotary_factor_per_layer_type(tmp_path, rotary):
    """transformers' rope_parameters give the full and the sliding layers their own partial_rotary_factor."""
    hf = random_hf_model(4, num_layers=4, window=WINDOW, rotary=rotary)
    engine = Engine.from_pretrained(save_transformers_layout(hf, tmp_path), dtype=jnp.float32, max_seq_len=128,
                                    prefill_chunk=32)
    hd = hf.config.head_dim
    assert engine.cfg.attention("full").rope_dim == int(hd * rotary[0])
    assert engine.cfg.attention("sliding").rope_dim == int(hd * rotary[1])
    ids = np.random.default_rng(3).integers(0, hf.config.vocab_size, size=3 * WINDOW + 4).tolist()
    assert rel_err(engine.score(ids), hf_logits(hf, ids)) < 1e-4
