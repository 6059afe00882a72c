"""The model with int4 / MXFP4 experts == the same model with those weights dequantized (XLA path and the
Pallas kernels in interpret mode), and the cost of quantizing a random model's experts, reported."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import model, quant
from mimo_jax.config import load_config
from mimo_jax.plan import Loop
from mimo_jax.quantize_model import dequantize_experts, quantize_experts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(CONFIGS / "tiny_mimo.json")  # hidden 64, expert intermediate 32: groups of 32 fit
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 24)), jnp.int32)
    return cfg, params, ids


def logits(cfg, params, ids):
    pos = jnp.arange(ids.shape[1], dtype=jnp.int32)
    out, _ = model.forward(params, ids, pos, model.init_cache(cfg, 1, 64, jnp.float32), cfg)
    return np.asarray(out[0])


@pytest.mark.parametrize("fmt", ["int4_sym", "int4_asym", "mxfp4"])
def test_quantized_equals_dequantized(setup, fmt):
    cfg, params, ids = setup
    qp = quantize_experts(params, fmt, group_size=32)
    leaves = jax.tree_util.tree_leaves(qp, is_leaf=lambda w: isinstance(w, quant.QuantizedWeight))
    runs = [r for item in model.plan_of(cfg) for r in (item.runs if isinstance(item, Loop) else (item,))]
    moe_stacks = sum(r.kind[1] == "moe" for r in runs)
    assert sum(isinstance(w, quant.QuantizedWeight) for w in leaves) == 3 * moe_stacks  # gate/up/down
    a, b = logits(cfg, qp, ids), logits(cfg, dequantize_experts(qp), ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_pallas_kernels_in_the_model(setup, monkeypatch):
    """Decode (T=1) and a verify-sized chunk (T=9) through the Pallas kernels, interpret mode."""
    cfg, params, ids = setup
    qp = quantize_experts(params, "int4_asym", group_size=32)
    ref = logits(cfg, dequantize_experts(qp), ids[:, :9])
    monkeypatch.setenv("MIMO_QUANT_IMPL", "interpret")
    jax.clear_caches()
    got = logits(cfg, qp, ids[:, :9])
    jax.clear_caches()
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())  # bf16 activations in-kernel


def test_quantization_cost_reported(setup, capsys):
    cfg, params, ids = setup
    ref = logits(cfg, params, ids)
    targets = np.asarray(ids[0, 1:])

    def nll(lg):
        lp = jax.nn.log_softmax(jnp.asarray(lg[:-1]), axis=-1)
        return float(-jnp.mean(jnp.take_along_axis(lp, jnp.asarray(targets)[:, None], axis=-1)))

    for fmt, g in (("int4_sym", 32), ("int4_asym", 32), ("mxfp4", 32)):
        got = logits(cfg, quantize_experts(params, fmt, g), ids)
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        dppl = np.exp(nll(got)) / np.exp(nll(ref)) - 1
        print(f"{fmt} g{g}: max |dlogit| / max |logit| = {rel:.3f}, perplexity change {100 * dppl:+.2f}%")
        assert rel < 0.5 and abs(dppl) < 0.5  # random weights are the hardest case for 4 bits
