"""Tiny MiMo-V2-Flash checkpoints made with transformers (the reference), in both layouts the loader reads.

* `random_hf_model(seed)`: a random tiny config and a `MiMoV2FlashForCausalLM` with EVERY parameter randomised
  (norm weights, sinks, router bias included: zeros and ones hide bugs).
* `save_transformers_layout(model, dir)`: transformers' in-memory names (fused experts, `sinks`), float32.
* `save_hub_layout(model, dir)`: the XiaomiMiMo hub layout: hub config keys, per-expert tensors,
  `attention_sink_bias`, FP8 e4m3 weights with block scales `weight_scale_inv` (block 8x8 here so tiny tensors
  span several blocks, with partial edge blocks). `fp8_round_trip(model)` first rounds the model's weights to
  what FP8 can hold, so both layouts and the reference carry identical numbers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

FP8_BLOCK = 8
FP8_NAMES = re.compile(r".*(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj|eh_proj)\.weight$")


def random_hf_config(seed: int, num_layers: int = 5, window: int = 6, rotary: tuple[float, float] | None = None,
                     **overrides) -> MiMoV2FlashConfig:
    """rotary: (full, sliding) partial_rotary_factor; default one random factor for both."""
    rng = np.random.default_rng(seed)
    kv = int(rng.choice([1, 2]))
    heads = kv * 2 * int(rng.choice([1, 2]))  # SWA layers have 2*kv heads; heads must divide by both
    head_dim = int(rng.choice([8, 12, 16]))
    layer_types = ["full_attention" if (i == 0 or (i + 1) % 3 == 0) else "sliding_attention"
                   for i in range(num_layers)]
    prf = float(rng.choice([0.5, 0.334, 1.0]))
    while int(head_dim * prf) % 2:
        prf = 0.5
    full_prf, swa_prf = rotary or (prf, prf)
    kw = dict(vocab_size=int(rng.integers(60, 120)), hidden_size=int(rng.choice([32, 48])),
              intermediate_size=int(rng.choice([40, 64])), num_hidden_layers=num_layers,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
              v_head_dim=int(rng.choice([8, head_dim])), moe_intermediate_size=int(rng.choice([16, 24])),
              n_routed_experts=int(rng.choice([6, 8])), num_experts_per_tok=int(rng.choice([2, 3])),
              sliding_window=window + 1, layer_types=layer_types,
              routed_scaling_factor=float(rng.choice([1.0, 2.5])),
              attention_value_scale=0.707, rms_norm_eps=1e-5, max_position_embeddings=512,
              rope_parameters={
                  "full_attention": {"rope_type": "default", "rope_theta": float(rng.choice([1e4, 5e6])),
                                     "partial_rotary_factor": full_prf},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": swa_prf}},
              tie_word_embeddings=False)
    kw.update(overrides)
    return MiMoV2FlashConfig(**kw)


@torch.no_grad()
def random_hf_model(seed: int, **config_kw) -> MiMoV2FlashForCausalLM:
    torch.manual_seed(seed)
    model = MiMoV2FlashForCausalLM(random_hf_config(seed, **config_kw)).float().eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif "sinks" in name:
            p.copy_(torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn_like(b))
    return model


def _fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (fp8 values, scale_inv [ceil(out/B), ceil(in/B)]) with w ~= fp8 * scale per block."""
    out, inp = w.shape
    nb_o, nb_i = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(nb_o * FP8_BLOCK, nb_i * FP8_BLOCK)
    padded[:out, :inp] = w
    blocks = padded.reshape(nb_o, FP8_BLOCK, nb_i, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.reshape(padded.shape)[:out, :inp].contiguous(), scale


def _hub_state(model) -> dict[str, torch.Tensor]:
    """transformers' names -> hub names (per-expert tensors, attention_sink_bias)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            i = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = t[e, :i]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = t[e, i:]
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e]
        elif name.endswith("self_attn.sinks"):
            out[name.replace("sinks", "attention_sink_bias")] = t
        else:
            out[name] = t
    return out


@torch.no_grad()
def fp8_round_trip(model) -> None:
    """Replace every weight the hub stores in FP8 by its FP8-block-quantized value, in place."""
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                q, s = _fp8_blocks(t[e])
                t[e].copy_(_dequant(q, s))
        elif FP8_NAMES.match(name):
            q, s = _fp8_blocks(t)
            t.copy_(_dequant(q, s))


def _dequant(q, scale):
    full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * full


def save_transformers_layout(model, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def hub_config(cfg: MiMoV2FlashConfig) -> dict:
    rope = cfg.rope_parameters
    return {
        "model_type": "mimo_v2_flash", "architectures": ["MiMoV2FlashForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "swa_num_attention_heads": cfg.num_attention_heads, "swa_num_key_value_heads": 2 * cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "v_head_dim": cfg.v_head_dim, "swa_head_dim": cfg.head_dim,
        "swa_v_head_dim": cfg.v_head_dim,
        "hybrid_layer_pattern": [int(t == "sliding_attention") for t in cfg.layer_types],
        "moe_layer_freq": [int(t == "sparse") for t in cfg.mlp_layer_types],
        "rope_theta": rope["full_attention"]["rope_theta"], "swa_rope_theta": rope["sliding_attention"]["rope_theta"],
        "partial_rotary_factor": rope["full_attention"]["partial_rotary_factor"],
        "sliding_window_size": cfg.sliding_window - 1, "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False, "layernorm_epsilon": cfg.rms_norm_eps,
        "attention_value_scale": cfg.attention_value_scale, "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor, "n_group": 1, "topk_group": 1,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]},
    }


def save_hub_layout(model, directory: Path, extra: dict[str, torch.Tensor] | None = None, shards: int = 2,
                    index: bool = False) -> Path:
    """Hub layout with FP8 weights, split over `shards` files (index: with the hub's
    model.safetensors.index.json). Call fp8_round_trip(model) first for equality."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hub_config(model.config), indent=1))
    tensors = {}
    for name, t in {**_hub_state(model), **(extra or {})}.items():
        if FP8_NAMES.match(name):
            q, s = _fp8_blocks(t.float())
            tensors[name], tensors[name + "_scale_inv"] = q, s
        else:
            tensors[name] = t.contiguous().clone()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = {k: tensors[k] for k in names[i::shards]}  # a weight and its scale may sit in different files
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
    if index:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@torch.no_grad()
def hf_logits(model, ids) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model, ids, n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()
