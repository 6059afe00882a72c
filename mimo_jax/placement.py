"""Writing a parameter pytree straight into its device shards, one checkpoint tensor at a time.

`DeviceSink(targets, shardings)` allocates every leaf's shards on their devices (zeros: the final footprint) and
`put(leaf, index, value)` writes one piece -- a layer's tensor, one expert's matrix -- into the shards that hold
it: the piece's part for each shard is sliced on the host, copied to that device and written in place by a
donated dynamic_update_slice (`_write`). Routed experts whose target is a quant.QuantizedWeight are quantized
one [K, N] matrix at a time by quant.quantize_jit on the device that holds the expert, then written into the
packed / scales / mins shards the same way; dense weights whose target is an fp8.Fp8Weight are written as the
checkpoint stores them (FP8 values and block scales) or quantized on the device (fp8.quantize_jit). Pieces that arrive as jax arrays (the loader dequantizes and
transposes on a staging device) are cast and sliced there, not on the host. So the host holds one tensor at a
time and each device its final share plus a bounded number of pieces in flight (DeviceSink's fence); `result()`
wraps the shards as global arrays (jax.make_array_from_single_device_arrays). Under jax.distributed each process
allocates and fills only its own devices' shards (pieces owned elsewhere are skipped), and the global arrays
span every process.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import fp8, quant
from mimo_jax.plan import path_keys


@functools.partial(jax.jit, donate_argnums=0)
def _write(buf, piece, index):
    """buf with piece (cast to buf's dtype, leading unit dims added) written at index, in place."""
    piece = piece.astype(buf.dtype).reshape((1,) * (buf.ndim - piece.ndim) + piece.shape)
    return jax.lax.dynamic_update_slice(buf, piece, index)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


class _Array:
    """One array leaf as per-device shard buffers."""

    def __init__(self, struct, sharding):
        self.shape, self.dtype, self.sharding = tuple(struct.shape), jnp.dtype(struct.dtype), sharding
        self.shards = []  # [device, ((lo, hi) per dim), buffer] of this process's devices (jax.distributed)
        for device, idx in sharding.addressable_devices_indices_map(self.shape).items():
            bounds = tuple(s.indices(n)[:2] for s, n in zip(idx, self.shape))
            zeros = jnp.zeros(tuple(hi - lo for lo, hi in bounds), self.dtype, device=device)
            self.shards.append([device, bounds, zeros])

    def owners(self, index: tuple) -> list:
        return [s for s in self.shards if all(lo <= i < hi for i, (lo, hi) in zip(index, s[1]))]

    def put(self, index: tuple, value) -> None:
        """Write `value` (covering shape[len(index):]; numpy, cast on the host, or a jax array, cast on the
        device by _write) at the leading `index`."""
        if isinstance(value, np.ndarray):
            value = value.astype(_np_dtype(self.dtype), copy=False)
        for shard in self.owners(index):
            device, bounds, buf = shard
            trail = bounds[len(index):]
            whole = all((lo, hi) == (0, n) for (lo, hi), n in zip(trail, value.shape))
            piece = jax.device_put(value if whole else value[tuple(slice(lo, hi) for lo, hi in trail)], device)
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
            value = quant.to_layout(value, t.layout)
            for name, part in self.parts.items():
                part.put(index, getattr(value, name))
            return
        if value.ndim > 2:  # a stack of experts (transformers' fused layout): one expert at a time
            for e in range(value.shape[0]):
                self.put(index + (e,), value[e])
            return
        owners = self.parts["packed"].owners(index)
        if not owners:  # the expert lives on another process's device
            return
        w = value.astype(_np_dtype(t.dtype), copy=False) if isinstance(value, np.ndarray) else value.astype(t.dtype)
        qw = quant.quantize_jit(jax.device_put(w, owners[0][0]), fmt=t.fmt, group_size=t.group_size, layout=t.layout)
        for name, part in self.parts.items():
            part.put(index, getattr(qw, name))

    def result(self) -> quant.QuantizedWeight:
        arrays = {name: part.result() for name, part in self.parts.items()}
        t = self.target
        return dataclasses.replace(t, packed=arrays["packed"], scales=arrays["scales"], mins=arrays.get("mins"))


class _Fp8:
    """A dense weight kept in FP8 (fp8.Fp8Weight): its values and block scales, filled layer by layer, either
    from the checkpoint's own FP8 (as stored, no value changed) or quantized from a float tensor on the device."""

    def __init__(self, target: fp8.Fp8Weight, shardings: fp8.Fp8Weight, dtype):
        self.target, self.dtype = target, jnp.dtype(dtype)
        self.parts = {name: _Array(getattr(target, name), getattr(shardings, name)) for name in ("w", "scale")}

    def put(self, index: tuple, value) -> None:
        t = self.target
        if not isinstance(value, fp8.Fp8Weight):  # cast to the load's dtype first, as quantize_dense after a load
            owners = self.parts["w"].owners(index)
            if not owners:
                return
            w = value.astype(_np_dtype(self.dtype), copy=False) if isinstance(value, np.ndarray) else \
                value.astype(self.dtype)
            value = fp8.quantize_jit(jax.device_put(w, owners[0][0]), block=t.block, layout=t.layout)
        if value.block != t.block:
            raise ValueError(f"an FP8 weight of {value.block}-blocks cannot fill a {t.block}-block leaf")
        value = fp8.to_layout(value, t.layout)
        for name, part in self.parts.items():
            part.put(index, getattr(value, name))

    def result(self) -> fp8.Fp8Weight:
        return dataclasses.replace(self.target, w=self.parts["w"].result(), scale=self.parts["scale"].result())


def _is_q(x) -> bool:
    return isinstance(x, (quant.QuantizedWeight, fp8.Fp8Weight))


class DeviceSink:
    """targets: the parameter pytree of jax.ShapeDtypeStruct (routed experts possibly QuantizedWeight of
    structs; dense ones possibly fp8.Fp8Weight of structs); shardings: the same tree with a jax.sharding.Sharding
    per array. Every fence_bytes of input the host waits for the last write, so the staging pieces dispatched but
    not yet written stay bounded. dtype: what a float tensor is cast to before an FP8 leaf quantizes it."""

    def __init__(self, targets, shardings, fence_bytes: int = 256 << 20, dtype=jnp.bfloat16):
        self.targets, self.fence_bytes, self._since = targets, fence_bytes, 0
        flat_t = jax.tree_util.tree_flatten_with_path(targets, is_leaf=_is_q)[0]
        flat_s = jax.tree_util.tree_leaves(shardings, is_leaf=_is_q)
        def sink(t, s):
            if isinstance(t, fp8.Fp8Weight):
                return _Fp8(t, s, dtype)
            return _Quantized(t, s) if _is_q(t) else _Array(t, s)
        self.leaves = {path_keys(p): sink(t, s) for (p, t), s in zip(flat_t, flat_s)}

    def put(self, leaf: tuple, index: tuple, value) -> None:
        sink = self.leaves[leaf]
        sink.put(tuple(index), value)
        self._since += sum(x.nbytes for x in jax.tree_util.tree_leaves(value))
        if self._since >= self.fence_bytes:
            parts = sink.parts.values() if isinstance(sink, (_Quantized, _Fp8)) else (sink,)
            jax.block_until_ready([s[2] for part in parts for s in part.shards])
            self._since = 0

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
