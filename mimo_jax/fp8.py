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

Products (`matmul`): on a GPU, up to 48 rows (in chunks of 16) and both sides multiples of the block, the Pallas
GEMV kernel reads the FP8 bytes and applies each block's scale to its partial (pallas_kernels/gemv.py); on a mesh
the same kernel runs per device under shard_map on each device's slice (`spec`, noted when the weight was placed),
with a psum when K is split; elsewhere (CPU, prefill) XLA's dot of the dequantized weight.
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
    spec: tuple | None = None  # on a mesh: the PartitionSpec of w (and scale), as stored (sharding.shard notes it)

    def tree_flatten(self):
        return (self.w, self.scale), (self.block, self.layout, self.spec)

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

    def __getitem__(self, idx) -> "Fp8Weight":
        """Index leading (stacking) dims only, e.g. w[layer]."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.ndim - 2 or any(i is Ellipsis for i in idx):
            raise IndexError(f"Fp8Weight{self.shape}: only leading dims can be indexed, got {idx}")
        return dataclasses.replace(self, w=self.w[idx], scale=self.scale[idx])


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _expand(scale, K: int, N: int, block: int):
    """[..., ceil(K/B), ceil(N/B)] -> [..., K, N] (each block's scale over its values)."""
    s = jnp.repeat(jnp.repeat(scale, block, axis=-2), block, axis=-1)
    return s[..., :K, :N]


def to_layout(fw: Fp8Weight, layout: str) -> Fp8Weight:
    """The same weight stored in `layout` ("kn" or "nk"): values and scales transposed when it differs."""
    if layout not in ("kn", "nk"):
        raise ValueError(f"FP8 weight layout {layout!r}: 'kn' or 'nk'")
    if layout == fw.layout:
        return fw
    return dataclasses.replace(fw, w=jnp.swapaxes(fw.w, -1, -2), scale=jnp.swapaxes(fw.scale, -1, -2), layout=layout)


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
    return to_layout(Fp8Weight(q, scale, block, "kn"), layout or LAYOUT)


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
    return to_layout(Fp8Weight(w, s, block, "nk"), layout or LAYOUT)


def columns(fw: Fp8Weight, idx, dtype=jnp.float32):
    """W[:, idx].T of a 2-D weight: the logical columns idx as rows [len(idx), K], only those values widened (the
    lm_head's rows of a draft vocabulary)."""
    K = fw.shape[-2]
    if fw.layout == "nk":
        vals, s = jnp.take(fw.w, idx, axis=0), jnp.take(fw.scale, idx // fw.block, axis=0)
    else:
        vals, s = jnp.take(fw.w, idx, axis=1).T, jnp.take(fw.scale, idx // fw.block, axis=1).T
    return (vals.astype(jnp.float32) * jnp.repeat(s, fw.block, axis=-1)[:, :K]).astype(dtype)


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


def _mesh_size() -> int:
    from mimo_jax import sharding

    return sharding.expert_axis_size()


# Rows past the kernel's 16 run as chunks of 16, each reading the weight again. XLA's path writes the widened weight
# first and streams at ~15% of the ceiling counting FP8 bytes, the kernel at 55-85% (bench_fp8_gemv.py, sessions 19-20:
# lm_head at 9 rows 1183 us vs 243), so up to 3 chunks (~4.3 weight-reads' time vs ~6.7) should still win, e.g. a
# batched decode of 32 slots; estimated from those per-product figures, not timed at a step. Longer (prefill): XLA.
CHUNK = 16
KERNEL_MAX_ROWS = 48


def kernel_takes(x, fw: Fp8Weight) -> bool:
    """Whether x @ fw runs in the GEMV kernel: GPU, <= 16 rows, a 2-D weight whose blocks are a multiple of 128
    (the kernel's tiles sit inside one block), each device's K and N whole blocks (on a mesh: the slice it holds,
    known from `spec`; a weight on a mesh without one stays on XLA's path)."""
    from pallas_kernels.gemv import supported

    if jax.default_backend() != "gpu" or fw.ndim != 2 or fw.block % 128:
        return False
    on_mesh = _mesh_size() > 1
    if on_mesh and fw.spec is None:
        return False
    K, N = _local_kn(fw) if on_mesh else fw.shape
    M = int(np.prod(x.shape[:-1]))
    return K % fw.block == 0 and N % fw.block == 0 and M <= KERNEL_MAX_ROWS and supported(min(M, CHUNK), K, N)


def _axes_kn(fw: Fp8Weight):
    """The mesh axes (or None) that split the logical K and N of a placed weight."""
    spec = (None, None) + tuple(fw.spec)
    a, b = spec[-2], spec[-1]
    return (b, a) if fw.layout == "nk" else (a, b)


def _local_kn(fw: Fp8Weight) -> tuple[int, int]:
    mesh = jax.sharding.get_abstract_mesh()
    size = lambda ax: 1 if ax is None else int(np.prod([mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,))]))  # noqa: E731
    (K, N), (k_ax, n_ax) = fw.shape, _axes_kn(fw)
    return K // size(k_ax), N // size(n_ax)


def _kernel_product(rows, fw: Fp8Weight, cfg, interpret: bool):
    """rows [M, K] @ fw [K, N] in the GEMV kernel on one device's arrays -> f32 [M, N]."""
    from pallas_kernels.gemv import gemv

    if rows.shape[0] > CHUNK:  # chunks of 16 rows (KERNEL_MAX_ROWS)
        return jnp.concatenate([_kernel_product(rows[i:i + CHUNK], fw, cfg, interpret)
                                for i in range(0, rows.shape[0], CHUNK)], axis=0)
    parts = gemv(rows, fw.w, scale=fw.scale, block=fw.block, cfg=cfg, interpret=interpret,
                 nk=fw.layout == "nk", partials=True)
    return parts.sum(axis=0)


def matmul(x, fw: Fp8Weight, cfg=None, impl: str = "auto", out_dtype=None):
    """x [..., K] @ W [K, N] -> [..., N] in out_dtype (None: x's dtype), f32 accumulation. impl: "auto" (the
    kernel where kernel_takes), "kernel", "interpret" (the kernel in interpret mode: CPU tests) or "xla"."""
    K, N = fw.shape[-2:]
    out_dtype = out_dtype or x.dtype
    use = impl in ("kernel", "interpret") or (impl == "auto" and kernel_takes(x, fw))
    if not use:
        return jnp.dot(x, dequantize(fw, x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
    rows, interpret = x.reshape(-1, K), impl == "interpret"
    if fw.spec is None or _mesh_size() <= 1:
        y = _kernel_product(rows, fw, cfg, interpret)
    else:  # each device its slice; a split K is summed over the mesh
        from jax.sharding import PartitionSpec as P

        k_ax, n_ax = _axes_kn(fw)
        w_spec = P(*fw.spec[-2:])  # (a layer's slice of a stacked weight keeps the stack's spec)

        def local(r, w, s):
            y = _kernel_product(r, dataclasses.replace(fw, w=w, scale=s, spec=None), cfg, interpret)
            return jax.lax.psum(y, k_ax) if k_ax is not None else y

        y = jax.shard_map(local, in_specs=(P(None, k_ax), w_spec, w_spec), out_specs=P(None, n_ax),
                          check_vma=False)(rows, fw.w, fw.scale)
    return y.astype(out_dtype).reshape(*x.shape[:-1], N)
