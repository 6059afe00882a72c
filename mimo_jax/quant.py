"""4-bit weight formats: a pytree weight type, quantize / dequantize (the jnp reference), GGUF import.

Layout ("in, out", as the model holds weights): a logical weight W[..., K, N] is stored as
  packed  uint8 [..., K/2, N]      two 4-bit codes per byte
  scales        [..., K/G, N]      one per group of G consecutive K rows (float16; uint8 e8m0 for mxfp4)
  mins          [..., K/G, N]      float16, int4_asym only (None otherwise)
Nibble order, per group of G rows along K: byte j of the group holds row j in its low nibble and row
j + G/2 in its high nibble. With G = 32 this is exactly the byte order of a GGUF Q4_0/Q4_1 block, and
for every G the low and the high halves of a group are contiguous K ranges, which is what the Pallas
kernels want (two dots of K = G/2 per group, no interleaving).

Formats (q is the unsigned 4-bit code, s the group's scale, m its min):
  int4_sym   w = (q - 8) * s        GGUF Q4_0 (s = d, float16)
  int4_asym  w = q * s + m          GGUF Q4_1 (s = d, m = m, float16)
  mxfp4      w = e2m1(q) * 2^(e - 127), e the group's e8m0 byte, G = 32 (OCP MX; UltraSpeed experts)

Stored layouts (`layout`, static aux data like the format):
  "kn"  packed [..., K/2, N] as above (N contiguous): dense weights, and a QuantizedWeight's default.
  "nk"  packed [..., N, K/2], the same bytes with the last two axes swapped: one output column's bytes are
        contiguous along K, which the expert kernels read 8 bytes at a time instead of byte by byte. Routed
        experts are stored so by default (quantize_model.EXPERT_LAYOUT; BENCHMARKS.md, session 18: the
        speculative verify 8% faster per int4 step). For int4 g32 it is exactly GGUF's block byte order without
        the scales. Scales and mins stay [..., K/G, N] in both layouts.
`to_layout` converts (exactly: only bytes move); quantize, dequantize and the GGUF / MXFP4 imports take a layout.

All arrays are pytree leaves and share their leading dims, so a stacked [L, K, N] weight scans into
per-layer [K, N] weights; format, group size, logical (K, N), dtype and layout are static aux data.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int4_sym", "int4_asym", "mxfp4")
LAYOUTS = ("kn", "nk")
PACK = 32  # K granularity of the layout: every group size is a multiple of this

# e2m1 magnitudes for codes 0..7; bit 3 of the code is the sign.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A 4-bit weight W[..., K, N]; see the module docstring for the layout."""

    packed: Any                # uint8 [..., K/2, N] ("kn") or [..., N, K/2] ("nk")
    scales: Any                # float16 [..., K/G, N] (uint8 e8m0 for mxfp4)
    mins: Any                  # float16 [..., K/G, N] for int4_asym, else None
    fmt: str
    group_size: int
    kn: tuple[int, int]        # logical (K, N) of the last two dims
    dtype: str = "bfloat16"    # logical dtype: what dequantize returns by default
    layout: str = "kn"         # how packed is stored: "kn" or "nk" (module docstring)

    def tree_flatten(self):
        return (self.packed, self.scales, self.mins), (self.fmt, self.group_size, self.kn, self.dtype, self.layout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.packed.shape[:-2]) + tuple(self.kn)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (what a matmul must stream)."""
        leaves = [a for a in (self.packed, self.scales, self.mins) if a is not None]
        return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves))

    def __getitem__(self, idx) -> "QuantizedWeight":
        """Index leading (stacking) dims only, e.g. w[layer] or w[expert_ids]."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.ndim - 2 or any(i is Ellipsis for i in idx):
            raise IndexError(f"QuantizedWeight{self.shape}: only leading dims can be indexed, got {idx}")
        pick = lambda a: None if a is None else a[idx]
        return dataclasses.replace(self, packed=pick(self.packed), scales=pick(self.scales), mins=pick(self.mins))


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown 4-bit weight layout {layout!r}; expected one of {LAYOUTS}")
    return layout


def _swap(a):
    return np.swapaxes(a, -1, -2) if isinstance(a, np.ndarray) else jnp.swapaxes(a, -1, -2)


def to_layout(qw: QuantizedWeight, layout: str) -> QuantizedWeight:
    """The same weight stored in `layout` (only the packed bytes' last two axes move; scales and mins stay).
    Numpy arrays stay numpy (contiguous), jax arrays stay jax; a no-op when it already is."""
    if check_layout(layout) == qw.layout:
        return qw
    packed = _swap(qw.packed)
    if isinstance(packed, np.ndarray):
        packed = np.ascontiguousarray(packed)
    return dataclasses.replace(qw, packed=packed, layout=layout)


def kn_packed(qw: QuantizedWeight):
    """The packed bytes in the "kn" order [..., K/2, N], whatever the stored layout."""
    return qw.packed if qw.layout == "kn" else _swap(qw.packed)


def _check(fmt: str, group_size: int, K: int, N: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown 4-bit format {fmt!r}; expected one of {FORMATS}")
    if fmt == "mxfp4" and group_size != 32:
        raise ValueError(f"mxfp4 has a fixed group of 32 values, got group_size={group_size}")
    if group_size % PACK or group_size <= 0:
        raise ValueError(f"group_size must be a positive multiple of {PACK}, got {group_size}")
    if K % group_size:
        raise ValueError(f"weight shape (K={K}, N={N}): K must be a multiple of group_size={group_size}")


# --------------------------------------------------------------------------- packing

def pack_codes(q, group_size: int):
    """uint8 codes [..., K, N] (values 0..15) -> packed uint8 [..., K/2, N] (module docstring order)."""
    *lead, K, N = q.shape
    g = q.reshape(*lead, K // group_size, 2, group_size // 2, N).astype(jnp.uint8)
    return (g[..., 0, :, :] | (g[..., 1, :, :] << 4)).reshape(*lead, K // 2, N)


def unpack_codes(packed, group_size: int):
    """packed uint8 [..., K/2, N] -> uint8 codes [..., K, N]."""
    *lead, K2, N = packed.shape
    p = packed.reshape(*lead, K2 * 2 // group_size, 1, group_size // 2, N)
    q = jnp.concatenate([p & 15, p >> 4], axis=-3)
    return q.reshape(*lead, K2 * 2, N)


def _per_row(a, group_size: int):
    """[..., K/G, N] -> [..., K, N] by repeating each group's value G times along K."""
    return jnp.repeat(a, group_size, axis=-2)


def e2m1_to_float(q):
    """4-bit e2m1 codes -> float32 values."""
    mag = jnp.asarray(E2M1_VALUES)[(q & 7).astype(jnp.int32)]
    return jnp.where((q & 8) != 0, -mag, mag)


# --------------------------------------------------------------------------- quantize / dequantize

def quantize(w, fmt: str = "int4_sym", group_size: int = 128, layout: str = "kn") -> QuantizedWeight:
    """Round-to-nearest quantization of W[..., K, N] (groups of `group_size` along K).

    int4_sym follows GGUF Q4_0 (scale = the signed value of largest magnitude / -8, so it maps to code 0),
    int4_asym follows Q4_1 (scale = (max - min) / 15, min = min), mxfp4 follows OCP MX (shared exponent
    floor(log2(amax)) - 2, elements rounded to the nearest e2m1 value). Scales are stored as float16 and
    the codes are computed from the stored (rounded) scales. `layout`: how the packed bytes are stored.
    """
    check_layout(layout)
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a weight [..., K, N], got shape {w.shape}")
    *lead, K, N = w.shape
    _check(fmt, group_size, K, N)
    wg = w.astype(jnp.float32).reshape(*lead, K // group_size, group_size, N)
    mins = None
    if fmt == "int4_sym":
        idx = jnp.argmax(jnp.abs(wg), axis=-2, keepdims=True)
        vmax = jnp.take_along_axis(wg, idx, axis=-2)
        s = (vmax / -8.0).astype(jnp.float16)
        sf = s.astype(jnp.float32)
        inv = jnp.where(sf == 0, 0.0, 1.0 / jnp.where(sf == 0, 1.0, sf))
        q = jnp.clip(jnp.round(wg * inv) + 8, 0, 15)
        scales = s[..., 0, :]
    elif fmt == "int4_asym":
        lo, hi = wg.min(axis=-2, keepdims=True), wg.max(axis=-2, keepdims=True)
        s = ((hi - lo) / 15.0).astype(jnp.float16)
        m = lo.astype(jnp.float16)
        sf = s.astype(jnp.float32)
        inv = jnp.where(sf == 0, 0.0, 1.0 / jnp.where(sf == 0, 1.0, sf))
        q = jnp.clip(jnp.round((wg - m.astype(jnp.float32)) * inv), 0, 15)
        scales, mins = s[..., 0, :], m[..., 0, :]
    else:  # mxfp4
        amax = jnp.max(jnp.abs(wg), axis=-2, keepdims=True)
        e = jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - 2, 0.0)
        e = jnp.clip(e, -126, 127)
        x = wg / jnp.exp2(e)
        mag = jnp.abs(x)
        code = jnp.argmin(jnp.abs(mag[..., None] - jnp.asarray(E2M1_VALUES)), axis=-1)
        q = code + 8 * ((x < 0) & (code > 0))
        scales = (e + 127).astype(jnp.uint8)[..., 0, :]
    q = q.astype(jnp.uint8).reshape(*lead, K, N)
    qw = QuantizedWeight(pack_codes(q, group_size), scales, mins, fmt, group_size, (K, N),
                         jnp.dtype(w.dtype).name if jnp.issubdtype(w.dtype, jnp.floating) else "float32")
    return to_layout(qw, layout)


def dequantize(qw: QuantizedWeight, dtype=None):
    """The jnp reference: W[..., K, N] in `dtype` (default: the weight's logical dtype), computed in f32."""
    dtype = jnp.dtype(dtype or qw.dtype)
    q = unpack_codes(kn_packed(qw), qw.group_size)
    G = qw.group_size
    if qw.fmt == "int4_sym":
        w = (q.astype(jnp.float32) - 8.0) * _per_row(qw.scales.astype(jnp.float32), G)
    elif qw.fmt == "int4_asym":
        w = q.astype(jnp.float32) * _per_row(qw.scales.astype(jnp.float32), G) \
            + _per_row(qw.mins.astype(jnp.float32), G)
    else:
        scale = jnp.exp2(qw.scales.astype(jnp.float32) - 127.0)
        w = e2m1_to_float(q) * _per_row(scale, G)
    return w.astype(dtype)


def quantization_error(w, qw: QuantizedWeight) -> dict[str, float]:
    """How far dequantize(qw) is from w: relative RMS error, max abs error, SNR in dB (host floats)."""
    w = np.asarray(jnp.asarray(w, jnp.float32))
    d = np.asarray(dequantize(qw, jnp.float32))
    err = d - w
    rms_w = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    rms_e = float(np.sqrt(np.mean(err.astype(np.float64) ** 2)))
    return {"rel_rms": rms_e / max(rms_w, 1e-30), "max_abs": float(np.max(np.abs(err))),
            "snr_db": float(20 * np.log10(max(rms_w, 1e-30) / max(rms_e, 1e-30)))}


# One weight [K, N] at a time, compiled once per shape: what the streaming loader and quantize_experts both call,
# so a model quantized while loading and one quantized after loading hold the same bits.
quantize_jit = jax.jit(quantize, static_argnames=("fmt", "group_size", "layout"))


# --------------------------------------------------------------------------- MXFP4 as checkpoints store it

def from_mxfp4_blocks(blocks, scales, dtype: str = "bfloat16", layout: str = "kn") -> QuantizedWeight:
    """An MXFP4 weight as serving checkpoints store it (torch layout [..., out, in]): `blocks` uint8
    [..., out, in/2], element 2j of a row in the low nibble of byte j and 2j + 1 in the high nibble (int8 or
    uint8 bytes); `scales` [..., out, in/32] e8m0 bytes (uint8 or float8_e8m0fnu), value = e2m1 * 2^(s - 127).
    -> QuantizedWeight [..., in, out] in this module's layout, host numpy, bit-exact: only the nibbles and the
    axes are permuted (no float round trip)."""
    blocks = np.asarray(blocks).view(np.uint8)
    scales = np.asarray(scales).view(np.uint8)
    *lead, n_out, half = blocks.shape
    n_in = 2 * half
    if n_in % 32 or tuple(scales.shape) != (*lead, n_out, n_in // 32):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} need scales {(*lead, n_out, n_in // 32)}, "
                         f"got {tuple(scales.shape)}")
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*lead, n_out, n_in)
    packed = pack_codes(np.swapaxes(codes, -1, -2), 32)
    qw = QuantizedWeight(np.ascontiguousarray(packed), np.ascontiguousarray(np.swapaxes(scales, -1, -2)), None,
                         "mxfp4", 32, (n_in, n_out), dtype)
    return to_layout(qw, layout)


def to_mxfp4_blocks(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of from_mxfp4_blocks: (blocks uint8 [..., out, in/2], scales uint8 [..., out, in/32])."""
    if qw.fmt != "mxfp4":
        raise ValueError(f"to_mxfp4_blocks needs an mxfp4 weight, got {qw.fmt}")
    codes = np.swapaxes(np.asarray(unpack_codes(np.asarray(kn_packed(qw)), 32)), -1, -2)  # [..., out, in]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(np.swapaxes(np.asarray(qw.scales), -1, -2))


# --------------------------------------------------------------------------- GGUF Q4_0 / Q4_1 (exact)

def _gguf_blocks(raw_blocks, shape, block_bytes: int):
    *lead, n_out, n_in = shape
    if n_in % 32:
        raise ValueError(f"GGUF tensor shape {tuple(shape)}: in-features must be a multiple of 32")
    raw = np.ascontiguousarray(np.asarray(raw_blocks, dtype=np.uint8)).reshape(-1)
    n_blocks = int(np.prod(shape)) // 32
    if raw.size != n_blocks * block_bytes:
        raise ValueError(f"GGUF tensor shape {tuple(shape)} needs {n_blocks * block_bytes} bytes, got {raw.size}")
    return raw.reshape(*lead, n_out, n_in // 32, block_bytes), lead, n_out, n_in


def _gguf_packed(blocks, lead, n_out, n_in, layout: str):
    """[..., out, in/32, 16] bytes -> packed: byte j of a block already is our nibble order, so "nk" [..., out, in/2]
    is the blocks' nibble bytes as they are and "kn" [..., in/2, out] their transpose."""
    qs = blocks.reshape(*lead, n_out, n_in // 2)
    return np.ascontiguousarray(qs if check_layout(layout) == "nk" else np.swapaxes(qs, -1, -2))


def _f16_field(blocks, offset):
    v = np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0]  # [..., out, in/32]
    return np.ascontiguousarray(np.swapaxes(v, -1, -2))                                # [..., in/32, out]


def from_gguf_q4_0(raw_blocks, shape, dtype: str = "bfloat16", layout: str = "kn") -> QuantizedWeight:
    """GGUF Q4_0 bytes (18 per block of 32: f16 d, 16 bytes of nibbles) of a tensor whose dequantized
    numpy/torch shape is `shape` = [..., out, in] -> QuantizedWeight of logical shape [..., in, out] stored in
    `layout`, bit-exact (dequantize == gguf.quants.dequantize(...).swapaxes(-1, -2) in float32)."""
    blocks, lead, n_out, n_in = _gguf_blocks(raw_blocks, shape, 18)
    packed = _gguf_packed(blocks[..., 2:], lead, n_out, n_in, layout)
    return QuantizedWeight(jnp.asarray(packed), jnp.asarray(_f16_field(blocks, 0)), None,
                           "int4_sym", 32, (n_in, n_out), dtype, layout)


def from_gguf_q4_1(raw_blocks, shape, dtype: str = "bfloat16", layout: str = "kn") -> QuantizedWeight:
    """GGUF Q4_1 bytes (20 per block of 32: f16 d, f16 m, 16 bytes of nibbles); see from_gguf_q4_0."""
    blocks, lead, n_out, n_in = _gguf_blocks(raw_blocks, shape, 20)
    packed = _gguf_packed(blocks[..., 4:], lead, n_out, n_in, layout)
    return QuantizedWeight(jnp.asarray(packed), jnp.asarray(_f16_field(blocks, 0)),
                           jnp.asarray(_f16_field(blocks, 2)), "int4_asym", 32, (n_in, n_out), dtype, layout)


# --------------------------------------------------------------------------- matmuls (dispatch)

IMPLS = ("auto", "pallas", "interpret", "xla")


def _impl(impl: str) -> str:
    """auto -> "pallas" on a CUDA GPU, else "xla". An argument (static under jit), never read from the
    environment: a choice read while tracing would stick to whatever jit had cached."""
    if impl not in IMPLS:
        raise ValueError(f"unknown quantized matmul impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def reads_experts_in_place(impl: str = "auto") -> bool:
    """True where the grouped kernel runs (GPU): it reads the experts that have rows straight from a whole
    [layers * E, K, N] stack, however many rows there are; XLA's fallback dequantizes every expert it is given."""
    return _impl(impl) != "xla"


def offsets_fit_kernel(w) -> bool:
    """False when an array of w holds up to 2^32 bytes and more than 2^31 elements: the Pallas Triton lowering indexes
    arrays up to 2^32 bytes with signed 32-bit offsets, so elements past 2^31 would be read at negative offsets
    (a flattened MiMo-V2-Flash expert stack on one GPU is exactly 2^32 bytes). Callers keep such a stack
    unflattened (a per-layer view) instead."""
    leaves = [a for a in jax.tree_util.tree_leaves(w) if hasattr(a, "dtype")]
    return not any(a.size > 2 ** 31 and a.size * np.dtype(a.dtype).itemsize <= 2 ** 32 for a in leaves)


def _local_shape(a) -> tuple:
    """The shape one device holds of a (a sharded jax.Array's shard; a plain array's own)."""
    sharding = getattr(a, "sharding", None)
    return tuple(sharding.shard_shape(a.shape)) if sharding is not None else tuple(a.shape)


def pad_to_fit_kernel(w, max_overhead: float = 0.5):
    """An expert stack (QuantizedWeight [lead, ..., E, K, N]) with a per-device array (packed codes, scales or
    mins) in the range offsets_fit_kernel refuses (> 2^31 elements, <= 2^32 bytes) padded with the fewest zero
    layers along its first axis after which every array fits: the Pallas lowering then indexes the grown array with
    64-bit offsets and the kernel reads the stack in place (a MiMo-V2-Flash stack of [8 layers x 128 experts] per
    device is exactly 2^32 bytes; sliced per layer instead, the copies cost 5.6 ms of a 17.4 ms step on 2 x H200;
    its run later became [7 repeats x 1 full layer x 128 experts], which needs 2 zero repeats (+29%): refused by
    the 25% bound of then, its copies made the step 19.7 ms instead of 12.1). Padding costs memory only (the zero
    layers are never read); a slice copies a whole layer's experts every step. Layer indices are unchanged (the
    padding comes after the real layers). Returned as is when it fits, has no layer axis, or padding would add
    more than max_overhead of its layers."""
    if not isinstance(w, QuantizedWeight) or w.packed.ndim < 4:
        return w
    structs = [jax.ShapeDtypeStruct(_local_shape(a), a.dtype) for a in _weight_arrays(w) if a is not None]
    if offsets_fit_kernel(structs):
        return w
    layers = structs[0].shape[0]
    grown = lambda n: [jax.ShapeDtypeStruct((layers + n,) + s.shape[1:], s.dtype) for s in structs]  # noqa: E731
    extra = next((n for n in range(1, int(max_overhead * layers) + 1) if offsets_fit_kernel(grown(n))), None)
    if extra is None:
        return w

    def pad(a):
        if a is None:
            return None
        widths = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
        sharding = getattr(a, "sharding", None)
        return jax.jit(lambda v: jnp.pad(v, widths), out_shardings=sharding)(a)

    return dataclasses.replace(w, packed=pad(w.packed), scales=pad(w.scales), mins=pad(w.mins))


def _fused_pair(w_gate, w_up) -> bool:
    """Whether one kernel can read both weights: both quantized, in the same format, group size and layout."""
    return (isinstance(w_gate, QuantizedWeight) and isinstance(w_up, QuantizedWeight)
            and (w_gate.fmt, w_gate.group_size, w_gate.layout) == (w_up.fmt, w_up.group_size, w_up.layout))


def _weight_arrays(w: QuantizedWeight):
    return (w.packed, w.scales, w.mins if w.fmt == "int4_asym" else None)


def qmatmul(x, w, *, impl: str = "auto", cfg=None):
    """x[..., K] @ w[K, N] -> [..., N] in x's dtype. w: a plain array (jnp.dot) or a QuantizedWeight
    (Pallas kernel on GPU, XLA dequantize + dot elsewhere; impl="interpret" runs the kernel in Pallas
    interpret mode, impl="xla" forces the fallback)."""
    if not isinstance(w, QuantizedWeight):
        return jnp.dot(x, w)
    if w.ndim != 2:
        raise ValueError(f"qmatmul: weight must be [K, N], got {w.shape} (index the stacked dims first)")
    K, N = w.kn
    if x.shape[-1] != K:
        raise ValueError(f"qmatmul: x {x.shape} does not match weight (K={K}, N={N})")
    impl = _impl(impl)
    x2 = x.reshape(-1, K)
    if impl == "xla":
        out = jnp.dot(x2, dequantize(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    else:
        from pallas_kernels.int4_matmul import int4_matmul
        out = int4_matmul(x2, *_weight_arrays(w), fmt=w.fmt, group_size=w.group_size, cfg=cfg,
                          interpret=impl == "interpret", layout=w.layout)
    return out.reshape(*x.shape[:-1], N)


def _check_ragged(x, w, group_sizes, name):
    if w.ndim != 3:
        raise ValueError(f"{name}: expert weight must be [E, K, N], got {tuple(w.shape)}")
    E, K, N = w.shape
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"{name}: x {x.shape} does not match expert weight [E={E}, K={K}, N={N}]")
    if group_sizes is not None and group_sizes.shape != (E,):
        raise ValueError(f"{name}: group_sizes {group_sizes.shape} does not match E={E}")


def ragged_qmatmul(x, w, group_sizes, *, impl: str = "auto", cfg=None):
    """jax.lax.ragged_dot semantics: rows of x[M, K] sorted by expert, group_sizes[E] (int32) rows per
    expert, w[E, K, N] plain or quantized -> [M, N] (rows past sum(group_sizes) are zero). The Pallas
    kernel reads only experts that have rows, each once per N tile."""
    _check_ragged(x, w, group_sizes, "ragged_qmatmul")
    if not isinstance(w, QuantizedWeight):
        return jax.lax.ragged_dot(x, w, group_sizes)
    impl = _impl(impl)
    if impl == "xla":
        return jax.lax.ragged_dot(x, dequantize(w, x.dtype), group_sizes,
                                  preferred_element_type=jnp.float32).astype(x.dtype)
    from pallas_kernels.int4_matmul import int4_grouped_matmul
    return int4_grouped_matmul(x, group_sizes, (_weight_arrays(w),), fmt=w.fmt, group_size=w.group_size,
                               cfg=cfg, interpret=impl == "interpret", layout=w.layout)


def ragged_qmatmul_gate_up(x, w_gate, w_up, group_sizes, row_scale=None, *, impl: str = "auto",
                           cfg=None):
    """SiLU(x @ w_gate) * (x @ w_up) per expert (ragged_dot semantics), optionally times row_scale[M]
    (e.g. the router weight of each row, which commutes with the down projection). One kernel reads x
    once for both weights when both are quantized in the same format."""
    _check_ragged(x, w_gate, group_sizes, "ragged_qmatmul_gate_up")
    _check_ragged(x, w_up, group_sizes, "ragged_qmatmul_gate_up")
    impl = _impl(impl)
    same = _fused_pair(w_gate, w_up)
    if impl == "xla" or not same:
        g = ragged_qmatmul(x, w_gate, group_sizes, impl=impl, cfg=cfg).astype(jnp.float32)
        u = ragged_qmatmul(x, w_up, group_sizes, impl=impl, cfg=cfg).astype(jnp.float32)
        h = jax.nn.silu(g) * u
        if row_scale is not None:
            h = h * row_scale.astype(jnp.float32)[:, None]
        return h.astype(x.dtype)
    from pallas_kernels.int4_matmul import int4_grouped_matmul
    return int4_grouped_matmul(x, group_sizes, (_weight_arrays(w_gate), _weight_arrays(w_up)), row_scale,
                               fmt=w_gate.fmt, group_size=w_gate.group_size, cfg=cfg,
                               interpret=impl == "interpret", layout=w_gate.layout,
                               epilogue="silu_mul" if row_scale is None else "silu_mul_scaled")


# Unquantized experts at decode through pallas_kernels/pair_gemv.py instead of XLA's take + einsum (~8% of the read
# ceiling on an H100: BENCHMARKS.md, session 20). Off until timed on a GPU: the kernel compiles for sm_90 offline
# (`triton_sass.py --what pair`: 2.9-3.2 loop instructions per weight, 64-bit expert offsets), but the one call that
# would have run it ended with the machine not answering. Next: `benchmarks/bench_pair_gemv.py`, then turn it on.
PAIR_GEMV_FLOAT = False


def _float_pairs(impl: str, *ws) -> bool:
    """Whether float (unquantized) expert stacks [E, K, N] take the pair GEMV kernel (offsets_fit_kernel: a 1-byte
    stack of > 2^31 elements would be indexed past 32-bit offsets)."""
    from pallas_kernels.pair_gemv import supported

    return (PAIR_GEMV_FLOAT and impl != "xla" and all(isinstance(w, jax.Array) and w.ndim == 3 for w in ws)
            and all(w.shape == ws[0].shape and w.dtype == ws[0].dtype for w in ws) and supported(*ws[0].shape[1:])
            and all(offsets_fit_kernel(w) for w in ws))


def float_pairs_take_kernel(*ws, impl: str = "auto") -> bool:
    """Whether unquantized expert stacks run pallas_kernels/pair_gemv.py here (PAIR_GEMV_FLOAT, a GPU)."""
    return _float_pairs(_impl(impl), *ws)


def pair_qmatmul(x, w, row_experts, *, impl: str = "auto", cfg=None, busy_rows: int | None = None):
    """Row r of x[M, K] times expert row_experts[r] of w[E, K, N] -> [M, N]; E (or more) = skip, a zero row.
    Rows need no sorting: the Pallas kernel runs one row tile per row (`int4_matmul.row_tiles`), which reads
    every expert once when the rows' experts are distinct (one token's top-k at decode). busy_rows: how many rows
    are expected not to skip (the kernel's default config splits K for those)."""
    _check_ragged(x, w, None, "pair_qmatmul")
    impl = _impl(impl)
    E = w.shape[0]
    if _float_pairs(impl, w):  # unquantized experts: pallas_kernels/pair_gemv.py
        from pallas_kernels.pair_gemv import pair_gemv
        return pair_gemv(x, (w,), jnp.minimum(row_experts, E), interpret=impl == "interpret")
    if impl == "xla" or not isinstance(w, QuantizedWeight):
        pick = jnp.minimum(row_experts, E - 1)
        rows_w = jax.tree_util.tree_map(lambda a: jnp.take(a, pick, axis=0), w)
        rows_w = dequantize(rows_w, x.dtype) if isinstance(rows_w, QuantizedWeight) else rows_w.astype(x.dtype)
        y = jnp.einsum("mk,mkn->mn", x, rows_w, preferred_element_type=jnp.float32)
        return jnp.where((row_experts < E)[:, None], y, 0.0).astype(x.dtype)
    from pallas_kernels.int4_matmul import int4_grouped_matmul
    return int4_grouped_matmul(x, None, (_weight_arrays(w),), fmt=w.fmt, group_size=w.group_size, cfg=cfg,
                               interpret=impl == "interpret", row_experts=jnp.minimum(row_experts, E),
                               layout=w.layout, busy_rows=busy_rows)


def pair_qmatmul_gate_up(x, w_gate, w_up, row_experts, *, impl: str = "auto", cfg=None,
                         busy_rows: int | None = None):
    """SiLU(x @ w_gate[e_r]) * (x @ w_up[e_r]) per row r (see pair_qmatmul); one kernel reads x once for both
    weights when both are quantized in the same format."""
    impl = _impl(impl)
    if _float_pairs(impl, w_gate, w_up):
        from pallas_kernels.pair_gemv import pair_gemv
        return pair_gemv(x, (w_gate, w_up), jnp.minimum(row_experts, w_gate.shape[0]), interpret=impl == "interpret",
                         epilogue="silu_mul")
    same = _fused_pair(w_gate, w_up)
    if impl == "xla" or not same:
        g = pair_qmatmul(x, w_gate, row_experts, impl=impl, cfg=cfg, busy_rows=busy_rows).astype(jnp.float32)
        u = pair_qmatmul(x, w_up, row_experts, impl=impl, cfg=cfg, busy_rows=busy_rows).astype(jnp.float32)
        return (jax.nn.silu(g) * u).astype(x.dtype)
    _check_ragged(x, w_gate, None, "pair_qmatmul_gate_up")
    from pallas_kernels.int4_matmul import int4_grouped_matmul
    return int4_grouped_matmul(x, None, (_weight_arrays(w_gate), _weight_arrays(w_up)), fmt=w_gate.fmt,
                               group_size=w_gate.group_size, cfg=cfg, interpret=impl == "interpret",
                               epilogue="silu_mul", row_experts=jnp.minimum(row_experts, w_gate.shape[0]),
                               layout=w_gate.layout, busy_rows=busy_rows)
