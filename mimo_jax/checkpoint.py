"""Converted checkpoints: the loaded (quantized, plan-stacked) parameter pytree saved and restored with orbax.

A converted directory (`python -m mimo_jax.convert`) holds
    params/          orbax-checkpoint (each array saved shard by shard from its devices); QuantizedWeight leaves
                     are saved as {"packed", "scales"[, "mins"]} dicts, their metadata lives in converted.json
    config.json      the ModelConfig (configs/*.json format: what `config.load_config` and the CLI read)
    converted.json   format version, expert format, group and stored layout ("kn" when absent), dtype, the config
                     again: written last
    tokenizer files  copied from the source checkpoint
It is written under a hidden sibling `.<name>.partial-<pid>` and renamed to its name when complete, so a
conversion that is interrupted or fails (disk full) never leaves a directory that looks complete; one without
converted.json is refused as incomplete. Restoring reads each array straight onto its shards of the mesh: it is
bounded by disk bandwidth, with no quantization work.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from mimo_jax import quant
from mimo_jax.config import ModelConfig
from mimo_jax.errors import CheckpointError, ConfigError
from mimo_jax.model import param_shapes
from mimo_jax.quantize_model import check_format, quantize_structs

META = "converted.json"
PARAMS = "params"
VERSION = 1
_SKIP = (".safetensors", ".safetensors.index.json")


def is_converted(path) -> bool:
    path = Path(path)
    return (path / META).is_file() or (path / PARAMS).is_dir()


def read_meta(path) -> tuple[ModelConfig, dict]:
    """(config, metadata) of a converted directory; CheckpointError if it is incomplete or not ours."""
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is an incomplete conversion (no {META}: interrupted or failed while "
                              f"writing); convert again")
    try:
        meta = json.loads((path / META).read_text())
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{path / META}: version {meta.get('version')}, this mimo_jax reads {VERSION}")
        return ModelConfig.from_dict(meta["config"]), meta
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / META} is not a valid conversion record ({e})") from None


def _is_q(x) -> bool:
    return isinstance(x, quant.QuantizedWeight)


def _plain(tree):
    """QuantizedWeight -> {"packed", "scales"[, "mins"]}: the tree orbax saves (dicts and lists only)."""
    def conv(x):
        if not _is_q(x):
            return x
        return {k: getattr(x, k) for k in ("packed", "scales", "mins") if getattr(x, k) is not None}
    return jax.tree_util.tree_map(conv, tree, is_leaf=_is_q)


def _unplain(plain, targets):
    def conv(t, p):
        if not _is_q(t):
            return p
        return dataclasses.replace(t, packed=p["packed"], scales=p["scales"], mins=p.get("mins"))
    return jax.tree_util.tree_map(conv, targets, plain, is_leaf=_is_q)


def _expert_layout(params) -> str | None:
    """The one stored layout of the params' quantized weights (None: none quantized); mixed layouts are refused."""
    layouts = {x.layout for x in jax.tree_util.tree_leaves(params, is_leaf=_is_q) if _is_q(x)}
    if len(layouts) > 1:
        raise CheckpointError(f"quantized weights in several layouts {sorted(layouts)}; convert them to one first")
    return next(iter(layouts), None)


def _checkpointer():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # a declared dependency; say which one is missing
        raise CheckpointError(f"converted checkpoints need orbax-checkpoint (pip install orbax-checkpoint): {e}") \
            from None
    return ocp.StandardCheckpointer()


def save(out, cfg: ModelConfig, params, fmt: str, group: int, dtype, source=None) -> Path:
    """Write `params` (on any devices; each shard saved from where it is) as the converted directory `out`,
    atomically. `out` must not exist."""
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} exists; remove it or choose another output directory")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        ckptr = _checkpointer()
        ckptr.save((tmp / PARAMS).absolute(), _plain(params))
        ckptr.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if source is not None:
            for f in Path(source).iterdir():
                if f.is_file() and f.name != "config.json" and not f.name.endswith(_SKIP):
                    shutil.copy2(f, tmp / f.name)
        meta = {"version": VERSION, "quant_experts": fmt, "quant_group": group, "dtype": jnp.dtype(dtype).name,
                "expert_layout": _expert_layout(params),
                "source": str(source) if source else None, "config": cfg.to_dict()}
        (tmp / META).write_text(json.dumps(meta, indent=1))  # last: its presence means complete
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing {out} failed ({e.strerror or e}); nothing was left under that name") \
            from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _describe(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): (tuple(x.shape), jnp.dtype(x.dtype).name) for p, x in leaves}


def restore(path, mesh=None, attention: str = "tp", dtype=None, quant_experts=None, quant_group: int = 128):
    """(config, params) of a converted directory, each array read onto its shards (mesh None: the default
    device). quant_experts / quant_group, when given, must be what it was converted with; dtype None: the
    stored dtype, another one casts the unquantized leaves as they are read."""
    from mimo_jax import placement

    path = Path(path)
    cfg, meta = read_meta(path)
    fmt, group = meta["quant_experts"], meta["quant_group"]
    if quant_experts not in (None, "none") and check_format(quant_experts, quant_group) != (fmt, group):
        raise ConfigError(f"{path} was converted with experts {fmt} g{group}; quant_experts={quant_experts!r} "
                          f"g{quant_group} needs its own conversion")
    layout = meta.get("expert_layout") or "kn"  # written before layouts existed: "kn"
    stored = quantize_structs(param_shapes(cfg, jnp.dtype(meta["dtype"])), fmt, group, layout)
    ckptr = _checkpointer()
    params_dir = (path / PARAMS).absolute()
    try:
        saved = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001 - orbax raises assorted types for a missing or damaged directory
        raise CheckpointError(f"{params_dir} is not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
    want, have = _describe(_plain(stored)), _describe(saved)
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            raise CheckpointError(f"orbax checkpoint {params_dir} was written for another config: params{name} is "
                                  f"{have.get(name, 'absent')} there, its config.json wants {want.get(name, 'none')}")
    targets = quantize_structs(param_shapes(cfg, dtype or jnp.dtype(meta["dtype"])), fmt, group, layout)
    shardings = placement.shardings(targets, cfg, mesh, attention)
    abstract = jax.tree_util.tree_map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                                      _plain(targets), _plain(shardings))
    plain = ckptr.restore(params_dir, abstract)
    return cfg, _unplain(plain, targets)
