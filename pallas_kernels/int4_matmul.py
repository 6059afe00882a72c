"""W4A16 dequant-matmul Pallas kernels (Triton lowering): dense x[M,K] @ W4[K,N] and grouped by expert.

Weight layout: see mimo_jax/quant.py (packed uint8 [.., K/2, N]; per group of G rows along K, byte j holds
row j in the low nibble and row j + G/2 in the high nibble; scales/mins [.., K/G, N]). With layout "nk" the packed
bytes are stored [.., N, K/2] and each program reads its [bn, G/2] tile and transposes it in registers.

Per group the kernel loads the G/2 x N-tile bytes once, turns each nibble into a bf16 in registers, and
does two small dots (x[:, low half] @ lo, x[:, high half] @ hi) into one f32 partial; the group's scale
(and min) are applied to that partial, not per element:
    x . w = s * (x . q) + m * sum(x)          (int4_asym; int4_sym has m = -8 s)
With the "magic" nibble -> bf16 conversion the kernel dots with bf16(128 + q), built by OR-ing the code
into the bit pattern of 128.0 (0x4300) -- no int->float conversion instruction -- and folds the 128 into
the min term: x . w = s * dot + sum(x) * (m - 128 s). mxfp4 codes become bf16 by placing the e2m1
exponent/mantissa bits into a bf16 pattern: on the GPU ("asm") as a bf16 subnormal-range pattern scaled by one
bf16x2 multiply (`_e2m1_asm`), in jnp with a select for the two subnormal codes; the e8m0 scale is a power of
two applied to the partial (those decodes: pallas_kernels/nibble_decode.py). With cfg.fold > 1 an mxfp4 dot covers
several groups, their scales applied to the bf16 weights (pallas_kernels/mxfp4_fold.py).

Decode is weight streaming: every program reads a disjoint [K range, N tile] of the weight once. For small
M the grid is (M tiles, N tiles, K splits) so that enough programs exist to keep HBM busy (split-K partials
are summed by XLA). The grouped kernel walks a tile schedule (expert, first row, end row) built from
group_sizes; experts with no rows get no tiles and are never read.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mxfp4_fold import folded_partial, folded_x, folded_x_halves
from pallas_kernels.nibble_decode import _codes_to_bf16, _e2m1_asm, _nibbles_asm

F32, BF16, U16 = jnp.float32, jnp.bfloat16, jnp.uint16


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    bm: int = 16            # rows of x per program (>= 16: tensor-core dot minimum; 1: the M = 1 GEMV path)
    bn: int = 128           # output columns per program
    split_k: int = 1        # programs along K (partials summed outside)
    unroll: int = 1         # groups per loop iteration
    num_warps: int = 4
    num_stages: int = 3
    method: str = "asm"     # nibble -> bf16: "asm" (inline PTX, GPU only; interpret mode uses "magic_sub";
                            # mxfp4: `_e2m1_asm`, except on the M = 1 GEMV path), "magic" / "magic_sub" (bit
                            # trick in jnp) or "convert" (int -> float); mxfp4 decodes in jnp for all but "asm"
    fold: int = 1           # mxfp4: groups per dot, their power-of-two scales applied to the bf16 weights
                            # (`folded_partial`; x permuted by `fold_x`); not on the M = 1 GEMV path
    scale_in_decode: bool = False  # fold > 1: the scales multiply inside the e2m1 decode (`folded_partial`)
    layout: str = "kn"      # the weight's stored layout (set from the weight by the entry points, not a choice)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def default_config(M: int, K: int, N: int, group_size: int, n_sms: int = 132) -> KernelConfig:
    """Enough programs (>= ~2 per SM) to stream the weight at M = 1: N tiles x K splits."""
    bm = 16 if M <= 16 else min(64, 1 << (M - 1).bit_length())
    bn = _largest_pow2_divisor(N, 256 if N >= 8192 else 128)
    groups = K // group_size
    unroll = 1
    programs = -(-M // bm) * (N // bn)
    split = 1
    while programs * split < 2 * n_sms and groups % (split * 2) == 0 and split < 16:
        split *= 2
    return KernelConfig(bm=bm, bn=bn, split_k=split, unroll=unroll)


def _for_backend(cfg: KernelConfig, interpret: bool) -> KernelConfig:
    return dataclasses.replace(cfg, method="magic_sub") if interpret and cfg.method == "asm" else cfg


def fit_fold(fold: int, groups: int) -> int:
    """The largest power of two <= fold that divides groups (a K range's groups)."""
    while fold > 1 and groups % fold:
        fold //= 2
    return max(fold, 1)


def check_fold(fold: int, fmt: str, groups: int, what: str, scale_in_decode: bool = False) -> None:
    """fold > 1 (groups per dot) needs mxfp4's power-of-two scales and must divide the groups of a K range;
    scale_in_decode needs fold > 1."""
    if scale_in_decode and fold == 1:
        raise ValueError(f"{what}: scale_in_decode needs fold > 1 (mxfp4, several groups per dot)")
    if fold == 1:
        return
    if fmt != "mxfp4" or not _pow2(fold):
        raise ValueError(f"{what}: fold={fold} needs mxfp4 (power-of-two scales) and a power of two")
    if groups % fold:
        raise ValueError(f"{what}: {groups} groups per split not divisible by fold={fold}")


def check_shapes(K: int, N: int, group_size: int, cfg: KernelConfig, what: str = "weight") -> None:
    if N % 16:
        raise ValueError(f"{what} shape (K={K}, N={N}): the Pallas kernel needs N a multiple of 16")
    if not _pow2(group_size) or group_size < 32:
        raise ValueError(f"{what} shape (K={K}, N={N}): the Pallas kernel needs a power-of-two group "
                         f"size >= 32, got {group_size}")
    if K % group_size:
        raise ValueError(f"{what} shape (K={K}, N={N}): K must be a multiple of the group size {group_size}")
    if N % cfg.bn or not _pow2(cfg.bn) or not _pow2(cfg.bm) or cfg.bm < 16:
        raise ValueError(f"{what} shape (K={K}, N={N}): block (bm={cfg.bm}, bn={cfg.bn}) must be powers "
                         f"of two, bm >= 16, bn dividing N")
    groups = K // group_size
    if groups % (cfg.split_k * cfg.unroll):
        raise ValueError(f"{what} shape (K={K}, N={N}): {groups} groups of {group_size} not divisible by "
                         f"split_k*unroll = {cfg.split_k}*{cfg.unroll}")


# --------------------------------------------------------------------------- in-register dequant

def _group_partial(x_lo, x_hi, p, s, m, fmt: str, method: str):
    """One group: x_lo/x_hi [bm, G/2] bf16, p [G/2, bn] uint8, s/m [1, bn] -> f32 [bm, bn] contribution."""
    if method == "asm" and fmt == "mxfp4":
        lo, hi = _e2m1_asm(p)
    elif method == "asm":
        lo, hi = _nibbles_asm(p, fmt)
        method = "magic_sub"  # same values as magic_sub from here on
    else:
        p16 = p.astype(U16)
        lo = _codes_to_bf16(p16 & 15, fmt, method)
        hi = _codes_to_bf16(p16 >> 4, fmt, method)
    d = jnp.dot(x_lo, lo, preferred_element_type=F32) + jnp.dot(x_hi, hi, preferred_element_type=F32)
    if fmt == "mxfp4":
        scale = jax.lax.bitcast_convert_type(s.astype(U16) << 7, BF16).astype(F32)  # 2^(e - 127)
        return d * scale
    sf = s.astype(F32)
    if fmt == "int4_sym" and method == "magic_sub":
        return d * sf  # the dot already used q - 8
    # x . w = s * (x . code) + sum(x) * c, code = q + bias
    bias = 128.0 if method == "magic" else 0.0
    c = -(8.0 + bias) * sf if fmt == "int4_sym" else m.astype(F32) - bias * sf
    xs = jnp.sum(x_lo.astype(F32), axis=1, keepdims=True) + jnp.sum(x_hi.astype(F32), axis=1, keepdims=True)
    return d * sf + xs * c


def _k_loop(x_ref, rows_at, rmask, w_at, n0, g_first, n_iter, cfg, fmt, gs, bm, accs_init):
    """The K loop over groups (cfg.fold > 1: over chunks of fold groups; x permuted by fold_x); w_at lists
    (packed, scales, mins or None, leading index) per weight."""
    half = gs // 2

    def w_tile(p_ref, lead, kb, rows):  # packed rows [kb, kb + rows) of the N tile as [rows, bn], either layout
        if cfg.layout == "nk":
            return p_ref[(*lead, pl.ds(n0, cfg.bn), pl.ds(kb, rows))].T
        return p_ref[(*lead, pl.ds(kb, rows), pl.ds(n0, cfg.bn))]
    if cfg.fold > 1:
        F = cfg.fold

        def body_fold(i, accs):
            accs = list(accs)
            for u in range(cfg.unroll):
                g = g_first + (i * cfg.unroll + u) * F
                kb = pl.multiple_of(g * half, half * F)  # the chunk's packed row = its column in either half of x
                x_lo, x_hi = folded_x_halves(x_ref, pl.ds(rows_at, bm), rmask[:, None], kb, F * half)
                for j, (p_ref, s_ref, _, lead) in enumerate(w_at):
                    p = w_tile(p_ref, lead, kb, F * half)
                    s = s_ref[(*lead, pl.ds(g, F), pl.ds(n0, cfg.bn))]
                    accs[j] = accs[j] + folded_partial(x_lo, x_hi, p, s, cfg.method == "asm",
                                                       scale_in_decode=cfg.scale_in_decode)
            return tuple(accs)

        return jax.lax.fori_loop(0, n_iter // F, body_fold, accs_init)

    def body(i, accs):
        accs = list(accs)
        for u in range(cfg.unroll):
            g = g_first + i * cfg.unroll + u
            k0 = pl.multiple_of(g * gs, gs)
            x_lo = plgpu.load(x_ref.at[pl.ds(rows_at, bm), pl.ds(k0, half)], mask=rmask[:, None], other=0.0)
            x_hi = plgpu.load(x_ref.at[pl.ds(rows_at, bm), pl.ds(k0 + half, half)], mask=rmask[:, None],
                              other=0.0)
            for j, (p_ref, s_ref, m_ref, lead) in enumerate(w_at):
                p = w_tile(p_ref, lead, pl.multiple_of(g * half, half), half)
                s = s_ref[(*lead, pl.ds(g, 1), pl.ds(n0, cfg.bn))]
                m = None if m_ref is None else m_ref[(*lead, pl.ds(g, 1), pl.ds(n0, cfg.bn))]
                accs[j] = accs[j] + _group_partial(x_lo, x_hi, p, s, m, fmt, cfg.method)
        return tuple(accs)

    return jax.lax.fori_loop(0, n_iter, body, accs_init)


# --------------------------------------------------------------------------- dense

def _dense_kernel(x_ref, p_ref, s_ref, *rest, fmt, gs, M, cfg, groups_per_split):
    m_ref = rest[0] if fmt == "int4_asym" else None
    o_ref = rest[-1]
    mi, ni, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r0 = mi * cfg.bm
    rows = r0 + jnp.arange(cfg.bm)
    rmask = rows < M
    n0 = pl.multiple_of(ni * cfg.bn, cfg.bn)
    init = (jnp.zeros((cfg.bm, cfg.bn), F32),)
    (acc,) = _k_loop(x_ref, r0, rmask, [(p_ref, s_ref, m_ref, ())], n0, ki * groups_per_split,
                     groups_per_split // cfg.unroll, cfg, fmt, gs, cfg.bm, init)
    lead = (ki,) if cfg.split_k > 1 else ()
    plgpu.store(o_ref.at[(*lead, pl.ds(r0, cfg.bm), pl.ds(n0, cfg.bn))], acc.astype(o_ref.dtype),
                mask=rmask[:, None])


def _gemv_kernel(x_ref, p_ref, s_ref, *rest, fmt, gs, cfg, groups_per_split):
    """M = 1 without tensor cores: FMAs into a [G/2, bn] f32 accumulator in the weight tile's own layout
    (no shared-memory round trip to a dot-operand layout), one reduction over K rows at the end."""
    m_ref = rest[0] if fmt == "int4_asym" else None
    o_ref = rest[-1]
    ni, ki = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(ni * cfg.bn, cfg.bn)
    half = gs // 2
    method = cfg.method if cfg.method in ("asm", "magic_sub") else "magic_sub"

    def body(i, carry):
        acc, acc_min = carry
        g = ki * groups_per_split + i
        k0 = pl.multiple_of(g * gs, gs)
        x_lo = x_ref[pl.ds(k0, half), :].astype(F32)          # [G/2, 1]
        x_hi = x_ref[pl.ds(k0 + half, half), :].astype(F32)
        p = p_ref[pl.ds(pl.multiple_of(g * half, half), half), pl.ds(n0, cfg.bn)]
        if method == "asm" and fmt != "mxfp4":
            lo, hi = _nibbles_asm(p, fmt)
        else:
            p16 = p.astype(U16)
            lo = _codes_to_bf16(p16 & 15, fmt, "magic_sub")
            hi = _codes_to_bf16(p16 >> 4, fmt, "magic_sub")
        part = lo.astype(F32) * x_lo + hi.astype(F32) * x_hi  # [G/2, bn]
        s = s_ref[pl.ds(g, 1), pl.ds(n0, cfg.bn)]
        if fmt == "mxfp4":
            scale = jax.lax.bitcast_convert_type(s.astype(U16) << 7, BF16).astype(F32)
        else:
            scale = s.astype(F32)
        acc = acc + part * scale
        if fmt == "int4_asym":  # w = q s + m: the m term is m * sum(x) over the group
            xs = jnp.sum(x_lo, axis=0, keepdims=True) + jnp.sum(x_hi, axis=0, keepdims=True)  # [1, 1]
            acc_min = acc_min + m_ref[pl.ds(g, 1), pl.ds(n0, cfg.bn)].astype(F32) * xs
        return acc, acc_min

    init = (jnp.zeros((half, cfg.bn), F32), jnp.zeros((1, cfg.bn), F32))
    acc, acc_min = jax.lax.fori_loop(0, groups_per_split, body, init)
    out = jnp.sum(acc, axis=0, keepdims=True) + acc_min
    lead = (ki,) if cfg.split_k > 1 else ()
    o_ref[(*lead, pl.ds(0, 1), pl.ds(n0, cfg.bn))] = out.astype(o_ref.dtype)


def packed_kn(packed, layout: str) -> tuple[int, int]:
    """(K, N) of a packed weight [.., K/2, N] ("kn") or [.., N, K/2] ("nk")."""
    if layout not in ("kn", "nk"):
        raise ValueError(f"unknown 4-bit weight layout {layout!r}")
    k2, n = packed.shape[-2:] if layout == "kn" else packed.shape[-2:][::-1]
    return 2 * k2, n


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "cfg", "interpret", "layout"))
def int4_matmul(x, packed, scales, mins, *, fmt: str, group_size: int, cfg: KernelConfig | None = None,
                interpret: bool = False, layout: str = "kn"):
    """x[M, K] (bf16) @ W4[K, N] -> [M, N] in x's dtype. packed/scales/mins as in mimo_jax.quant, packed stored in
    `layout`."""
    M, K = x.shape
    Kw, N = packed_kn(packed, layout)
    if packed.ndim != 2 or Kw != K:
        raise ValueError(f"int4_matmul: x {x.shape} does not match packed weight {packed.shape} (K={K}, "
                         f"layout {layout})")
    cfg = _for_backend(dataclasses.replace(cfg or default_config(M, K, N, group_size), layout=layout), interpret)
    gemv = cfg.bm == 1
    if gemv and M != 1:
        raise ValueError(f"int4_matmul: bm=1 (the GEMV path) needs M = 1, got x {x.shape}")
    if gemv and layout != "kn":
        raise ValueError("int4_matmul: bm=1 (the GEMV path) reads the kn layout only")
    check_shapes(K, N, group_size, dataclasses.replace(cfg, bm=16) if gemv else cfg)
    groups_per_split = K // group_size // cfg.split_k
    check_fold(cfg.fold, fmt, groups_per_split // cfg.unroll, "int4_matmul", cfg.scale_in_decode)
    if gemv and cfg.fold > 1:
        raise ValueError("int4_matmul: fold > 1 is not on the M = 1 GEMV path (bm=1)")
    out_dtype = F32 if cfg.split_k > 1 else x.dtype
    out_shape = (cfg.split_k, M, N) if cfg.split_k > 1 else (M, N)
    if gemv:
        grid = (N // cfg.bn, cfg.split_k)
        args = (x.astype(BF16).reshape(K, 1), packed, scales) + ((mins,) if fmt == "int4_asym" else ())
        kernel = functools.partial(_gemv_kernel, fmt=fmt, gs=group_size, cfg=cfg,
                                   groups_per_split=groups_per_split)
    else:
        grid = (pl.cdiv(M, cfg.bm), N // cfg.bn, cfg.split_k)
        args = (folded_x(x, group_size, cfg), packed, scales) + ((mins,) if fmt == "int4_asym" else ())
        kernel = functools.partial(_dense_kernel, fmt=fmt, gs=group_size, M=M, cfg=cfg,
                                   groups_per_split=groups_per_split)
    out = pl.pallas_call(
        kernel, grid=grid, out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name=f"int4_matmul_{fmt}",
    )(*args)
    if cfg.split_k > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out


# --------------------------------------------------------------------------- grouped by expert

def tile_schedule(group_sizes, M: int, bm: int):
    """int32 [3, T]: (expert, first row, end row) of each row tile of x sorted by expert.

    Tiles never straddle experts; experts with no rows get none. Rows past sum(group_sizes) belong to a
    pseudo expert E whose tiles write zeros (jax.lax.ragged_dot semantics). Unused tiles are empty.
    """
    E = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), M)
    ends = jnp.concatenate([ends, jnp.array([M], jnp.int32)])
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    counts = ends - starts
    ntiles = (counts + bm - 1) // bm
    tile_end = jnp.cumsum(ntiles)
    T = min(E, M) + 1 + -(-M // bm)
    t = jnp.arange(T, dtype=jnp.int32)
    # tile t belongs to the first expert whose tile_end exceeds t (a compare-all; jnp.searchsorted's
    # default lowers to a while loop, which costs a host round trip per step on GPU)
    e = jnp.sum(tile_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)
    valid = e <= E
    e = jnp.minimum(e, E)
    r0 = starts[e] + (t - (tile_end[e] - ntiles[e])) * bm
    r1 = jnp.minimum(r0 + bm, ends[e])
    return jnp.stack([e, jnp.where(valid, r0, 0), jnp.where(valid, r1, 0)])


def _grouped_kernel(tiles_ref, x_ref, *refs, fmt, gs, E, cfg, n_weights, epilogue):
    per = 3 if fmt == "int4_asym" else 2
    wrefs = refs[:per * n_weights]
    rest = refs[per * n_weights:]
    rs_ref = rest[0] if epilogue == "silu_mul_scaled" else None
    o_ref = rest[-1]
    ni, t = pl.program_id(0), pl.program_id(1)
    e, r0, r1 = tiles_ref[0, t], tiles_ref[1, t], tiles_ref[2, t]
    rows = r0 + jnp.arange(cfg.bm)
    rmask = rows < r1
    n0 = pl.multiple_of(ni * cfg.bn, cfg.bn)
    n_groups = x_ref.shape[1] // gs
    split = cfg.split_k > 1
    if split:  # partials [split, M, n_weights * N] f32 of this program's K range, one per weight; no epilogue
        s = pl.program_id(2)
        per_split = n_groups // cfg.split_k
        g_first = s * per_split
        outs = [o_ref.at[s, pl.ds(r0, cfg.bm), pl.ds(j * (o_ref.shape[2] // n_weights) + n0, cfg.bn)]
                for j in range(n_weights)]
    else:
        per_split, g_first = n_groups, 0
        outs = [o_ref.at[pl.ds(r0, cfg.bm), pl.ds(n0, cfg.bn)]]

    @pl.when((r1 > r0) & (e == E))
    def _zero_rows():
        for out_at in outs:
            plgpu.store(out_at, jnp.zeros((cfg.bm, cfg.bn), o_ref.dtype), mask=rmask[:, None])

    @pl.when((r1 > r0) & (e < E))
    def _compute():
        w_at = [(wrefs[per * j], wrefs[per * j + 1], wrefs[per * j + 2] if per == 3 else None, (e,))
                for j in range(n_weights)]
        init = tuple(jnp.zeros((cfg.bm, cfg.bn), F32) for _ in range(n_weights))
        accs = _k_loop(x_ref, r0, rmask, w_at, n0, g_first, per_split // cfg.unroll, cfg, fmt, gs, cfg.bm, init)
        if split:
            for out_at, acc in zip(outs, accs):
                plgpu.store(out_at, acc, mask=rmask[:, None])
            return
        if epilogue == "none":
            out = accs[0]
        else:
            g, u = accs
            out = g * jax.nn.sigmoid(g) * u
            if rs_ref is not None:
                out = out * plgpu.load(rs_ref.at[pl.ds(r0, cfg.bm)], mask=rmask, other=0.0)[:, None]
        plgpu.store(outs[0], out.astype(o_ref.dtype), mask=rmask[:, None])


def default_grouped_config(M: int, K: int, N: int, group_size: int, E: int | None = None,
                           n_sms: int = 132, busy_rows: int | None = None) -> KernelConfig:
    """One row tile per expert with rows: with few (decode: 1 token x top-8 = 8 tiles x N/128), a whole-K
    program per (tile, N tile) leaves ~1 program per SM, so K is split until there are ~2 per SM (the
    partials are summed, and the SiLU epilogue applied, by one small XLA fusion). Measured on an H200
    (BENCHMARKS.md, int4_sym g128, 1 token x top-8 of 256): K=4096 N=2048 29.0 -> 22.9 us, fused gate/up
    55.8 -> 52.3 us; at 9 tokens (no split) unroll 1 instead of 2: 158 -> 134 us, gate/up 354 -> 273 us."""
    groups = K // group_size
    bn = _largest_pow2_divisor(N, 128)
    busy_tiles = min(E if E is not None else M, M, busy_rows or M)  # busy_rows: rows expected to do work
    split = 1
    while (N // bn) * busy_tiles * split < 2 * n_sms and groups % (split * 2) == 0 and split < 8:
        split *= 2
    return KernelConfig(bm=16, bn=bn, split_k=split, unroll=1)  # unroll 2 measured 5-25% slower (H200)


def row_tiles(row_experts):
    """int32 [3, M]: one tile per row, (expert, row, row + 1), rows in any order (no sort, no group sizes).
    For rows whose experts are known to be distinct (one token's top-k): every expert is still read once."""
    M = row_experts.shape[0]
    r = jnp.arange(M, dtype=jnp.int32)
    return jnp.stack([row_experts.astype(jnp.int32), r, r + 1])


# Decode pairs (row_experts, no explicit config) that run pallas_kernels.int4_m1 instead of this module's grouped
# kernel: format -> the weights per call routed there (1: a down projection, 2: fused gate/up). Measured on an
# H200, 8 pairs of 64 experts, mid_mimo decode (BENCHMARKS.md): int4 gate/up 49.8 -> 40.4 us, down 21.3 -> 21.0
# us; mxfp4 with 4 groups per dot (session 10, `bench_int4_m1.py --mxfp4_only`): gate/up 54.6 us on the grouped
# kernel (one group per dot) -> 44.2 on int4_m1, down 29.5 -> 24.7.
M1_ROUTES = {"int4_sym": (1, 2), "int4_asym": (1, 2), "mxfp4": (1, 2)}
# MXFP4 groups per dot (cfg.fold: the e8m0 scales applied to the bf16 weights, one dot pair per F x 32 K rows;
# 1 = a dot and an f32 rescale per 32-wide group). Measured (session 10, stored kn layout): int4_m1 fold 1/2/4/8
# gate/up 73.7 / 65.8 / 44.2 / 53.2 us, down 29.4 / 27.6 / 24.7 / 28.0; grouped kernel fold 1/2/4 gate/up
# 54.7 / 68.1 / 48.6, down 34.9 / 27.8 / 26.1.
M1_FOLD = {"mxfp4": 4}
GROUPED_FOLD = {"mxfp4": 4}  # the same on the grouped kernel's default config (verify, prefill)
# Folded MXFP4 (fold > 1) with the scales inside the e2m1 decode (cfg.scale_in_decode): the decode's fma
# multiplies by 2^(e - 1 - X) instead of 2^126, and x comes times 2^X (X = mxfp4_fold.X_SCALE_EXP), so the separate
# scale multiply (one bf16x2 per two weights) goes. Offline SASS of the routed decode pair (`triton_sass.py --what
# formats`, mid_mimo shapes, loop instructions per K step): gate/up 1577 -> 1411, down 770 -> 755 (its factor
# registers cost ~60 more IMADs), i.e. 6.11 -> 5.64 instructions per weight (int4: 4.26); not yet timed.
# Exact for the scales and x that mxfp4_fold.X_SCALE_EXP names. Off until a GPU measures it
# (`benchmarks/knobs.py pallas_kernels.int4_matmul.FOLD_SCALE_IN_DECODE=1 -- ...`).
FOLD_SCALE_IN_DECODE = False


def routes_to_m1(fmt: str, n_weights: int) -> bool:
    return n_weights in M1_ROUTES.get(fmt, ())


# Experts stored "nk" (mimo_jax.quant): the int4_m1 form per (format kind, weights per call). First chosen on an
# H200 by `bench_int4_m1.py` (8 pairs of 64 experts, mid_mimo shapes, split by default_m1_config): int4 gate/up xw
# bn64 w4 35.7 us (kn routed 39.3), down wx bn64 w2 16.9 (18.9); mxfp4 fold 4 gate/up xw bn128 w4 41.06 (44.51),
# down wx bn64 w2 20.13 (24.80). The step disagreed for int4 gate/up (session 19, one H100, mid_mimo int4 plain
# decode, profile_step): bn64 (split 1) 50.1 us per call vs bn128 (split 2) 41.8 (kn: 40.3); the step 1.880 ->
# 1.832 ms, the speculative k = 8 step 2.778 -> 2.758. So int4 gate/up is bn128 too. The int4 down form in the
# step (same machine, plain decode, wall): wx bn64 w2 1.835 ms, xw bn128 w4 1.814 (kn's time), wx bn128 w4 1.854.
M1_NK = {("int4", 2): dict(orient="xw", bn=128, num_warps=4), ("int4", 1): dict(orient="xw", bn=128, num_warps=4),
         ("mxfp4", 2): dict(orient="xw", bn=128, num_warps=4), ("mxfp4", 1): dict(orient="wx", bn=64, num_warps=2)}


def routed_m1_config(fmt: str, M: int, K: int, N: int, group_size: int, n_weights: int, layout: str = "kn"):
    """The int4_m1 config a routed decode pair runs with: the weight's stored layout, M1_FOLD groups per dot, and
    for "nk" the M1_NK form."""
    from pallas_kernels.int4_m1 import default_m1_config

    form = M1_NK.get(("mxfp4" if fmt == "mxfp4" else "int4", n_weights), {}) if layout == "nk" else {}
    cfg = default_m1_config(M, K, N, group_size, n_weights, layout=layout, fold=M1_FOLD.get(fmt, 1), **form)
    return dataclasses.replace(cfg, scale_in_decode=FOLD_SCALE_IN_DECODE and cfg.fold > 1)


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "cfg", "interpret", "epilogue", "layout",
                                             "busy_rows"))
def int4_grouped_matmul(x, group_sizes, weights, row_scale=None, *, fmt: str, group_size: int,
                        cfg: KernelConfig | None = None, interpret: bool = False, epilogue: str = "none",
                        row_experts=None, layout: str = "kn", busy_rows: int | None = None):
    """Rows of x[M, K] sorted by expert, group_sizes[E] rows per expert; weights is a tuple of
    (packed [E, K/2, N] ("kn") or [E, N, K/2] ("nk"), scales [E, K/G, N], mins or None) -- one entry, or two
    (gate, up) for epilogue "silu_mul" (SiLU(x Wg) * (x Wu)) / "silu_mul_scaled" (same, times row_scale[M]).
    With row_experts (int32 [M], E = skip: a zero row) instead of group_sizes, row r uses expert
    row_experts[r] and the rows need no sorting (`row_tiles`). busy_rows (static): how many of the rows are
    expected to do work (expert parallelism: the others skip); the default configs split K for those, not all M."""
    M, K = x.shape
    E = weights[0][0].shape[0]
    Kw, N = packed_kn(weights[0][0], layout)
    if weights[0][0].ndim != 3 or Kw != K:
        raise ValueError(f"int4_grouped_matmul: x {x.shape} does not match expert weights [E={E}, K={Kw}, "
                         f"N={N}] (layout {layout})")
    if (row_experts is not None and cfg is None and routes_to_m1(fmt, len(weights))
            and epilogue != "silu_mul_scaled"):
        # pairs (decode): pallas_kernels.int4_m1 -- the same dot (x rows as A, mma.sync), each pair's program
        # inside the aligned 16-row block of x that holds it, K split for ~2 weight tiles per SM.
        from pallas_kernels.int4_m1 import int4_m1_matmul
        m1 = routed_m1_config(fmt, min(M, busy_rows or M), K, N, group_size, len(weights), layout)
        return int4_m1_matmul(x, weights, row_experts, fmt=fmt, group_size=group_size, cfg=m1,
                              interpret=interpret, epilogue=epilogue)
    if cfg is None:
        cfg = default_grouped_config(M, K, N, group_size, E, busy_rows=busy_rows)
        groups = K // group_size // cfg.split_k // cfg.unroll
        fold = fit_fold(GROUPED_FOLD.get(fmt, 1), groups)
        cfg = dataclasses.replace(cfg, fold=fold, scale_in_decode=FOLD_SCALE_IN_DECODE and fold > 1)
    cfg = _for_backend(dataclasses.replace(cfg, layout=layout), interpret)
    check_shapes(K, N, group_size, cfg, what="expert weight")
    check_fold(cfg.fold, fmt, K // group_size // cfg.split_k // cfg.unroll, "int4_grouped_matmul",
               cfg.scale_in_decode)
    tiles = row_tiles(row_experts) if row_experts is not None else tile_schedule(group_sizes, M, cfg.bm)
    flat = flat_weights(weights, fmt)
    if epilogue == "silu_mul_scaled":
        flat.append(row_scale.astype(F32))
    kernel = functools.partial(_grouped_kernel, fmt=fmt, gs=group_size, E=E, cfg=cfg,
                               n_weights=len(weights), epilogue=epilogue)
    split = cfg.split_k > 1
    out = pl.pallas_call(
        kernel, grid=(N // cfg.bn, tiles.shape[1]) + ((cfg.split_k,) if split else ()),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, M, len(weights) * N), F32) if split
        else jax.ShapeDtypeStruct((M, N), x.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name=f"int4_grouped_{fmt}",
    )(tiles, folded_x(x, group_size, cfg), *flat)
    if not split:
        return out
    return sum_partials(out, N, epilogue, row_scale).astype(x.dtype)


def flat_weights(weights, fmt: str) -> list:
    """(packed, scales, mins) per weight -> the kernel's operand list (mins only for int4_asym)."""
    flat = []
    for (p, s, m) in weights:
        flat += [p, s] + ([m] if fmt == "int4_asym" else [])
    return flat


def sum_partials(out, N: int, epilogue: str, row_scale=None):
    """Split-K partials [split, M, n_weights * N] f32 -> [M, N] f32 with the kernel's epilogue applied."""
    out = jnp.sum(out, axis=0)
    if epilogue != "none":
        g, u = out[:, :N], out[:, N:]
        out = g * jax.nn.sigmoid(g) * u
        if epilogue == "silu_mul_scaled":
            out = out * row_scale.astype(F32)[:, None]
    return out
