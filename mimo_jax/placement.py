"""Writing a parameter pytree straight into its device shards, one checkpoint tensor at a time.

`DeviceSink(targets, shardings)` allocates every leaf's shards on their devices (zeros: the final footprint) and
`put(leaf, index, value)` writes one piece -- a layer's tensor, one expert's matrix -- into the shards that hold
it: the piece's part for each shard is sliced on the host, copied to that device and written in place by a
donated dynamic_update_slice (`_write`). Routed experts whose target is a quant.QuantizedWeight are quantized
one [K, N] matrix at a time by quant.quantize_jit on the device that holds the expert, then written into the
packed / scales / mins shards the same way. So the host holds one tensor at a time and each device its final
share plus one piece; `result()` wraps the shards as global arrays (jax.make_array_from_single_device_arrays).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import quant
from mimo_jax.plan import path_keys


@functools.partial(jax.jit, donate_argnums=0)
def _write(buf, piece, index):
    return jax.lax.dynamic_update_slice(buf, piece, index)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


class _Array:
    """One array leaf as per-device shard buffers."""

    def __init__(self, struct, sharding):
        self.shape, self.dtype, self.sharding = tuple(struct.shape), jnp.dtype(struct.dtype), sharding
        self.shards = []  # [device, ((lo, hi) per dim), buffer]
        for device, idx in sharding.devices_indices_map(self.shape).items():
            bounds = tuple(s.indices(n)[:2] for s, n in zip(idx, self.shape))
            zeros = jnp.zeros(tuple(hi - lo for lo, hi in bounds), self.dtype, device=device)
            self.shards.append([device, bounds, zeros])

    def owners(self, index: tuple) -> list:
        return [s for s in self.shards if all(lo <= i < hi for i, (lo, hi) in zip(index, s[1]))]

    def put(self, index: tuple, value) -> None:
        """Write `value` (covering shape[len(index):], numpy or a jax array) at the leading `index`."""
        if isinstance(value, np.ndarray):
            value = value.astype(_np_dtype(self.dtype), copy=False)
        for shard in self.owners(index):
            device, bounds, buf = shard
            trail = bounds[len(index):]
            piece = value[tuple(slice(lo, hi) for lo, hi in trail)]
            piece = jax.device_put(piece.reshape((1,) * len(index) + piece.shape), device)
            start = tuple(np.int32(i - lo) for i, (lo, _) in zip(index, bounds)) + (np.int32(0),) * len(trail)
            shard[2] = _write(buf, piece, start)

    def result(self) -> jax.Array:
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, [s[2] for s in self.shards])


class _Quantized:
    """A quantized leaf: its packed / scales / mins arrays, filled expert by expert."""

    def __init__(self, target: quant.QuantizedWeight, shardings: quant.QuantizedWeight):
        self.target = target
        self.parts = {name: _Array(getattr(target, name), getattr(shardings, name))
                      for name in ("packed", "scales", "mins") if getattr(target, name) is not None}

    def put(self, index: tuple, value) -> None:
        t = self.target
        if isinstance(value, quant.QuantizedWeight):  # stored quantized (MXFP4 experts): written as they are
            if (value.fmt, value.group_size) != (t.fmt, t.group_size):
                raise ValueError(f"a {value.fmt} g{value.group_size} weight cannot fill a {t.fmt} g{t.group_size} leaf")
            for name, part in self.parts.items():
                part.put(index, getattr(value, name))
            return
        if value.ndim > 2:  # a stack of experts (transformers' fused layout): one expert at a time
            for e in range(value.shape[0]):
                self.put(index + (e,), value[e])
            return
        w = np.asarray(value).astype(_np_dtype(t.dtype), copy=False)
        device = self.parts["packed"].owners(index)[0][0]
        qw = quant.quantize_jit(jax.device_put(w, device), fmt=t.fmt, group_size=t.group_size)
        for name, part in self.parts.items():
            part.put(index, getattr(qw, name))

    def result(self) -> quant.QuantizedWeight:
        arrays = {name: part.result() for name, part in self.parts.items()}
        t = self.target
        return quant.QuantizedWeight(arrays["packed"], arrays["scales"], arrays.get("mins"), t.fmt, t.group_size,
                                     t.kn, t.dtype)


def _is_q(x) -> bool:
    return isinstance(x, quant.QuantizedWeight)


class DeviceSink:
    """targets: the parameter pytree of jax.ShapeDtypeStruct (routed experts possibly QuantizedWeight of
    structs); shardings: the same tree with a jax.sharding.Sharding per array."""

    def __init__(self, targets, shardings):
        self.targets = targets
        flat_t = jax.tree_util.tree_flatten_with_path(targets, is_leaf=_is_q)[0]
        flat_s = jax.tree_util.tree_leaves(shardings, is_leaf=_is_q)
        self.leaves = {path_keys(p): (_Quantized(t, s) if _is_q(t) else _Array(t, s))
                       for (p, t), s in zip(flat_t, flat_s)}

    def put(self, leaf: tuple, index: tuple, value) -> None:
        self.leaves[leaf].put(tuple(index), value)

    def result(self):
        paths, treedef = jax.tree_util.tree_flatten_with_path(self.targets, is_leaf=_is_q)
        return jax.tree_util.tree_unflatten(treedef, [self.leaves[path_keys(p)].result() for p, _ in paths])


def shardings(targets, cfg, mesh=None, attention: str = "tp"):
    """A jax.sharding.Sharding per array of `targets` (QuantizedWeight children included): the sharding table
    (sharding.specs) on `mesh`, or the default device when mesh is None."""
    from mimo_jax import sharding

    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda s: dev, targets)
    specs = sharding.specs(targets, cfg, mesh, attention)
    return jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
