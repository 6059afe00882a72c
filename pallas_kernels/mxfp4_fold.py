"""MXFP4 with F groups per dot (cfg.fold > 1), shared by int4_matmul's dense and grouped kernels and int4_m1.

An e8m0 scale is a power of two, so each group's scale can multiply its decoded bf16 weights exactly (short of
subnormals) before one dot over F groups (`folded_partial`). x comes permuted (`fold_x`, `folded_x`) so that its
columns line up with the packed rows of F groups: all groups' first halves, then all second halves. With
cfg.scale_in_decode the scale rides in the e2m1 decode's own multiply instead, the weights come out times
2^-X_SCALE_EXP and x comes times 2^X_SCALE_EXP.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.nibble_decode import _codes_to_bf16, _e2m1_asm

F32, BF16, U16 = jnp.float32, jnp.bfloat16, jnp.uint16
# cfg.scale_in_decode: the decode multiplies by the bf16 2^(e - 1 - X_SCALE_EXP) and x by 2^X_SCALE_EXP. Exact for
# e8m0 scales 2^-67 .. 2^65 (X = 64: the bf16 factor 2^(e - 65) exists for e <= 192; weights below 2^-133 flush to
# zero) and |x| < 2^64.
X_SCALE_EXP = 64


def fold_x(x, group_size: int):
    """x [M, K] -> [M, K] with each group's first halves first (group order), then its second halves: column
    g * G/2 + j is x[:, g * G + j] and column K/2 + g * G/2 + j is x[:, g * G + G/2 + j], i.e. the order of the
    packed rows (byte row g * G/2 + j holds rows g * G + j and g * G + G/2 + j)."""
    M, K = x.shape
    return x.reshape(M, K // group_size, 2, group_size // 2).transpose(0, 2, 1, 3).reshape(M, K)


def folded_x_halves(x_ref, rows, mask, kb: int, width: int):
    """The two column ranges of a `fold_x`-ordered x that meet packed rows [kb, kb + width): the groups' first
    halves from column kb, their second halves from column K/2 + kb (rows past the mask read as 0)."""
    kx = x_ref.shape[1] // 2
    return (plgpu.load(x_ref.at[rows, pl.ds(kb, width)], mask=mask, other=0.0),
            plgpu.load(x_ref.at[rows, pl.ds(kx + kb, width)], mask=mask, other=0.0))


def folded_x(x, group_size: int, cfg):
    """x [M, K] as a kernel with cfg reads it, bf16: in `fold_x` order for cfg.fold > 1, and times 2^X_SCALE_EXP
    (exact) for cfg.scale_in_decode, whose weights arrive times 2^-X_SCALE_EXP."""
    if cfg.fold == 1:
        return x.astype(BF16)
    x = fold_x(x, group_size)
    if cfg.scale_in_decode:
        x = x.astype(F32) * float(2 ** X_SCALE_EXP)
    return x.astype(BF16)


def folded_partial(x_lo, x_hi, p, s, ptx: bool, wx: bool = False, scale_in_decode: bool = False):
    """F mxfp4 groups in one dot pair: x_lo/x_hi [bm, F G/2] bf16 (columns as `fold_x` orders them), p the packed
    rows of the F groups [F G/2, bn] uint8, s their e8m0 scales [F, bn] -> f32 [bm, bn]. Each group's scale, a
    power of two, multiplies its decoded bf16 weights (exact short of subnormals) before the dot. wx: the
    transposed orientation (p [bn, F G/2], x_lo/x_hi [F G/2, bm] -> [bn, bm]). ptx: the e2m1 decode by inline PTX
    (GPU), else jnp. scale_in_decode: the weights come out times 2^-X_SCALE_EXP with the scale applied by the
    decode's own multiply (x arrives times 2^X_SCALE_EXP, `folded_x`): one bf16x2 multiply per two weights fewer
    on the PTX path."""
    F, bn = s.shape

    def per_weight(sc):  # [F, bn] -> p's shape: packed row f * G/2 + r (column, for wx) takes group f's value
        if wx:
            return jnp.broadcast_to(sc.T[:, :, None], (bn, F, p.shape[1] // F)).reshape(p.shape)
        return jnp.broadcast_to(sc[:, None, :], (F, p.shape[0] // F, bn)).reshape(p.shape)

    if scale_in_decode and ptx:  # 2^126 (the decode's) x 2^(e - 127) x 2^-X: the bf16 2^(e - 1 - X)
        lo, hi = _e2m1_asm(p, per_weight(_pow2_bf16(s, 126 - X_SCALE_EXP)))
    else:
        if ptx:
            lo, hi = _e2m1_asm(p)
        else:
            p16 = p.astype(U16)
            lo, hi = _codes_to_bf16(p16 & 15, "mxfp4", "convert"), _codes_to_bf16(p16 >> 4, "mxfp4", "convert")
        sc = per_weight(_pow2_bf16(s, -X_SCALE_EXP if scale_in_decode else 0))  # 2^(e - 127) (x 2^-X)
        lo, hi = lo * sc, hi * sc
    if wx:
        return jnp.dot(lo, x_lo, preferred_element_type=F32) + jnp.dot(hi, x_hi, preferred_element_type=F32)
    return jnp.dot(x_lo, lo, preferred_element_type=F32) + jnp.dot(x_hi, hi, preferred_element_type=F32)


def _pow2_bf16(s, shift: int):
    """e8m0 scales (uint8) -> bf16 2^(e - 127 + shift): the exponent placed into a bf16 for shift >= 0; shifts
    below 0 (the interpret path's 2^-X_SCALE_EXP) in f32, as small e would leave the bf16 exponent range."""
    if shift >= 0:
        return jax.lax.bitcast_convert_type((s.astype(U16) + shift) << 7, BF16)
    return jnp.exp2(s.astype(F32) - (127 - shift)).astype(BF16)
