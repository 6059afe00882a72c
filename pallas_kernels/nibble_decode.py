"""4-bit code -> bf16 in registers, shared by the Triton-lowered int4 kernels (int4_matmul, int4_m1, mxfp4_fold):
jnp ops (`_codes_to_bf16`, every format) or inline PTX (`_nibbles_asm`: int4_sym / int4_asym; `_e2m1_asm`: mxfp4).

A module of its own so that mxfp4_fold can use the e2m1 decode without importing int4_matmul, which imports
mxfp4_fold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

F32, BF16, U16 = jnp.float32, jnp.bfloat16, jnp.uint16


def _codes_to_bf16(c, fmt: str, method: str):
    """uint16 codes 0..15 -> the bf16 values the dot uses: 128 + q ("magic"), q - 8 / q ("magic_sub", int4_sym
    / int4_asym), q ("convert"); e2m1(q) for mxfp4."""
    if fmt == "mxfp4":
        mag = c & 7
        bits = jnp.where(mag >= 2, mag * 64 + 0x3F00, mag * 0x3F00) | ((c & 8) << 12)
        return jax.lax.bitcast_convert_type(bits.astype(U16), BF16)
    if method in ("magic", "magic_sub"):
        v = jax.lax.bitcast_convert_type(c | 0x4300, BF16)  # exactly 128 + q
        if method == "magic_sub":
            v = v - jnp.asarray(136.0 if fmt == "int4_sym" else 128.0, BF16)  # exact in bf16
        return v
    return c.astype(F32).astype(BF16)


# Marlin-style nibble -> bf16 on 32-bit registers, 4 packed bytes at a time: prmt spreads bytes b0,b1 (b2,b3)
# into the two 16-bit halves of a register, lop3 computes (t & 0x000F000F) | 0x43004300 = bf16x2(128 + q),
# one bf16x2 fma subtracts the bias. Low nibbles: 6 instructions per 4 weights; high nibbles add a shift.
# (Two single-result asm calls: the Triton lowering here mishandles multi-result inline asm.)
_NIBBLES_ASM = """{
.reg .b32 t0, t1, one, bias;
mov.b32 one, 0x3F803F80;
mov.b32 bias, BIAS;
prmt.b32 t0, $2, 0, 0x4140;
prmt.b32 t1, $2, 0, 0x4342;
SHIFT
lop3.b32 t0, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $0, t0, one, bias;
fma.rn.bf16x2 $1, t1, one, bias;
}"""


def _nibbles_asm(p, fmt: str):
    """uint8 [r, c] -> (low, high) nibbles as bf16 q - 8 (int4_sym) or q (int4_asym)."""
    bias = "0xC308C308" if fmt == "int4_sym" else "0xC300C300"  # bf16x2 of -136 / -128
    out = []
    for shift in ("", "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;"):
        asm = _NIBBLES_ASM.replace("BIAS", bias).replace("SHIFT", shift)
        (v,) = plgpu.elementwise_inline_asm(asm, args=[p], constraints="=r,=r,r", pack=4,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, BF16)])
        out.append(v)
    return out


# mxfp4 (method "asm"): e2m1 nibble -> bf16 by placing its bits as a bf16 subnormal-range pattern and one
# bf16x2 multiply by 2^126 (no compare or select for the two subnormal codes: bf16 keeps them exact). Per half
# of a register (one byte of $2, spread by prmt as in _NIBBLES_ASM): magnitude bits e1 e0 m go to bf16 bits 8..6
# (exponent field e, mantissa m: the value e2m1 * 2^-126, a subnormal for e = 0), the sign to bit 15. Low
# nibbles: bits 0..2 << 6 and bit 3 << 12, merged by one lop3 ((a | b) & mask: neither shift puts a bit into the
# other's field); high nibbles: bits 4..6 << 2 and bit 7 << 8 (the second shift would reach bit 8, so it is
# masked first). 5-6 instructions per 2 weights, against ~9 jnp ops per weight (the jnp decode, `_codes_to_bf16`).
# Measured on one H200 (mid_mimo decode, BENCHMARKS.md session 7): gate/up 78.6 -> 52.8 us, down 44.6 -> 32.6 us,
# exact (every single weight of a GPU check equal to quant.dequantize).
_E2M1_ASM = """{
.reg .b32 t0, t1, u0, u1, v0, v1, k, z;
mov.b32 k, 0x7E807E80;
mov.b32 z, 0x80008000;
prmt.b32 t0, $2, 0, 0x4140;
prmt.b32 t1, $2, 0, 0x4342;
MERGE
fma.rn.bf16x2 $0, t0, k, z;
fma.rn.bf16x2 $1, t1, k, z;
}"""
_E2M1_MERGE = {
    "lo": """shl.b32 u0, t0, 6;
shl.b32 v0, t0, 12;
shl.b32 u1, t1, 6;
shl.b32 v1, t1, 12;
lop3.b32 t0, u0, v0, 0x81C081C0, 0xA8;
lop3.b32 t1, u1, v1, 0x81C081C0, 0xA8;""",
    "hi": """shl.b32 u0, t0, 2;
shl.b32 v0, t0, 8;
and.b32 v0, v0, 0x80008000;
shl.b32 u1, t1, 2;
shl.b32 v1, t1, 8;
and.b32 v1, v1, 0x80008000;
lop3.b32 t0, u0, 0x01C001C0, v0, 0xEA;
lop3.b32 t1, u1, 0x01C001C0, v1, 0xEA;""",
}


def _e2m1_asm(p, factor=None):
    """uint8 [r, c] -> (low, high) nibbles as bf16 e2m1 values (exact; the e8m0 scale is applied after), or with
    factor (bf16 [r, c], each weight's 2^(e - 1 - X_SCALE_EXP); X_SCALE_EXP: mxfp4_fold) the values times
    2^(e - 127 - X_SCALE_EXP): the fma multiplies by each weight's own factor instead of 2^126 (operands $3 / $4: the
    factors of the register's elements 0-1 / 2-3, paired as t0 / t1 pair the bytes of $2)."""
    asm, args, constraints = _E2M1_ASM, [p], "=r,=r,r"
    if factor is not None:
        for a, b in (("mov.b32 k, 0x7E807E80;\n", ""), ("t0, k, z", "t0, $3, z"), ("t1, k, z", "t1, $4, z")):
            asm = asm.replace(a, b)
        args, constraints = [p, factor], "=r,=r,r,r,r"
    out = []
    for half in ("lo", "hi"):
        (v,) = plgpu.elementwise_inline_asm(asm.replace("MERGE", _E2M1_MERGE[half]), args=args,
                                            constraints=constraints, pack=4,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, BF16)])
        out.append(v)
    return tuple(out)
