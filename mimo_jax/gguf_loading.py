"""GGUF (Llama) tensors -> the parameter pytree, keeping 4-bit linear weights in the bytes they are stored in.

    cfg, params = load_gguf(read_gguf(path), jnp.bfloat16)      # what Engine.from_gguf(path, keep_int4=True) runs

A mapping table (transformers name -> pytree leaf) like loader.py's, for the dozen names a Llama GGUF holds.
A linear weight (q/k/v/o, gate/up/down) whose every layer is stored as Q4_0 or Q4_1 becomes a
quant.QuantizedWeight (int4_sym / int4_asym, group 32, logical [in, out]): its blocks are re-laid out, never
requantized, so dequantize(w) equals gguf's dequantization transposed, bit for bit (quant.from_gguf_q4_*).
Per-layer weights are stacked over the layers as the plan stacks every leaf (the Llama plan is one Run: a
leading [num_layers] axis), so the model's scan slices a QuantizedWeight like an array (it is a pytree).
Everything else (the Q8_0 embedding, F32 norms, a linear weight of another type in any layer) is dequantized
to the model dtype. q_proj / k_proj blocks come un-permuted from gguf_reader (exact on whole rows).
"""
from __future__ import annotations

import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import quant
from mimo_jax.config import ModelConfig, config_from_hf
from mimo_jax.errors import CheckpointError
from mimo_jax.gguf_reader import GGUFModel, loading_progress
from mimo_jax.model import param_shapes, plan_of
from mimo_jax.plan import layer_slots, path_keys, stack_axes

# transformers name -> (pytree sub-path, linear: stored [out, in] and held [in, out])
GLOBAL_TABLE = {
    "model.embed_tokens.weight": (("embed",), False),
    "model.norm.weight": (("final_norm",), False),
    "lm_head.weight": (("lm_head",), True),
}
LAYER_TABLE = {  # the part after "model.layers.{i}."
    "input_layernorm.weight": (("attn_norm",), False),
    "post_attention_layernorm.weight": (("mlp_norm",), False),
    "self_attn.q_proj.weight": (("attn", "wq"), True),
    "self_attn.k_proj.weight": (("attn", "wk"), True),
    "self_attn.v_proj.weight": (("attn", "wv"), True),
    "self_attn.o_proj.weight": (("attn", "wo"), True),
    "mlp.gate_proj.weight": (("mlp", "w_gate"), True),
    "mlp.up_proj.weight": (("mlp", "w_up"), True),
    "mlp.down_proj.weight": (("mlp", "w_down"), True),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")

# GGUF block types kept as int4: raw blocks + logical [out, in] shape -> QuantizedWeight [in, out]
INT4_IMPORTERS = {
    gguf.GGMLQuantizationType.Q4_0: quant.from_gguf_q4_0,
    gguf.GGMLQuantizationType.Q4_1: quant.from_gguf_q4_1,
}


def load_gguf(gg: GGUFModel, dtype=jnp.bfloat16, keep_int4: bool = True) -> tuple[ModelConfig, dict]:
    """(config, params on the default device). keep_int4=False dequantizes every tensor to `dtype`."""
    cfg = config_from_hf(gg.hf_config)
    slots = layer_slots(plan_of(cfg))
    structs = param_shapes(cfg, dtype)
    kept = _int4_leaves(gg) if keep_int4 else set()
    values: dict[tuple, dict[tuple, object]] = {}  # leaf path -> {stack index: value}
    for name in loading_progress(gg.tensor_names(), gg.path):
        leaf, index, linear, sub = _place(name, cfg, slots)
        if leaf[0] == "lm_head" and cfg.tie_word_embeddings:
            continue
        if sub in kept:
            raw = gg.raw_tensor(name)
            value = INT4_IMPORTERS[raw.ggml_type](raw.blocks, raw.shape, jnp.dtype(dtype).name)
        else:
            array = gg.tensor(name)
            value = jnp.asarray(array.T if linear else array, dtype)
        if index in values.setdefault(leaf, {}):
            raise CheckpointError(f"{gg.path.name}: tensor {name} is given twice")
        values[leaf][index] = value

    def build(path, struct):
        leaf = path_keys(path)
        lead = struct.shape[: stack_axes(leaf)]
        found = values.get(leaf, {})
        missing = [i for i in np.ndindex(lead) if i not in found]
        if missing:
            raise CheckpointError(f"{gg.path.name} lacks the tensor for parameter {'/'.join(map(str, leaf))}"
                                  + (f" at stack index {missing[0]}" if lead else ""))
        parts = [found[i] for i in np.ndindex(lead)]
        for name_idx, part in zip(np.ndindex(lead), parts):
            if tuple(part.shape) != tuple(struct.shape[len(lead):]):
                raise CheckpointError(f"{gg.path.name}: parameter {'/'.join(map(str, leaf))}{list(name_idx)} has "
                                      f"shape {tuple(part.shape)}, the config expects {struct.shape[len(lead):]}")
        if not lead:
            return parts[0]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *parts)

    return cfg, jax.tree_util.tree_map_with_path(build, structs)


def _place(name: str, cfg: ModelConfig, slots) -> tuple[tuple, tuple, bool, tuple]:
    """transformers name -> (leaf path in the params pytree, index in its stack, linear?, sub-path)."""
    if name in GLOBAL_TABLE:
        sub, linear = GLOBAL_TABLE[name]
        return sub, (), linear, sub
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m.group(2) not in LAYER_TABLE:
        raise CheckpointError(f"GGUF tensor {name} has no parameter in this model (biases are not supported)")
    layer = int(m.group(1))
    if layer >= len(slots):
        raise CheckpointError(f"GGUF tensor {name}: layer {layer} is past block_count={len(slots)}")
    sub, linear = LAYER_TABLE[m.group(2)]
    slot = slots[layer]
    prefix = ("layers", slot.item) + ((slot.run,) if slot.run is not None else ())
    return prefix + sub, slot.index, linear, sub


def _int4_leaves(gg: GGUFModel) -> set[tuple]:
    """Layer sub-paths (("attn", "wq"), ...) whose tensor is of one int4 block type in every layer."""
    types: dict[tuple, set] = {}
    for name, t in gg.gguf_tensors.items():
        m = _LAYER_NAME.fullmatch(name)
        if m and m.group(2) in LAYER_TABLE and LAYER_TABLE[m.group(2)][1]:
            types.setdefault(LAYER_TABLE[m.group(2)][0], set()).add(gguf.GGMLQuantizationType(t.tensor_type))
    return {sub for sub, ts in types.items() if len(ts) == 1 and next(iter(ts)) in INT4_IMPORTERS}
