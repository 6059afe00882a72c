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


@pytest.mark.parametrize("tokens", [1, 9])
def test_pallas_kernels_on_the_models_experts(setup, tokens):
    """The model's own quantized expert stacks (indexed per layer, as the scan does) through the Pallas kernels
    in interpret mode == the XLA path, with the routing of decode (T=1) and of a verify chunk (T=9). The model
    itself takes impl "auto" (kernels on GPU, XLA on CPU); tests choose the path by calling quant directly."""
    cfg, params, _ = setup
    qp = quantize_experts(params, "int4_asym", group_size=32)
    w = _expert_stacks(qp)[-1]
    layer = (0,) * (w["w_gate"].ndim - 3)  # the leading (stacked layer) dims
    w_gate, w_up, w_down = (w[k][layer] for k in ("w_gate", "w_up", "w_down"))
    rng = np.random.default_rng(tokens)
    expert = np.sort(np.concatenate([rng.choice(cfg.num_experts, cfg.num_experts_per_tok, replace=False)
                                     for _ in range(tokens)]))
    group_sizes = jnp.asarray(np.bincount(expert, minlength=cfg.num_experts), jnp.int32)
    x = jnp.asarray(rng.normal(size=(len(expert), cfg.hidden_size)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(size=len(expert)), jnp.float32)

    def experts(impl):
        h = quant.ragged_qmatmul_gate_up(x, w_gate, w_up, group_sizes, scale, impl=impl)
        return np.asarray(quant.ragged_qmatmul(h, w_down, group_sizes, impl=impl), np.float32)

    got, ref = experts("interpret"), experts("xla")
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())  # bf16 activations in-kernel


def _expert_stacks(params):
    """Every MoE `mlp` dict whose experts are quantized."""
    found = []

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get("w_gate"), quant.QuantizedWeight):
                found.append(node)
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(params)
    return found


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
