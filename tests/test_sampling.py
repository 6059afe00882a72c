"""Sampling filters: top-k / top-p keep exactly the tokens they should; top_p = 1 and top_k = 0 keep all."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import sampling


def kept(logits, temperature=1.0, top_k=0, top_p=1.0):
    out = sampling.filtered_logits(jnp.asarray(logits, jnp.float32), jnp.float32(temperature), jnp.int32(top_k),
                                   jnp.float32(top_p))
    return np.isfinite(np.asarray(out))


def nucleus_reference(logits, top_p):
    """The smallest set of most likely tokens whose mass reaches top_p (float64, ties kept)."""
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    cutoff = x[order][before < top_p].min()
    return x >= cutoff


def test_top_p_one_keeps_every_token():
    """The f32 running sum reaches 1.0 before the tail; top_p = 1 must still keep the tail."""
    assert kept([10, 9, 8, -10, -12], top_p=1.0).all()
    big = np.random.default_rng(0).normal(0, 4, 152_064)  # a MiMo-sized vocabulary with a long thin tail
    big[0] = 60.0
    assert kept(big, top_p=1.0).all()
    assert kept(big, top_k=0, top_p=1.0, temperature=0.3).all()


def test_top_p_one_under_jit_with_traced_settings():
    f = jax.jit(sampling.filtered_logits)
    out = f(jnp.array([10.0, 9, 8, -10, -12]), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    assert np.isfinite(np.asarray(out)).all()


def test_top_p_below_one_filters():
    # p = [0.665, 0.245, 0.090, 1e-9, 2e-10]
    assert list(kept([10, 9, 8, -10, -12], top_p=0.5)) == [True, False, False, False, False]
    assert list(kept([10, 9, 8, -10, -12], top_p=0.7)) == [True, True, False, False, False]
    assert list(kept([10, 9, 8, -10, -12], top_p=0.95)) == [True, True, True, False, False]
    assert list(kept([10, 9, 8, -10, -12], top_p=0.999)) == [True, True, True, False, False]


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95, 0.999])
def test_top_p_matches_a_float64_nucleus(top_p):
    logits = np.random.default_rng(1).normal(0, 2, 512)
    np.testing.assert_array_equal(kept(logits, top_p=top_p), nucleus_reference(logits, top_p))


def test_top_k_and_top_p_together():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert kept(logits, top_k=3).sum() == 3
    assert kept(logits, top_k=3, top_p=1.0).sum() == 3
    # top_p over the top-k renormalised mass: p = softmax([5, 4]) -> [0.73, 0.27]; 0.5 keeps only the first
    assert list(kept(logits, top_k=2, top_p=0.5)) == [True] + [False] * 5
    assert kept(logits, top_k=0, top_p=1.0).all()
