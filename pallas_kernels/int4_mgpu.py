"""W4A16 dequant-matmul for small M on Hopper, written with Pallas Mosaic GPU (`plgpu`): y = x[M, K] @ W4[K, N].

Decode is weight streaming, so the kernel is built around the weight, not the activations:

* Swapped operands. Each compute warpgroup computes y^T[n-tile, M] = W^T[n-tile, K] @ x^T[K, M] with wgmma:
  the weight rows fill wgmma's M slot (64 or 128 rows per warpgroup) and the few tokens its N slot
  (M padded to Mp, a multiple of 8, <= 256), so a token count of 1..16 wastes no tensor-core rows.
* Kernel layout of the weight ("nk"): the 4-bit codes transposed to [..., N, K] as a signed `jnp.int4`
  array holding q - 8 (int4_sym), K contiguous per output channel. A TMA box [rows, G] of it lands in
  shared memory tiled + swizzled; a warpgroup loads it straight into the register layout made for 4-bit ->
  16-bit upcasts (WGMMA_UPCAST_4X: 8 codes per 32-bit register), re-lays it out to the wgmma A-operand
  layout with two lane shuffles per 8 codes while still 4-bit, and converts int4 -> bf16 with the
  prmt / lop3 / sub bit trick (Mosaic GPU's own lowering). No shared-memory round trip of bf16 values.
  Scales keep the layout of mimo_jax.quant ([..., K/G, N] float16). `to_kernel_layout` / `from_kernel_layout`
  convert to and from mimo_jax.quant's packed layout exactly (pure jnp functions).
* One pipeline step = one quantization group (block_k = G): the weight box [BN, G], the activation box
  [Mp, G] and the group's BN scales arrive through TMA on one barrier, `max_concurrent_steps` deep, issued
  by a third (memory) warpgroup (`plgpu.emit_pipeline_warp_specialized`).
* The scale is applied exactly, in f32, to the group's partial product (scale_mode="acc": one small wgmma
  accumulator per group, [rows, Mp] f32, i.e. Mp/2 registers a thread) -- the same math as the jnp
  reference -- or, cheaper in registers but rounding the f16 scale to bf16, to the bf16 weights before the
  wgmma (scale_mode="w").
* Split-K over CTAs (grid = N tiles x K splits, sized to fill the SMs): each CTA writes an f32 partial
  [N-tile, Mp] and XLA sums the partials (one small fusion); without split the CTA writes y directly
  (transposed through shared memory into [M, N]).

Formats: int4_sym with G in {64, 128, 256} (G = 128 is the decode default). int4_asym / mxfp4 / G = 32 are not
handled here; use pallas_kernels.int4_matmul for those (Mosaic GPU's e2m1 casts are Blackwell-only).

Status (H200, jax 0.11.2, 2026-11-22, device time from CUPTI, benchmarks/bench_int4_mgpu.py): correct
(rel. err 1.6e-3..1.7e-3 vs the f32 reference, bf16 output) but NOT at the target: the kernel alone streams
1.7-1.9 TB/s (36-41% of the 4.54-4.62 TB/s ceiling) on the 32 MiB shapes and ~0.95 TB/s (kernel only;
~15-20% of the ceiling counting the pad / split-K reduce fusions) on 4-6 MiB expert shapes -- level with the
Triton kernel. Time scales with pipeline steps per CTA (halving split-K doubles it; stages, layout tiling,
scale mode move it < 10%): each compute warpgroup runs its step (wait, smem load, 4-bit relayout, int4 -> bf16,
wgmma, wait, scale) as one dependent chain, ~0.6 us per [128, 128] step per CTA with only 8 compute warps per
SM. Next: more warps in flight per SM (4 compute warpgroups hung -- see `check`), overlapping step i's wgmma
with step i+1's conversion (wgmma_wait(1) + BlockSpec delay_release=1), an in-kernel split-K reduction.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
N_SMS_DEFAULT = 132


# --------------------------------------------------------------------------- layout (pure jnp)

def _unpack(packed, group_size: int):
    """packed uint8 [..., K/2, N] (mimo_jax.quant order) -> codes uint8 [..., K, N]."""
    *lead, K2, N = packed.shape
    p = packed.reshape(*lead, K2 * 2 // group_size, 1, group_size // 2, N)
    q = jnp.concatenate([p & 15, p >> 4], axis=-3)
    return q.reshape(*lead, K2 * 2, N)


def _pack(q, group_size: int):
    """codes uint8 [..., K, N] -> packed uint8 [..., K/2, N] (mimo_jax.quant order)."""
    *lead, K, N = q.shape
    g = q.reshape(*lead, K // group_size, 2, group_size // 2, N).astype(jnp.uint8)
    return (g[..., 0, :, :] | (g[..., 1, :, :] << 4)).reshape(*lead, K // 2, N)


def to_nk(packed, group_size: int):
    """packed uint8 [..., K/2, N] -> signed int4 [..., N, K] holding q - 8 (int4_sym codes, transposed)."""
    q = _unpack(packed, group_size).astype(jnp.int8) - 8          # [..., K, N] in -8..7
    return jnp.swapaxes(q, -1, -2).astype(jnp.int4)


def from_nk(w_nk, group_size: int):
    """Inverse of `to_nk`."""
    q = (jnp.swapaxes(w_nk, -1, -2).astype(jnp.int8) + 8).astype(jnp.uint8)
    return _pack(q, group_size)


def to_kernel_layout(packed, scales, group_size: int, bn: int = 128, fmt: str = "int4_sym"):
    """mimo_jax.quant layout -> this kernel's "tiled" layout, exactly (inverse: `from_kernel_layout`).

    w_t  int4 [..., (N/bn) * (K/G) * bn, G]: row ((j * K/G) + g) * bn + r holds W^T[j*bn + r, g*G : (g+1)*G]
         as q - 8, i.e. the [bn, G] weight box of one (N tile, group) pipeline step is one contiguous
         bn*G/2-byte block, and a CTA's K range of one N tile is contiguous too (long HBM bursts).
    s_t  float16 [..., (N/bn) * (K/G), bn]: row j * K/G + g holds scales[g, j*bn : (j+1)*bn].
    Pure jnp (use it at quantize / load time, under jit or not); bn is layout metadata, like group_size.
    """
    if fmt != "int4_sym":
        raise NotImplementedError(f"int4_mgpu: format {fmt!r} not supported (int4_sym only)")
    *lead, K2, N = packed.shape
    K, G = 2 * K2, group_size
    if N % bn or K % G:
        raise ValueError(f"int4_mgpu: weight (K={K}, N={N}) not divisible by bn={bn} / group_size={G}")
    w = to_nk(packed, G).reshape(*lead, N // bn, bn, K // G, G)
    w = jnp.swapaxes(w, -3, -2).reshape(*lead, (N // bn) * (K // G) * bn, G)
    s = scales.reshape(*lead, K // G, N // bn, bn)
    s = jnp.swapaxes(s, -3, -2).reshape(*lead, (N // bn) * (K // G), bn)
    return w, s


def from_kernel_layout(w_t, s_t, group_size: int, K: int, fmt: str = "int4_sym"):
    """Inverse of `to_kernel_layout`: -> (packed uint8 [..., K/2, N], scales [..., K/G, N])."""
    if fmt != "int4_sym":
        raise NotImplementedError(f"int4_mgpu: format {fmt!r} not supported (int4_sym only)")
    *lead, rows, G = w_t.shape
    bn = s_t.shape[-1]
    if G != group_size:
        raise ValueError(f"int4_mgpu: w_t minor dim {G} != group_size {group_size}")
    groups = K // G
    N = rows // groups
    w = w_t.reshape(*lead, N // bn, groups, bn, G)
    w_nk = jnp.swapaxes(w, -3, -2).reshape(*lead, N, K)
    s = s_t.reshape(*lead, N // bn, groups, bn)
    s = jnp.swapaxes(s, -3, -2).reshape(*lead, groups, N)
    return from_nk(w_nk, G), s


def dequantize_kernel_layout(w_t, s_t, group_size: int, K: int, dtype=F32):
    """W[..., K, N] from the tiled kernel layout, in f32 (same values as mimo_jax.quant.dequantize)."""
    packed, scales = from_kernel_layout(w_t, s_t, group_size, K)
    q = _unpack(packed, group_size).astype(F32) - 8.0
    return (q * jnp.repeat(scales.astype(F32), group_size, axis=-2)).astype(dtype)


def reference(x, w_t, s_t, group_size: int, out_dtype=None):
    """The jnp reference of `int4_matmul_mgpu`: x @ dequantize, in f32, rounded once to the output dtype."""
    out_dtype = out_dtype or x.dtype
    w = dequantize_kernel_layout(w_t, s_t, group_size, x.shape[-1], F32)
    return jnp.dot(x.astype(F32), w, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    wg_rows: int = 64            # weight rows (output channels) per compute warpgroup: 64 or 128
    num_compute_wgs: int = 2     # compute warpgroups per CTA; BN = wg_rows * num_compute_wgs
    split_k: int = 1             # CTAs along K (f32 partials summed by XLA when > 1)
    stages: int = 12             # pipeline depth (groups in flight per CTA); capped by shared memory
    scale_mode: str = "acc"      # "acc": f32 scale on the group's partial; "w": bf16 scale on the weights
    out_mode: str = "auto"       # "auto": direct [M, N] store when split_k == 1, else partials; "partial"
    layout: str = "tiled"        # weight layout: "tiled" (to_kernel_layout) or "nk" (to_nk + plain scales)

    @property
    def bn(self) -> int:
        return self.wg_rows * self.num_compute_wgs


def default_config(M: int, K: int, N: int, group_size: int, n_sms: int = N_SMS_DEFAULT,
                   num_compute_wgs: int = 2, wg_rows: int = 64, layout: str = "tiled") -> MgpuConfig:
    """BN = wg_rows * num_compute_wgs rows per CTA, split-K until the grid is about one CTA per SM."""
    cfg = MgpuConfig(num_compute_wgs=num_compute_wgs, wg_rows=wg_rows, layout=layout)
    n_tiles = N // cfg.bn
    groups = K // group_size
    split = 1
    while n_tiles * split * 2 <= n_sms and groups % (split * 2) == 0 and groups // (split * 2) >= 2:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


def check(M: int, K: int, N: int, group_size: int, cfg: MgpuConfig) -> None:
    if group_size not in (64, 128, 256):
        raise ValueError(f"int4_mgpu: group_size must be 64, 128 or 256, got {group_size}")
    if K % group_size:
        raise ValueError(f"int4_mgpu: K={K} not a multiple of group_size={group_size}")
    if cfg.wg_rows not in (64, 128) or cfg.bn > 256:
        raise ValueError(f"int4_mgpu: wg_rows must be 64 or 128 and BN <= 256, got {cfg}")
    if cfg.num_compute_wgs not in (1, 2):
        # 4 compute warpgroups (BN = 256) hung on the H200 with jax 0.11.2 (2026-11-22); not debugged yet
        raise ValueError(f"int4_mgpu: num_compute_wgs must be 1 or 2, got {cfg.num_compute_wgs}")
    if N % cfg.bn:
        raise ValueError(f"int4_mgpu: N={N} not a multiple of BN={cfg.bn}")
    if (K // group_size) % cfg.split_k:
        raise ValueError(f"int4_mgpu: {K // group_size} groups not divisible by split_k={cfg.split_k}")
    if not 1 <= M <= 256:
        raise ValueError(f"int4_mgpu: M must be 1..256, got {M}")


def _pad8(M: int) -> int:
    return max(8, -(-M // 8) * 8)


# --------------------------------------------------------------------------- kernel

def _build(M: int, K: int, N: int, gs: int, cfg: MgpuConfig, out_dtype):
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    Mp = _pad8(M)
    R, W, BN, S = cfg.wg_rows, cfg.num_compute_wgs, cfg.bn, cfg.split_k
    n_tiles = N // BN
    groups = K // gs
    gps = groups // S                        # groups (pipeline steps) per CTA
    stage_bytes = BN * gs // 2 + Mp * gs * 2 + BN * 2
    stages = max(1, min(cfg.stages, gps, (200 << 10) // stage_bytes))   # leave room in 227 KiB of SMEM
    direct = cfg.out_mode == "auto" and S == 1 and R == 64   # transposed bf16 store: one 128-byte swizzle row

    def tiled(shape_minor_elems, bits):
        sw = plgpu.find_swizzle(shape_minor_elems * bits)
        return (plgpu.TilingTransform((8, 8 * sw // bits)), plgpu.SwizzleTransform(sw))

    tiled_w = cfg.layout == "tiled"
    w_spec = plgpu.BlockSpec((BN, gs), (lambda k: (k, 0)) if tiled_w else (lambda k: (0, k)),
                             transforms=tiled(gs, 4))
    x_spec = plgpu.BlockSpec((Mp, gs), lambda k: (0, k), transforms=tiled(gs, 16))
    s_spec = plgpu.BlockSpec((1, BN), lambda k: (k, 0))

    import inspect
    _idx_required = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty

    def load(ref, layout):  # jax 0.10 wants an index argument, 0.11 deprecates it
        return plgpu.load(ref, (), layout=layout) if _idx_required else plgpu.load(ref, layout=layout)

    UP4 = plgpu.Layout.WGMMA_UPCAST_4X
    WGMMA = plgpu.Layout.WGMMA
    ROW = plgpu.Layout.WGMMA.reduce(1)

    def kernel(x_gmem, w_gmem, s_gmem, out_gmem, o_smem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")
        n0 = ni * BN
        k0 = si * (gps * gs)
        g0 = si * gps
        wg = lax.axis_index("wg")
        rows = pl.ds(wg * R, R)

        def body(_, w_smem, x_smem, s_smem, carry):
            w = load(w_smem.at[rows], UP4)
            w = plgpu.layout_cast(w, WGMMA).astype(BF16)
            s = load(s_smem.at[0, rows], ROW).astype(F32)
            xt = plgpu.transpose_ref(x_smem, (1, 0))
            if cfg.scale_mode == "w":
                w = w * lax.broadcast_in_dim(s.astype(BF16), (R, gs), (0,))
                plgpu.wgmma(carry, w, xt)
                plgpu.wgmma_wait(0)
                return carry

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, w, xt)
                return acc_ref[...]

            part = pl.run_scoped(mm, plgpu.ACC((R, Mp), F32))
            return carry + part * lax.broadcast_in_dim(s, (R, Mp), (0,))

        def epilogue(acc):
            if direct:
                o = o_smem.at[wg]                                  # [Mp, R] bf16, swizzled
                plgpu.transpose_ref(o, (1, 0))[...] = plgpu.layout_cast(
                    acc.astype(out_dtype), plgpu.Layout.WGMMA_TRANSPOSED)
                plgpu.commit_smem()
                off, size = 0, 1 << (M.bit_length() - 1)
                while size:
                    if M & size:
                        plgpu.copy_smem_to_gmem(o.at[pl.ds(off, size)],
                                                out_gmem.at[pl.ds(off, size), pl.ds(n0 + wg * R, R)],
                                                commit_group=False)
                        off += size
                    size //= 2
                plgpu.commit_smem_to_gmem_group()
            else:
                o_smem[wg] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[si, pl.ds(n0 + wg * R, R)])
            plgpu.wait_smem_to_gmem(0)

        def compute_context(eval_pipeline):
            if cfg.scale_mode == "w":
                def scoped(acc_ref):
                    eval_pipeline(acc_ref)
                    return acc_ref[...]
                acc = pl.run_scoped(scoped, plgpu.ACC((R, Mp), F32))
            else:
                acc = eval_pipeline(jnp.zeros((R, Mp), F32))
            epilogue(acc)

        pipeline = plgpu.emit_pipeline_warp_specialized(
            body, grid=(gps,), memory_registers=40, in_specs=[w_spec, x_spec, s_spec],
            wg_axis="wg", num_compute_wgs=W, max_concurrent_steps=stages,
            compute_context=compute_context)
        if tiled_w:   # this CTA's (N tile, K range) is one contiguous run of gps [BN, G] boxes
            w_src = w_gmem.at[pl.ds((ni * groups + g0) * BN, gps * BN)]
            s_src = s_gmem.at[pl.ds(ni * groups + g0, gps)]
        else:
            w_src = w_gmem.at[pl.ds(n0, BN), pl.ds(k0, gps * gs)]
            s_src = s_gmem.at[pl.ds(g0, gps), pl.ds(n0, BN)]
        pipeline(w_src, x_gmem.at[:, pl.ds(k0, gps * gs)], s_src)

    if direct:
        out_type = jax.ShapeDtypeStruct((M, N), out_dtype)
        o_smem = plgpu.SMEM((W, Mp, R), out_dtype,
                            transforms=(plgpu.SwizzleTransform(plgpu.find_swizzle(R * 16)),))
    else:
        out_type = jax.ShapeDtypeStruct((S, N, Mp), F32)
        o_smem = plgpu.SMEM((W, R, Mp), F32, transforms=tiled(Mp, 32))
    f = plgpu.kernel(
        kernel, out_type=out_type, grid=(n_tiles, S), grid_names=("n", "s"),
        num_threads=W + 1, thread_name="wg",
        scratch_types=dict(o_smem=o_smem),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             approx_math=True),
    )
    return f, direct, Mp


def int4_matmul_mgpu(x, w, scales, *, group_size: int, cfg: MgpuConfig | None = None, out_dtype=None):
    """x[M, K] @ W4 -> [M, N] in x's dtype (bf16 tensor-core math, f32 accumulation). Hopper GPU only.

    cfg.layout == "tiled" (default): (w, scales) = to_kernel_layout(packed, scales, group_size, bn=cfg.bn).
    cfg.layout == "nk": w = to_nk(packed) [N, K], scales as in mimo_jax.quant [K/G, N].
    See `reference` for the math."""
    M, K = x.shape
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    G = group_size
    if cfg is not None and cfg.layout == "nk":
        N = w.shape[0]
        ok = w.shape == (N, K) and scales.shape == (K // G, N)
    else:
        N = w.shape[0] * G // K
        bn = scales.shape[-1]
        ok = w.shape == (N // bn * (K // G) * bn, G) and scales.shape == (N // bn * (K // G), bn)
        if cfg is None:
            cfg = default_config(M, K, N, G)
            cfg = dataclasses.replace(cfg, wg_rows=bn // cfg.num_compute_wgs)
        ok = ok and bn == cfg.bn
    if not ok:
        raise ValueError(f"int4_mgpu: x {x.shape}, w {w.shape}, scales {scales.shape} do not match "
                         f"(group_size={G}, cfg={cfg})")
    check(M, K, N, G, cfg)
    f, direct, Mp = _build(M, K, N, G, cfg, out_dtype)
    xp = x.astype(BF16)
    if Mp != M:
        xp = jnp.pad(xp, ((0, Mp - M), (0, 0)))
    out = f(xp, w, scales)
    if direct:
        return out
    return out.sum(axis=0)[:, :M].T.astype(out_dtype)


def qmatmul_mgpu(x, qw, cfg: MgpuConfig | None = None):
    """Convenience for tests: x @ a mimo_jax.quant.QuantizedWeight (converts the layout on every call;
    a model should store `to_kernel_layout`'s output instead)."""
    if qw.fmt != "int4_sym" or qw.ndim != 2:
        raise NotImplementedError(f"int4_mgpu: 2-D int4_sym weights only, got {qw.fmt} {qw.shape}")
    cfg = cfg or default_config(x.shape[0], *qw.kn, qw.group_size)
    packed = qw.packed if qw.layout == "kn" else jnp.swapaxes(qw.packed, -1, -2)  # this module's inputs are "kn"
    if cfg.layout == "nk":
        w, s = to_nk(packed, qw.group_size), qw.scales
    else:
        w, s = to_kernel_layout(packed, qw.scales, qw.group_size, bn=cfg.bn)
    return int4_matmul_mgpu(x, w, s, group_size=qw.group_size, cfg=cfg)
