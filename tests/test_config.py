"""Config readers: what transformers' config fields mean here, and fields we cannot honour refused by name."""
from pathlib import Path

import pytest

from mimo_jax.config import config_from_hf, load_config
from mimo_jax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MIMO = {  # transformers' MiMoV2FlashConfig dialect, tiny
    "model_type": "mimo_v2_flash", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "v_head_dim": 8,
    "intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "layer_types": ["full_attention", "sliding_attention", "full_attention"], "sliding_window": 5,
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4,
                                              "partial_rotary_factor": 0.5}},
    "attention_bias": False, "hidden_act": "silu", "n_group": 1, "topk_group": 1, "rope_scaling": None,
}
LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 48, "attention_bias": False, "mlp_bias": False,
    "hidden_act": "silu", "rope_scaling": None, "rope_theta": 1e4,
}


def test_defaults_and_no_op_values_load():
    cfg = config_from_hf(MIMO)
    assert cfg.attention("full").rope_dim == 8 and cfg.attention("sliding").rope_dim == 8
    assert cfg.swa_partial_rotary_factor is None
    assert config_from_hf(LLAMA).attention("full").rope_dim == 8
    assert config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}).rope_theta == 1e4
    for preset in CONFIGS.glob("*.json"):
        load_config(preset)


def test_partial_rotary_factor_per_layer_type():
    rope = {"full_attention": {**MIMO["rope_parameters"]["full_attention"], "partial_rotary_factor": 1.0},
            "sliding_attention": {**MIMO["rope_parameters"]["sliding_attention"], "partial_rotary_factor": 0.25}}
    cfg = config_from_hf({**MIMO, "rope_parameters": rope})
    assert (cfg.attention("full").rope_dim, cfg.attention("sliding").rope_dim) == (16, 4)
    assert (cfg.attention("full").rope_theta, cfg.attention("sliding").rope_theta) == (5e6, 1e4)
    with pytest.raises(ConfigError, match="sliding layers .* must be even"):
        config_from_hf({**MIMO, "rope_parameters": {**rope, "sliding_attention": {
            **rope["sliding_attention"], "partial_rotary_factor": 0.0625}}})  # 1 dim
    with pytest.raises(ConfigError, match="swa_partial_rotary_factor"):
        config_from_hf(MIMO).replace(swa_partial_rotary_factor=1.5)


REFUSED = [
    (MIMO, {"attention_bias": True}, "attention_bias"),
    (LLAMA, {"attention_bias": True}, "attention_bias"),
    (LLAMA, {"mlp_bias": True}, "mlp_bias"),
    (LLAMA, {"hidden_act": "gelu"}, "hidden_act"),
    (MIMO, {"hidden_act": "relu"}, "hidden_act"),
    (LLAMA, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    (LLAMA, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    (LLAMA, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
    (MIMO, {"rope_parameters": {**MIMO["rope_parameters"], "sliding_attention": {
        "rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}}, "rope_parameters.sliding_attention"),
    (MIMO, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    (LLAMA, {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    (MIMO, {"n_group": 8, "topk_group": 4}, "topk_group"),
    (MIMO, {"scoring_func": "softmax"}, "scoring_func"),
    (MIMO, {"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config.quant_method"),
]


@pytest.mark.parametrize("base,change,field", REFUSED,
                         ids=[f"{'mimo' if b is MIMO else 'llama'}-{'-'.join(c)}" for b, c, _ in REFUSED])
def test_fields_we_cannot_honour_are_refused_by_name(base, change, field):
    with pytest.raises(ConfigError, match=f"config field {field.replace('.', '[.]')}"):
        config_from_hf({**base, **change})
