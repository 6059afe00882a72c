"""Checkpoint loading: the hub layout (FP8 blocks, per-expert tensors, shards, MTP) and bad checkpoints."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import (fp8_round_trip, hf_logits, random_hf_model, save_hub_layout,
                         save_transformers_layout)
from mimo_jax.engine import Engine
from mimo_jax.errors import CheckpointError, ConfigError
from mimo_jax.loader import load_checkpoint
from mimo_jax.model import plan_of
from mimo_jax.plan import layer_slots


def mtp_tensors(cfg, n=2, seed=5):
    """Random model.mtp.layers.{j}.* tensors in hub names (SWA block + dense MLP)."""
    g = torch.Generator().manual_seed(seed)
    h, hd, vd = cfg.hidden_size, cfg.head_dim, cfg.v_head_dim
    q, kv, i = cfg.num_attention_heads, 2 * cfg.num_key_value_heads, cfg.intermediate_size
    shapes = {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
              "input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,), "final_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
              "self_attn.v_proj.weight": (kv * vd, h), "self_attn.o_proj.weight": (h, q * vd),
              "self_attn.attention_sink_bias": (q,), "mlp.gate_proj.weight": (i, h),
              "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
    return {f"model.mtp.layers.{j}.{k}": torch.randn(s, generator=g) for j in range(n) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    hf = random_hf_model(3, num_layers=4, window=5)
    fp8_round_trip(hf)  # both layouts and the reference now hold the same FP8-representable numbers
    root = tmp_path_factory.mktemp("layouts")
    tf_dir = save_transformers_layout(hf, root / "transformers")
    hub_dir = save_hub_layout(hf, root / "hub", extra=mtp_tensors(hf.config), shards=3)
    return hf, tf_dir, hub_dir


def test_hub_layout_loads_to_same_params_and_logits(both_layouts):
    hf, tf_dir, hub_dir = both_layouts
    cfg_tf, p_tf = load_checkpoint(tf_dir, jnp.float32)
    cfg_hub, p_hub = load_checkpoint(hub_dir, jnp.float32)
    assert cfg_hub.replace(num_mtp_layers=0, model_type="x") == cfg_tf.replace(model_type="x")
    assert cfg_hub.num_mtp_layers == 2 and "mtp" in p_hub and "mtp" not in p_tf
    main = {k: v for k, v in p_hub.items() if k != "mtp"}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), main, p_tf)
    ids = list(range(1, 30))
    e_tf = Engine.from_pretrained(tf_dir, dtype=jnp.float32, max_seq_len=64)
    e_hub = Engine.from_pretrained(hub_dir, dtype=jnp.float32, max_seq_len=64)
    ref = hf_logits(hf, ids)
    a, b = e_tf.score(ids), e_hub.score(ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(b - ref)) / np.max(np.abs(ref)) < 1e-4


def test_mtp_tensors_land_in_pytree(both_layouts):
    hf, _, hub_dir = both_layouts
    _, params = load_checkpoint(hub_dir, jnp.float32)
    src = mtp_tensors(hf.config)
    np.testing.assert_allclose(params["mtp"]["eh_proj"][1], src["model.mtp.layers.1.eh_proj.weight"].numpy().T,
                               rtol=0.07, atol=1e-3)  # FP8-rounded on save
    np.testing.assert_array_equal(params["mtp"]["attn"]["sink"][0],
                                  src["model.mtp.layers.0.self_attn.attention_sink_bias"].numpy())
    np.testing.assert_array_equal(params["mtp"]["mlp_norm"][0], src["model.mtp.layers.0.pre_mlp_layernorm.weight"])


def test_fp8_dequant_matches_blocks(both_layouts):
    hf, _, hub_dir = both_layouts
    cfg, params = load_checkpoint(hub_dir, jnp.float32)
    for layer in (1, 3):
        slot = layer_slots(plan_of(cfg))[layer]
        stack = params["layers"][slot.item] if slot.run is None else params["layers"][slot.item][slot.run]
        w = hf.model.layers[layer].mlp.experts.gate_up_proj.detach()[2]  # expert 2: gate rows, then up rows
        i = w.shape[0] // 2
        np.testing.assert_allclose(stack["mlp"]["w_gate"][slot.index][2], w[:i].numpy().T, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stack["mlp"]["w_up"][slot.index][2], w[i:].numpy().T, rtol=1e-6, atol=1e-7)


# ---- bad checkpoints: each is a typed error with the culprit named ----

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)


def test_unknown_model_type(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neo"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model type 'gpt_neo'"):
        load_checkpoint(d)


def test_missing_tensor(both_layouts, tmp_path):
    d = _copy(both_layouts[2], tmp_path / "c")
    f = sorted(d.glob("*.safetensors"))[0]
    tensors = load_file(str(f))
    victim = sorted(k for k in tensors if "experts.3.up_proj.weight" in k and "scale" not in k)[0]
    del tensors[victim]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=f"missing tensor {victim.replace('.', '[.]')}"):
        load_checkpoint(d)


def test_wrong_shape_named(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.2.self_attn.q_proj.weight"] = tensors["model.layers.2.self_attn.q_proj.weight"][:-1]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.q_proj.weight has shape"):
        load_checkpoint(d)


def test_no_safetensors(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(d)


def test_unknown_tensor_refused_by_name(both_layouts, tmp_path):
    """A tensor no parameter takes (here a q_proj bias) would be dropped and another model run: refused."""
    d = _copy(both_layouts[1], tmp_path / "c")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(tensors["model.layers.1.self_attn.q_proj.weight"]
                                                                  .shape[0])
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias is not supported"):
        load_checkpoint(d)


def test_config_field_we_cannot_honour_refused(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_bias"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="attention_bias"):
        load_checkpoint(d)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])  # cut in the tensor bytes, near the end, in the header
def test_truncated_safetensors_says_truncated(both_layouts, tmp_path, keep):
    d = _copy(both_layouts[1], tmp_path / "c")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: keep if keep > 1 else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(d)


def test_not_a_safetensors_file(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        load_checkpoint(d)
