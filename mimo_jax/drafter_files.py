"""What the two drafter file kinds (block_drafter, mtp_drafter) share: a safetensors file of one weight tree
under a name prefix, JSON-valued metadata with the file's "kind", and the shape of the target it was trained for
(checked on load, so a drafter for another model is one clear error, not a shape failure inside a jit)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from mimo_jax import safetensors_io
from mimo_jax.config import ModelConfig

TARGET_KEYS = ("hidden_size", "vocab_size", "num_layers")


def target_meta(cfg: ModelConfig) -> dict:
    """The target's shape as stored in a drafter file's "target" metadata."""
    return {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers,
            "model_type": cfg.model_type}


def target_mismatch(meta: dict, cfg: ModelConfig) -> list[str]:
    """'key stored (this model: value)' for each shape key where the file's target differs from cfg."""
    want, got = json.loads(meta.get("target", "{}")), target_meta(cfg)
    return [f"{k} {want[k]} (this model: {got[k]})" for k in TARGET_KEYS if k in want and want[k] != got[k]]


def flatten(prefix: str, tree) -> dict:
    """{prefix + "a.b.c": array} for a nested dict of arrays, as numpy."""
    return {prefix + ".".join(str(p.key) for p in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(prefix: str, flat: dict) -> dict:
    """The nested dict of flatten(prefix, ...) from the names that start with prefix."""
    tree: dict = {}
    for name, arr in flat.items():
        if not name.startswith(prefix):
            continue
        node, parts = tree, name[len(prefix):].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = arr
    return tree


def save(path, arrays: dict, kind: str, meta: dict) -> None:
    """Write arrays atomically (a .tmp file renamed when complete), with metadata {"kind": kind, k: json(v)}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"kind": kind, **{k: json.dumps(v) for k, v in meta.items()}}
    items = [(name, a.shape, a.dtype, lambda a=a: a) for name, a in arrays.items()]
    safetensors_io.write(path, items, metadata)


def header(path) -> dict:
    """The file's metadata (reads only the safetensors header); raises for a file that is not safetensors."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        return f.metadata() or {}


def kind(path) -> str | None:
    """The file's drafter kind ("block", "mtp"), or None for anything else (no file, not safetensors, no kind)."""
    try:
        return header(path).get("kind")
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a drafter file
        return None


def opt_arrays(opt_state) -> dict:
    """An optimizer state's leaves as "opt.<i>" arrays, saved beside the weights in a trainer's last.safetensors."""
    return {f"opt.{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(opt_state))}


def read_opt(path, like):
    """The optimizer state saved by opt_arrays, in the structure of `like` (a fresh opt.init of the weights)."""
    import jax.numpy as jnp
    from safetensors import safe_open

    leaves, treedef = jax.tree_util.tree_flatten(like)
    with safe_open(str(path), "numpy") as f:
        return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(f.get_tensor(f"opt.{i}"))
                                                      for i in range(len(leaves))])
