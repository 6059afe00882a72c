"""Dense weights kept in FP8 e4m3 with 128 x 128 block scales: the hub checkpoint's own format.

MiMo-V2-Flash ships q/k/v and the dense MLP as FP8 e4m3 with one float32 scale per 128 x 128 block (w = fp8 x
scale; ../shared/MIMO_FACTS.md). Dequantized to bf16 at load, each of those weights is read at 2 bytes per value
every decode step; kept as they come, at 1 byte (+ 1/4096 for the scales). Nothing is rounded that the checkpoint
did not round already: an FP8 value times its block scale is exact in float32.

Layouts (`layout`): "kn" ("in, out", as every other dense weight of the model): `w` float8_e4m3fn [..., K, N],
`scale` float32 [..., ceil(K/B), ceil(N/B)], B = 128 (`block`); value [k, n] = w[k, n] * scale[k // B, n // B].
"nk" (the hub's own, "out, in"): w [..., N, K], scale [..., ceil(N/B), ceil(K/B)]: each output's weights
contiguous along K, which the GEMV kernel's tensor-core form loads with fewer instructions (LAYOUT). Leading axes
stack layers (the scan slices an Fp8Weight like an array: it is a pytree whose children are w and scale).

Products (`matmul`): on a GPU, one device, up to 16 rows and both sides multiples of the block, the Pallas GEMV
kernel reads the FP8 bytes and applies each block's scale to its partial (pallas_kernels/gemv.py); elsewhere
(CPU, prefill, a mesh) XLA's dot of the dequantized weight.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 128
E4M3_MAX = 448.0
F8 = jnp.float8_e4m3fn
# How quantize / from_checkpoint store the values: "kn" or "nk" (module docstring). Offline SASS (pip Triton 3.6,
# sm_90, `triton_sass.py --what fp8`): the tensor-core form's loop 6.31 instructions per weight "kn", 4.41 "nk"
# (byte-wise shared-memory reads 83 -> 19 per loop); not yet timed on a GPU.
LAYOUT = "nk"


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A dense weight W[..., K, N] as FP8 e4m3 values and float32 block scales (module docstring)."""

    w: jax.Array        # float8_e4m3fn [..., K, N] ("kn") or [..., N, K] ("nk")
    scale: jax.Array    # float32 [..., ceil(K / block), ceil(N / block)] ("kn") or [..., ceil(N/B), ceil(K/B)] ("nk")
    block: int = BLOCK
    layout: str = "kn"

    def tree_flatten(self):
        return (self.w, self.scale), (self.block, self.layout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical [..., K, N]."""
        lead, (a, b) = tuple(self.w.shape[:-2]), tuple(self.w.shape[-2:])
        return lead + ((b, a) if self.layout == "nk" else (a, b))

    @property
    def ndim(self) -> int:
        return len(self.w.shape)

    @property
    def dtype(self):
        """The logical dtype (what the products return for bf16 activations)."""
        return jnp.dtype(jnp.bfloat16)

    @property
    def nbytes(self) -> int:
        return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in (self.w, self.scale)))

    def __getitem__(self, idx) -> "Fp8Weight":
        """Index leading (stacking) dims only, e.g. w[layer]."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.ndim - 2 or any(i is Ellipsis for i in idx):
            raise IndexError(f"Fp8Weight{self.shape}: only leading dims can be indexed, got {idx}")
        return dataclasses.replace(self, w=self.w[idx], scale=self.scale[idx])


def is_fp8(w) -> bool:
    return isinstance(w, Fp8Weight)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _expand(scale, K: int, N: int, block: int):
    """[..., ceil(K/B), ceil(N/B)] -> [..., K, N] (each block's scale over its values)."""
    s = jnp.repeat(jnp.repeat(scale, block, axis=-2), block, axis=-1)
    return s[..., :K, :N]


def _stored(w, scale, block: int, layout: str) -> Fp8Weight:
    """An Fp8Weight in `layout` from "kn" arrays."""
    if layout not in ("kn", "nk"):
        raise ValueError(f"FP8 weight layout {layout!r}: 'kn' or 'nk'")
    if layout == "nk":
        w, scale = jnp.swapaxes(w, -1, -2), jnp.swapaxes(scale, -1, -2)
    return Fp8Weight(w, scale, block, layout)


def quantize(w, block: int = BLOCK, layout: str | None = None) -> Fp8Weight:
    """W [..., K, N] (any float dtype) -> Fp8Weight: per block, scale = max |w| / 448 (1 for an all-zero block),
    values rounded to the nearest e4m3. The hub's checkpoints were made the same way (its scale_inv = our scale).
    Stored in `layout` (None: LAYOUT)."""
    w = jnp.asarray(w)
    *lead, K, N = w.shape
    kb, nb = _blocks(K, block), _blocks(N, block)
    wf = jnp.pad(w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, kb * block - K), (0, nb * block - N)])
    tiles = wf.reshape(*lead, kb, block, nb, block)
    amax = jnp.max(jnp.abs(tiles), axis=(-3, -1))                       # [..., kb, nb]
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(w.astype(jnp.float32) / _expand(scale, K, N, block), -E4M3_MAX, E4M3_MAX).astype(F8)
    return _stored(q, scale, block, layout or LAYOUT)


_quantize_jit = jax.jit(quantize, static_argnames=("block", "layout"))


def quantize_jit(w, block: int = BLOCK, layout: str | None = None) -> Fp8Weight:
    """quantize, compiled once per shape (the layout resolved here: LAYOUT is read per call, not per trace)."""
    return _quantize_jit(w, block=block, layout=layout or LAYOUT)


def from_checkpoint(w_out_in, scale_out_in, block: int = BLOCK, layout: str | None = None) -> Fp8Weight:
    """A hub tensor as stored ("out, in" FP8 [N, K], scale_inv [ceil(N/B), ceil(K/B)]) -> Fp8Weight [K, N] in
    `layout` (None: LAYOUT; "nk" keeps the arrays as they are, "kn" transposes both): no value changed."""
    w, s = jnp.asarray(w_out_in), jnp.asarray(scale_out_in, jnp.float32)
    if w.dtype != F8:
        raise ValueError(f"FP8 weight: expected float8_e4m3fn values, got {w.dtype}")
    N, K = w.shape[-2:]
    if s.shape[-2:] != (_blocks(N, block), _blocks(K, block)):
        raise ValueError(f"FP8 weight [{N}, {K}]: scale shape {s.shape} is not [{_blocks(N, block)}, "
                         f"{_blocks(K, block)}] (block {block})")
    if (layout or LAYOUT) == "nk":
        return Fp8Weight(w, s, block, "nk")
    return Fp8Weight(jnp.swapaxes(w, -1, -2), jnp.swapaxes(s, -1, -2), block, "kn")


def dequantize(fw: Fp8Weight, dtype=jnp.float32):
    """The logical [..., K, N] values."""
    a, b = fw.w.shape[-2:]
    out = fw.w.astype(jnp.float32) * _expand(fw.scale, a, b, fw.block)
    return (jnp.swapaxes(out, -1, -2) if fw.layout == "nk" else out).astype(dtype)


def concat_out(ws) -> Fp8Weight:
    """Fp8Weights [..., K, N_i] side by side along N (q/k/v or gate/up fused into one product). Each N_i must be
    a multiple of the block, so that no block straddles two of them."""
    block, layout = ws[0].block, ws[0].layout
    if any(w.block != block or w.layout != layout or w.shape[:-1] != ws[0].shape[:-1] or w.shape[-1] % block
           for w in ws):
        raise ValueError(f"fp8.concat_out: {[w.shape for w in ws]} need one K, one block ({block}), one layout and "
                         f"every N a multiple of the block")
    axis = -2 if layout == "nk" else -1
    return Fp8Weight(jnp.concatenate([w.w for w in ws], axis=axis),
                     jnp.concatenate([w.scale for w in ws], axis=axis), block, layout)


def kernel_takes(x, fw: Fp8Weight) -> bool:
    """Whether x @ fw runs in the GEMV kernel: GPU, a weight on one device, <= 16 rows, K and N whole blocks of a
    multiple of 128 (the kernel's tiles sit inside one block)."""
    from pallas_kernels.gemv import supported

    if jax.default_backend() != "gpu" or fw.ndim != 2 or fw.block % 128:
        return False
    sharding = getattr(fw.w, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
        return False
    K, N = fw.shape
    M = int(np.prod(x.shape[:-1]))
    return K % fw.block == 0 and N % fw.block == 0 and supported(M, K, N)


def matmul(x, fw: Fp8Weight, cfg=None, impl: str = "auto"):
    """x [..., K] @ W [K, N] -> [..., N] in x's dtype (f32 accumulation). impl: "auto" (the kernel where
    kernel_takes), "kernel", "interpret" (the kernel in interpret mode: CPU tests) or "xla"."""
    K, N = fw.shape[-2:]
    use = impl in ("kernel", "interpret") or (impl == "auto" and kernel_takes(x, fw))
    if not use:
        return jnp.dot(x, dequantize(fw, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    from pallas_kernels.gemv import gemv

    rows = x.reshape(-1, K)
    y = gemv(rows, fw.w, scale=fw.scale, block=fw.block, cfg=cfg, interpret=impl == "interpret",
             nk=fw.layout == "nk")
    return y.reshape(*x.shape[:-1], N)
