"""MTP drafter files: MiMo-layout MTP layers (mtp.py) trained for a target by train_mtp.py, attached to any model.

A model with MTP layers (MiMo) drafts with its own; a file replaces them (the same count). A model without them
(the bundled SmolLM2, any Llama) gets them from the file: its config gains num_mtp_layers and the sliding-window
attention shape the MTP block uses (`config_for`: the model's own heads, a window of the file's), and params["mtp"]
the file's weights; after that the Engine's MTP paths (speculative.MTP, the batched step) run unchanged.

File: safetensors, "mtp.<leaf path>" tensors stacked [n_layers, ...] as params["mtp"], optionally "vocab" (the
draft vocabulary: token ids the drafter proposes, so each draft position reads only those lm_head rows), metadata
kind "mtp", n_layers, window, and the target's shape (hidden size, vocab, layers), checked on load.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import drafter_files, model, ops
from mimo_jax.config import FULL, ModelConfig
from mimo_jax.errors import InputError

# MTP layers trained for the bundled SmolLM2 (train_mtp.py; BENCHMARKS.md): what drafter="mtp" drafts with on a
# model that has no MTP layers of its own, when the file was trained for a model of its shape
SHIPPED = Path(__file__).resolve().parent / "drafters" / "smollm2_135m_mtp.safetensors"


def config_for(cfg: ModelConfig, n_layers: int, window: int) -> ModelConfig:
    """The target's config with n_layers MTP layers: unchanged if it has that many; a model without MTP layers
    gets them with its full-attention head shape as the MTP block's sliding-window attention (no sink)."""
    if cfg.num_mtp_layers:
        if cfg.num_mtp_layers != n_layers:
            raise InputError(f"the MTP drafter has {n_layers} layers; this model has {cfg.num_mtp_layers} MTP layers")
        return cfg
    f = cfg.attention(FULL)
    return cfg.replace(num_mtp_layers=n_layers, swa_num_heads=f.num_heads, swa_num_kv_heads=f.num_kv_heads,
                       swa_head_dim=f.head_dim, swa_v_head_dim=f.v_head_dim, swa_rope_theta=f.rope_theta,
                       sliding_window=window, sink_swa=False,
                       swa_partial_rotary_factor=f.rope_dim / f.head_dim)


def _last_layer(tparams):
    """The target's last layer (a dict of arrays) in the stacked layout (model.stacked: a run [L, ...] or a
    repeated group of runs [R, L, ...]); None in another layout."""
    layers = tparams.get("layers")
    if not isinstance(layers, list) or not layers:
        return None
    item = layers[-1]
    if isinstance(item, list):
        return jax.tree_util.tree_map(lambda a: a[-1, -1], item[-1])
    return jax.tree_util.tree_map(lambda a: a[-1], item) if isinstance(item, dict) else None


def _plain(layer, shapes):
    """A target layer as model.forward's plain layout stores it: a GPU Engine's "out, in" weights
    (ops.OutInWeight) turned back, fused q/k/v and gate/up (ops.FUSE_GROUPS) split by the MTP layer's shapes."""
    if not isinstance(layer, dict):
        return layer
    out = {}
    for k, v in layer.items():
        if isinstance(v, ops.OutInWeight):
            v = jnp.swapaxes(v.t, -1, -2)
        out[k] = _plain(v, shapes.get(k, {}) if isinstance(shapes, dict) else {})
    for name, parts in ops.FUSE_GROUPS:
        if name in out and all(p in shapes for p in parts):
            widths = [shapes[p].shape[-1] for p in parts]
            if sum(widths) == out[name].shape[-1]:
                cuts = np.cumsum(widths)[:-1].tolist()
                out.update(zip(parts, jnp.split(out.pop(name), cuts, axis=-1)))
    return out


def init_weights(tparams, mcfg: ModelConfig, key) -> dict:
    """Starting MTP weights (float32): the model's own MTP layers if it has them; else random (model.init_params'
    recipe) with the block and final norm copied from the target's last layer where the shapes match (a dense
    last layer: any Llama), so the chain starts from a layer that already reads the target's hidden states."""
    if "mtp" in tparams:
        return jax.tree_util.tree_map(lambda a: jnp.array(a, jnp.float32), tparams["mtp"])
    shapes = model.param_shapes(mcfg, jnp.float32)["mtp"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    last = _plain(_last_layer(tparams), shapes)

    def make(path, s, k):
        names = tuple(p.key for p in path)
        if last is not None:
            src = last
            for n in names:
                src = src.get(n) if isinstance(src, dict) else None
            if src is not None and tuple(src.shape) == tuple(s.shape[1:]):
                return jnp.broadcast_to(jnp.asarray(src, jnp.float32), s.shape)
        if names[-1] == "final_norm":
            return jnp.broadcast_to(jnp.asarray(tparams["final_norm"], jnp.float32), s.shape)
        if names[-1].endswith("norm"):
            return jnp.ones(s.shape, jnp.float32)
        if names[-1] == "sink":
            return jnp.zeros(s.shape, jnp.float32)
        return s.shape[-2] ** -0.5 * jax.random.normal(k, s.shape, jnp.float32)

    return jax.tree_util.tree_unflatten(treedef, [make(p, s, k) for (p, s), k in zip(leaves, keys)])


def save(path, weights: dict, mcfg: ModelConfig, target: ModelConfig, extra: dict | None = None, dtype=np.float16,
         arrays: dict | None = None, vocab=None):
    """Write the MTP layers (params["mtp"]'s tree) atomically, as `dtype` (float16: the shipped size); arrays:
    more tensors for the same file (a trainer's optimizer state); vocab: token ids the drafter may propose (its
    logits then cost only those lm_head rows: `draft_vocab`), None = every token."""
    arrays = {**{k: v.astype(dtype) for k, v in drafter_files.flatten("mtp.", weights).items()}, **(arrays or {})}
    if vocab is not None:
        arrays["vocab"] = np.asarray(vocab, np.int32)
    meta = {"n_layers": mcfg.num_mtp_layers, "window": mcfg.attention("sliding").window,
            "target": drafter_files.target_meta(target), **(extra or {})}
    drafter_files.save(path, arrays, "mtp", meta)


def is_mtp_file(path) -> bool:
    """Whether `path` is an MTP drafter file (reads only the safetensors header)."""
    return drafter_files.kind(path) == "mtp"


def shipped_for(cfg: ModelConfig) -> Path | None:
    """The shipped MTP drafter file if it was trained for a model of cfg's shape, else None."""
    if not is_mtp_file(SHIPPED):
        return None
    return None if drafter_files.target_mismatch(drafter_files.header(SHIPPED), cfg) else SHIPPED


def check_target(path, cfg: ModelConfig, meta: dict | None = None) -> None:
    bad = drafter_files.target_mismatch(drafter_files.header(path) if meta is None else meta, cfg)
    if bad:
        raise InputError(f"MTP drafter {str(path)!r} was trained for another model: " + ", ".join(bad))


def load(path, target: ModelConfig, dtype=jnp.float32):
    """-> (the target's config with the file's MTP layers, the MTP weights as params["mtp"]). InputError for a
    file that is not an MTP drafter or was trained for a model of another shape."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no MTP drafter file {str(path)!r}")
    if not is_mtp_file(path):
        raise InputError(f"{str(path)!r} is not an MTP drafter (python -m mimo_jax.train_mtp writes them)")
    meta = drafter_files.header(path)
    check_target(path, target, meta)
    mcfg = config_for(target, json.loads(meta["n_layers"]), json.loads(meta["window"]))
    shapes = model.param_shapes(mcfg, dtype)["mtp"]
    with safe_open(str(path), "numpy") as f:
        def leaf(path_, s):
            name = "mtp." + ".".join(str(p.key) for p in path_)
            a = f.get_tensor(name)
            if a.shape != s.shape:
                raise InputError(f"MTP drafter {str(path)!r}: {name} has shape {a.shape}, this model wants {s.shape}")
            return jnp.asarray(a, s.dtype)
        weights = jax.tree_util.tree_map_with_path(leaf, shapes)
    return mcfg, weights


def draft_vocab(path, cfg: ModelConfig):
    """The file's draft vocabulary (sorted token ids, int32) or None (the file proposes from every token).
    InputError for ids outside cfg's vocabulary."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        if "vocab" not in f.keys():
            return None
        vocab = f.get_tensor("vocab")
    if vocab.ndim != 1 or not len(vocab) or vocab.min() < 0 or vocab.max() >= cfg.vocab_size:
        raise InputError(f"MTP drafter {str(path)!r}: its draft vocabulary is not a list of token ids below "
                         f"{cfg.vocab_size}")
    return jnp.asarray(np.sort(vocab), jnp.int32)


def drafter_weights(path, cfg: ModelConfig, params: dict):
    """What the speculative step takes as params["drafter"] for the file's MTP layers: {"vocab", "head": the
    target lm_head's rows for it} when the file has a draft vocabulary (mtp.draft_logits), else None."""
    from mimo_jax.block_drafter import head_rows

    vocab = draft_vocab(path, cfg)
    return None if vocab is None else {"vocab": vocab, "head": head_rows(params, cfg, vocab)}


def attach(path, cfg: ModelConfig, params: dict, dtype) -> tuple[ModelConfig, dict]:
    """The model with the file's MTP layers: (config, params with params["mtp"] replaced or added)."""
    mcfg, weights = load(path, cfg, dtype)
    return mcfg, {**params, "mtp": weights}
