"""layers.attend's two forms of its products (dots; multiplies + reductions, the GPU's form for decode) agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import layers, model
from mimo_jax.config import load_config
from test_model import CONFIGS, full_forward


def _inputs(seed, b, t, s, hkv, g, d, dv, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, hkv, g, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, dv), jnp.float32).astype(dtype)
    qpos = jnp.arange(s - t, s)[None, :].repeat(b, 0)
    qpos = qpos.at[-1, -1].set(-1)  # a padding row: nothing visible
    mask = jnp.arange(s)[None, None, :] <= qpos[:, :, None]
    sink = jax.random.normal(ks[3], (hkv, g), jnp.float32)
    return q, k, v, mask, sink


@pytest.mark.parametrize("t", [1, 9])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_sink", [False, True])
def test_attend_reduce_form_equals_dot_form(t, dtype, tol, with_sink):
    q, k, v, mask, sink = _inputs(t, 2, t, 40, 2, 3, 24, 16, dtype)
    sink = sink if with_sink else None
    a = layers.attend(q, k, v, mask, sink, 0.2, reduce=False)
    r = layers.attend(q, k, v, mask, sink, 0.2, reduce=True)
    assert r.shape == a.shape == (2, t, 2, 3, 16) and r.dtype == a.dtype
    np.testing.assert_allclose(np.asarray(r, np.float32), np.asarray(a, np.float32), atol=tol, rtol=tol)
    assert not np.asarray(r[-1, -1], np.float32).any()  # the padding row is zero
    assert np.abs(np.asarray(a, np.float32)).max() > 0.1


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_mimo"])
def test_model_decode_with_reduce_attention(monkeypatch, name):
    """The model's cached decode (one token per call, scanned layers: the cache read through a dynamic slice) with
    attention in the reduction form (what a GPU runs) gives the logits of a full forward; full and sliding layers."""
    monkeypatch.setattr(layers, "_on_gpu", lambda reduce_form, dot_form, *args: reduce_form(*args))
    cfg = load_config(CONFIGS / f"{name}.json")
    params = model.init_params(cfg, jax.random.PRNGKey(5), jnp.float32)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, size=40).tolist()
    ref = full_forward(cfg, params, ids, 96)
    cache = model.init_cache(cfg, 1, 96, jnp.float32)
    _, cache = model.forward(params, jnp.asarray([ids[:20]]), jnp.arange(20, dtype=jnp.int32), cache, cfg)
    step = jax.jit(model.forward, static_argnums=(4,))
    rows = []
    for i in range(20, 40):
        logits, cache = step(params, jnp.asarray([[ids[i]]]), jnp.asarray([i], jnp.int32), cache, cfg)
        rows.append(np.asarray(logits[0, 0]))
    np.testing.assert_allclose(np.stack(rows), ref[20:], atol=2e-4, rtol=2e-4)
