"""Int4 dequant-matmul for one token (decode): dense M <= 16 and per-pair experts, two operand orientations and
two weight layouts (Pallas, Triton lowering). An experiment of issue 12 (benchmarks/bench_int4_m1.py measures it
against pallas_kernels.int4_matmul).

Formats: int4_sym / int4_asym as in mimo_jax/quant.py (group G along K; per group, byte j holds row j in its low
nibble and row j + G/2 in its high nibble; scales / mins [.., K/G, N]); mxfp4 the same bytes as e2m1 codes with
an e8m0 scale (a uint8 exponent) per group.

Weight layouts (cfg.layout):
  "kn"  packed [E, K/2, N] (mimo_jax.quant's stored layout): a group's tile is [G/2, bn], N contiguous.
  "nk"  packed [E, N, K/2] (`to_nk`, the same bytes transposed): a group's tile is [bn, G/2], K contiguous, so
        the bytes of one output column along K are adjacent -- what an mma operand wants per thread (Triton then
        reads them from shared memory 4-8 bytes at a time instead of byte by byte).

Orientations (cfg.orient):
  "xw"  out[16, bn] = x[16 rows, K] . W[K, bn] (as int4_matmul: mma.sync m16n8k16, W is the B operand);
  "wx"  out^T[bn, 16] = W^T[bn, K] . x^T[K, 16] (the weight is the A operand of a wgmma, which Hopper can take
        from registers, so the upcast tile need not be written to shared memory: bn % 64 == 0 and 4k warps; other
        shapes get mma.sync with the weight as the A operand).
Per program: one row tile of 16 x rows (dense) or one (token, expert) pair (`row_experts`; its 16-row tile is
the aligned block that holds it, the other rows are computed and dropped), one N tile, one K range.

Nibble -> bf16 (cfg.method), in registers by inline PTX (GPU) or jnp (interpret mode):
  "asm"    bf16(q - 8) (int4_sym) / bf16(q) (int4_asym) by prmt + lop3 + a bf16x2 fma (as int4_matmul);
  "magic"  bf16(128 + q) by prmt + lop3 only (one instruction fewer per two weights); the bias is folded into
           the f32 partial: x . w = s * (x . (128 + q)) + sum(x) * (m - 128 s), m = -8 s for int4_sym.
mxfp4 codes become bf16 by nibble_decode's PTX e2m1 decode (`_e2m1_asm`; jnp `_codes_to_bf16` in interpret mode;
method "asm" only) and the group's partial is scaled by 2^(e - 127).

cfg.fold = F > 1 (mxfp4 only): F groups per dot. An e8m0 scale is a power of two, so the decoded bf16 weights can
take it exactly (a bf16 multiply, short of subnormals) before one dot over F x 32 K rows: F times fewer, larger dots
and no per-group scaling of the [16, bn] f32 accumulator (with 32-wide groups that scaling is ~1 f32 op per weight,
4x int4 g128's share). x comes permuted so that its columns line up with the packed rows of F groups: all groups'
low halves, then all high halves (mxfp4_fold's `fold_x` / `folded_partial`, shared with the grouped kernel).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.int4_matmul import _largest_pow2_divisor, _pow2, check_fold, fit_fold, flat_weights, sum_partials
from pallas_kernels.mxfp4_fold import folded_partial, folded_x, folded_x_halves
from pallas_kernels.nibble_decode import _NIBBLES_ASM, _codes_to_bf16, _e2m1_asm

F32, BF16, U16 = jnp.float32, jnp.bfloat16, jnp.uint16
ROWS = 16  # x rows per program: the tensor-core dot minimum

# "magic": bf16x2(128 + q) straight from lop3, no bias fma
_MAGIC_ASM = """{
.reg .b32 t0, t1;
prmt.b32 t0, $2, 0, 0x4140;
prmt.b32 t1, $2, 0, 0x4342;
SHIFT
lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
}"""
_SHIFT = "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;"


@dataclasses.dataclass(frozen=True)
class M1Config:
    orient: str = "xw"      # "xw" (x is the dot's A operand) or "wx" (W^T is; wgmma, bn % 64 == 0)
    layout: str = "kn"      # weight layout: "kn" ([E, K/2, N], as stored) or "nk" ([E, N, K/2])
    method: str = "asm"     # "asm" (q - 8 / q via a bf16 fma) or "magic" (128 + q, bias in f32)
    bn: int = 128
    split_k: int = 1        # programs along K (f32 partials summed, epilogue applied, by one XLA fusion)
    num_warps: int = 4
    num_stages: int = 3
    fold: int = 1           # mxfp4: groups per dot, their power-of-two scales applied to the bf16 weights
    scale_in_decode: bool = False  # fold > 1: the scales multiply inside the e2m1 decode (mxfp4_fold.folded_partial)


def default_m1_config(rows: int, K: int, N: int, group_size: int, n_weights: int = 1, n_sms: int = 132,
                      **kw) -> M1Config:
    """K split until there are ~2 weight tiles per SM: rows (pairs, or 16-row blocks) x N tiles x weights x splits.
    Measured on an H200 (BENCHMARKS.md, 8 pairs): gate/up K=4096 N=2048 x 2 weights split 2 (40.4 us) beat
    split 4 (42.5) / 8 / 16; down K=2048 N=4096 split 2 beat 1 and 4."""
    cfg = M1Config(**kw)
    bn = _largest_pow2_divisor(N, cfg.bn)
    groups = K // group_size
    split = 1
    while (rows * (N // bn) * n_weights * split < 2 * n_sms and groups % (split * 2) == 0
           and groups // (split * 2) >= 2):
        split *= 2
    # groups per dot (mxfp4): the largest power of two <= the request dividing a split's groups
    return dataclasses.replace(cfg, bn=bn, split_k=split, fold=fit_fold(cfg.fold, groups // split))


def to_nk(packed):
    """[..., K/2, N] -> [..., N, K/2] (the "nk" layout: each output column's bytes contiguous along K)."""
    return jnp.swapaxes(packed, -1, -2)


def check(K: int, N: int, group_size: int, cfg: M1Config, fmt: str) -> None:
    if fmt not in ("int4_sym", "int4_asym", "mxfp4"):
        raise ValueError(f"int4_m1: format {fmt!r} is not handled (int4_sym / int4_asym / mxfp4)")
    if fmt == "mxfp4" and cfg.method != "asm":
        raise ValueError(f"int4_m1: mxfp4 takes method 'asm' (its e2m1 decode), not {cfg.method!r}")
    if cfg.orient not in ("xw", "wx") or cfg.layout not in ("kn", "nk") or cfg.method not in ("asm", "magic"):
        raise ValueError(f"int4_m1: bad config {cfg}")
    if not _pow2(group_size) or group_size < 32 or K % group_size:
        raise ValueError(f"int4_m1: weight (K={K}, N={N}): group size {group_size} must be a power of two >= 32 "
                         f"dividing K")
    if N % cfg.bn or not _pow2(cfg.bn) or cfg.bn < 16:
        raise ValueError(f"int4_m1: weight (K={K}, N={N}): bn={cfg.bn} must be a power of two >= 16 dividing N")
    if (K // group_size) % cfg.split_k:
        raise ValueError(f"int4_m1: weight (K={K}, N={N}): {K // group_size} groups not divisible by "
                         f"split_k={cfg.split_k}")
    check_fold(cfg.fold, fmt, K // group_size // cfg.split_k, f"int4_m1: weight (K={K}, N={N})",
               cfg.scale_in_decode)


# --------------------------------------------------------------------------- in-register dequant

def _nibbles(p, fmt: str, method: str, interpret: bool):
    """uint8 tile -> (low, high) nibbles as bf16: q - 8 / q ("asm") or 128 + q ("magic"); e2m1(q) for mxfp4."""
    if fmt == "mxfp4":
        if not interpret:
            return _e2m1_asm(p)
        p16 = p.astype(U16)
        return _codes_to_bf16(p16 & 15, fmt, method), _codes_to_bf16(p16 >> 4, fmt, method)
    if interpret:
        p16 = p.astype(U16)
        off = 128.0 if method == "magic" else (-8.0 if fmt == "int4_sym" else 0.0)
        return tuple((c.astype(F32) + off).astype(BF16) for c in (p16 & 15, p16 >> 4))
    out = []
    for shift in ("", _SHIFT):
        if method == "magic":
            asm = _MAGIC_ASM.replace("SHIFT", shift)
        else:
            bias = "0xC308C308" if fmt == "int4_sym" else "0xC300C300"  # bf16x2 of -136 / -128
            asm = _NIBBLES_ASM.replace("BIAS", bias).replace("SHIFT", shift)
        (v,) = plgpu.elementwise_inline_asm(asm, args=[p], constraints="=r,=r,r", pack=4,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, BF16)])
        out.append(v)
    return tuple(out)


# --------------------------------------------------------------------------- kernel

def _kernel(ids_ref, x_ref, *refs, fmt, gs, E, cfg, n_weights, epilogue, pairs, M, interpret):
    per = 3 if fmt == "int4_asym" else 2
    wrefs, o_ref = refs[:per * n_weights], refs[-1]
    ni, t = pl.program_id(0), pl.program_id(1)
    bn, half, wx = cfg.bn, gs // 2, cfg.orient == "wx"
    n0 = pl.multiple_of(ni * bn, bn)
    if pairs:  # program t = pair t: its expert, inside the aligned 16-row block that holds row t
        e = ids_ref[t]
        c0 = pl.multiple_of((t // ROWS) * ROWS, ROWS)
        keep = c0 + jnp.arange(ROWS) == t
    else:
        e = 0
        c0 = pl.multiple_of(t * ROWS, ROWS)
        keep = c0 + jnp.arange(ROWS) < M
    n_groups = x_ref.shape[1] // gs
    per_split = n_groups // cfg.split_k
    split = cfg.split_k > 1
    if split:
        s_idx = pl.program_id(2)
        width = o_ref.shape[2] // n_weights
        outs = [o_ref.at[s_idx, pl.ds(c0, ROWS), pl.ds(j * width + n0, bn)] for j in range(n_weights)]
    else:
        s_idx = 0
        outs = [o_ref.at[pl.ds(c0, ROWS), pl.ds(n0, bn)]]
    g_first = s_idx * per_split
    need_xs = cfg.method == "magic" or fmt == "int4_asym"

    xmask = (c0 + jnp.arange(ROWS) < M)[:, None]

    def x_tiles(k0):  # [16, G/2] tiles of x (rows past M read as 0); transposed for "wx"
        lo = plgpu.load(x_ref.at[pl.ds(c0, ROWS), pl.ds(k0, half)], mask=xmask, other=0.0)
        hi = plgpu.load(x_ref.at[pl.ds(c0, ROWS), pl.ds(k0 + half, half)], mask=xmask, other=0.0)
        xs = None
        if need_xs:
            xs = (jnp.sum(lo.astype(F32), axis=1) + jnp.sum(hi.astype(F32), axis=1))
            xs = xs[None, :] if wx else xs[:, None]
        return (lo.T, hi.T, xs) if wx else (lo, hi, xs)

    def w_tile(p_ref, g, n=1):  # the packed rows of n groups from group g, in the orientation's layout
        kb = pl.multiple_of(g * half, half * n)
        if cfg.layout == "nk":
            p = p_ref[e, pl.ds(n0, bn), pl.ds(kb, n * half)]      # [bn, n G/2]
            return p if wx else p.T
        p = p_ref[e, pl.ds(kb, n * half), pl.ds(n0, bn)]          # [n G/2, bn]
        return p.T if wx else p

    def col(v):  # a per-column [bn] vector, broadcast against the accumulator
        v = v.astype(F32)
        return v[:, None] if wx else v[None, :]

    def body(i, accs):
        g = g_first + i
        x_lo, x_hi, xs = x_tiles(pl.multiple_of(g * gs, gs))
        new = []
        for j in range(n_weights):
            p_ref, s_ref = wrefs[per * j], wrefs[per * j + 1]
            lo, hi = _nibbles(w_tile(p_ref, g), fmt, cfg.method, interpret)
            if wx:
                d = jnp.dot(lo, x_lo, preferred_element_type=F32) + jnp.dot(hi, x_hi, preferred_element_type=F32)
            else:
                d = jnp.dot(x_lo, lo, preferred_element_type=F32) + jnp.dot(x_hi, hi, preferred_element_type=F32)
            s = s_ref[e, g, pl.ds(n0, bn)]
            if fmt == "mxfp4":  # e8m0: 2^(e - 127), the exponent placed into a bf16
                s = jax.lax.bitcast_convert_type(s.astype(U16) << 7, BF16)
            s = col(s)
            if cfg.method == "magic":
                d = d - xs * (136.0 if fmt == "int4_sym" else 128.0)
            part = d * s
            if fmt == "int4_asym":
                part = part + xs * col(wrefs[per * j + 2][e, g, pl.ds(n0, bn)])
            new.append(accs[j] + part)
        return tuple(new)

    F = cfg.fold  # fold > 1: x arrives as fold_x(x)

    def body_fold(i, accs):  # F groups per dot, each group's e8m0 scale applied to its bf16 weight rows
        g = g_first + i * F
        kb = pl.multiple_of(g * half, half * F)  # packed row of the chunk = its column in either half of x
        x_lo, x_hi = folded_x_halves(x_ref, pl.ds(c0, ROWS), xmask, kb, F * half)
        if wx:
            x_lo, x_hi = x_lo.T, x_hi.T
        new = []
        for j in range(n_weights):
            p_ref, s_ref = wrefs[per * j], wrefs[per * j + 1]
            d = folded_partial(x_lo, x_hi, w_tile(p_ref, g, F), s_ref[e, pl.ds(g, F), pl.ds(n0, bn)], not interpret,
                               wx, cfg.scale_in_decode)
            new.append(accs[j] + d)
        return tuple(new)

    shape = (bn, ROWS) if wx else (ROWS, bn)

    def store(out_at, v):
        v = v.T if wx else v
        plgpu.store(out_at, v.astype(o_ref.dtype), mask=keep[:, None])

    @pl.when(e >= E)
    def _skip():
        for out_at in outs:
            store(out_at, jnp.zeros(shape, F32))

    @pl.when(e < E)
    def _compute():
        init = tuple(jnp.zeros(shape, F32) for _ in range(n_weights))
        accs = (jax.lax.fori_loop(0, per_split // F, body_fold, init) if F > 1
                else jax.lax.fori_loop(0, per_split, body, init))
        if split:
            for out_at, acc in zip(outs, accs):
                store(out_at, acc)
            return
        if epilogue == "none":
            out = accs[0]
        else:
            g, u = accs
            out = g * jax.nn.sigmoid(g) * u
        store(outs[0], out)


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "cfg", "interpret", "epilogue"))
def int4_m1_matmul(x, weights, row_experts=None, *, fmt: str, group_size: int, cfg: M1Config | None = None,
                   interpret: bool = False, epilogue: str = "none"):
    """x[M, K] (bf16) times 4-bit weights -> [M, N] in x's dtype.

    weights: a tuple of (packed, scales, mins or None), one entry, or two (gate, up) for epilogue "silu_mul"
    (SiLU(x Wg) * (x Wu)). packed is [K/2, N] / [N, K/2] (dense, layout "kn" / "nk") or [E, K/2, N] /
    [E, N, K/2] with row_experts (int32 [M]; row r uses expert row_experts[r]; >= E: a zero row)."""
    M, K = x.shape
    pairs = row_experts is not None
    p0 = weights[0][0]
    if not pairs:
        weights = tuple(tuple(None if a is None else a[None] for a in w) for w in weights)
    cfg = cfg or M1Config()
    E = weights[0][0].shape[0]
    N = weights[0][0].shape[-1] if cfg.layout == "kn" else weights[0][0].shape[-2]
    kpacked = weights[0][0].shape[-2] if cfg.layout == "kn" else weights[0][0].shape[-1]
    if kpacked * 2 != K:
        raise ValueError(f"int4_m1_matmul: x {x.shape} does not match packed weight {p0.shape} "
                         f"(layout {cfg.layout})")
    check(K, N, group_size, cfg, fmt)
    ids = row_experts.astype(jnp.int32) if pairs else jnp.zeros((1,), jnp.int32)  # >= E: the kernel skips
    flat = flat_weights(weights, fmt)
    nw = len(weights)
    split = cfg.split_k > 1
    kernel = functools.partial(_kernel, fmt=fmt, gs=group_size, E=E, cfg=cfg, n_weights=nw, epilogue=epilogue,
                               pairs=pairs, M=M, interpret=interpret)
    rows = M if pairs else -(-M // ROWS)
    out = pl.pallas_call(
        kernel, grid=(N // cfg.bn, rows) + ((cfg.split_k,) if split else ()),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, M, nw * N), F32) if split
        else jax.ShapeDtypeStruct((M, N), x.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name=f"int4_m1_{cfg.orient}_{cfg.layout}_{fmt}",
    )(ids, folded_x(x, group_size, cfg), *flat)
    if not split:
        return out
    return sum_partials(out, N, epilogue).astype(x.dtype)
