"""The fused Pallas decode path (interpret mode) == the XLA path, step by step, on MiMo-shaped (full + sliding
rings with sinks, partial RoPE, q/k dim != v dim, dense + MoE layers, a Loop in the plan) and Llama-shaped
configs; the cache it leaves behind is the one the XLA path would write."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import fused_decode, model
from mimo_jax.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(name):
    cfg = load_config(CONFIGS / f"{name}.json").replace(num_mtp_layers=0)
    if name == "tiny_mimo":  # kernel-friendly dims: rope_dim 32 of head_dim 48
        # every expert routed: no discrete top-k flip turns a bf16 rounding into a different expert
        return cfg.replace(head_dim=48, swa_head_dim=48, partial_rotary_factor=2 / 3, num_experts_per_tok=16)
    return cfg.replace(hidden_size=64, head_dim=32, v_head_dim=32, swa_head_dim=32, swa_v_head_dim=32)


@pytest.mark.slow
@pytest.mark.parametrize("name,dots", [("tiny_mimo", False), ("tiny_llama", False), ("tiny_llama", True)])
def test_fused_decode_matches_xla(monkeypatch, request, name, dots):
    """Both bf16 paths against the f32 XLA path on the same weights: the fused one (f32 residual stream) must be
    as close to it as the bf16 XLA path is (random tiny models amplify bf16 rounding to ~10% by layer 8); dots:
    the kernels' products as pipelined 16-row dots (decode_layer.DOTS)."""
    from pallas_kernels import decode_layer

    monkeypatch.setattr(decode_layer, "DOTS", dots)
    jax.clear_caches()  # the kernels' jits read the knob when they trace (and again at the end: no trace leaks)
    request.addfinalizer(jax.clear_caches)
    cfg = _cfg(name)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    capacity, prompt, steps = 64, 5, 14  # past two sliding windows: the rings wrap
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt + steps)
    caches = {}
    for path, p, dtype in (("f32", p32, jnp.float32), ("xla", params, jnp.bfloat16),
                           ("interpret", params, jnp.bfloat16)):
        cache = model.init_cache(cfg, 1, capacity, dtype)
        _, caches[path] = model.forward(p, jnp.asarray(ids[None, :prompt]), jnp.arange(prompt, dtype=jnp.int32),
                                        cache, cfg)
    assert fused_decode.unsupported(cfg, params, caches["interpret"]) is None
    step = jax.jit(lambda p, t, pos, c, kernels: model.forward_hidden(p, t, pos, c, cfg, kernels), static_argnums=4)
    rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()
    for i in range(steps):
        tok, pos = jnp.asarray(ids[None, prompt + i:prompt + i + 1]), jnp.array([prompt + i], jnp.int32)
        logits = {}
        for path, p in (("f32", p32), ("xla", params), ("interpret", params)):
            h, caches[path] = step(p, tok, pos, caches[path], "xla" if path == "f32" else path)
            logits[path] = np.asarray(model.lm_logits(p, h, cfg), np.float32)
        err_fused, err_xla = rel(logits["interpret"], logits["f32"]), rel(logits["xla"], logits["f32"])
        assert err_fused <= max(2 * err_xla, 1e-2), (i, err_fused, err_xla)
    for a, b in zip(jax.tree_util.tree_leaves(caches["interpret"]), jax.tree_util.tree_leaves(caches["f32"])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 0.15 * np.abs(b).max()


def test_unsupported_says_why():
    cfg = load_config(CONFIGS / "tiny_llama.json")  # head_dim 8: rope_dim/2 = 4 is below the dot minimum
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    why = fused_decode.unsupported(cfg, params, model.init_cache(cfg, 1, 64, jnp.bfloat16))
    assert why and "rope_dim" in why
    f32 = model.init_params(_cfg("tiny_llama"), jax.random.PRNGKey(0), jnp.float32)
    why = fused_decode.unsupported(_cfg("tiny_llama"), f32, model.init_cache(_cfg("tiny_llama"), 1, 64, jnp.float32))
    assert why and "bfloat16" in why
    from mimo_jax.quantize_model import quantize_dense

    bf16 = model.init_params(_cfg("tiny_llama"), jax.random.PRNGKey(0), jnp.bfloat16)
    why = fused_decode.unsupported(_cfg("tiny_llama"), quantize_dense(bf16, "fp8"),
                                   model.init_cache(_cfg("tiny_llama"), 1, 64, jnp.bfloat16))
    assert why and "unquantized" in why  # FP8 dense weights (fp8.Fp8Weight) stay on the XLA / GEMV path
