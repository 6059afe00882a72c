"""Dense bf16 x[M, K] @ W[K, N] for decode-sized M (1..16): a Pallas (Triton-lowered) weight-streaming kernel.

Why a kernel for a plain dot: at batch 1 a projection is a GEMV, bound by reading W once. XLA's GPU compiler
rewrites dots under ~10M weight elements into multiply + reduce (SmolLM2's projections) and, measured on an H200
(BENCHMARKS.md), writes the f32 product [K, N] to memory before reducing it: two kernels and 3x the bytes.
Larger ones go to cuBLAS / Triton GEMMs tuned for throughput, not for one row.

Layout of the work: every program owns a column tile [bn] and a K range (K / split); it walks its range in
steps of bk rows with the loads pipelined (num_stages), so each weight byte is read once:
  - M = 1: no tensor cores. acc[bk, bn] += W[k:k+bk, tile] * x[k:k+bk, None] in the weight tile's own
    register layout, one reduction over the bk rows at the end (cfg.dot: the M > 1 form instead);
  - M > 1: the rows padded to 16 (the tensor-core dot minimum), acc[16, bn] += x[16, bk] @ W[bk, tile].
With split > 1 the programs write f32 partials [split, M, N] that XLA sums (one small fusion, which also takes
whatever elementwise op follows: a residual add, the SiLU of a gate).

FP8 weights with block scales (mimo_jax/fp8.py: W = w_fp8 * scale[k // B, n // B], B = 128): `scale` given, the
kernel reads the 1-byte values, widens them in registers (f32 for the FMA form, bf16 for the dot: e4m3 is exact in
both) and multiplies each K step's partial by its block's scale (bk and bn divide B, so one scale per step).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    bn: int = 64            # output columns per program
    bk: int = 64            # weight rows per loop step
    split_k: int = 1        # programs along K (f32 partials summed outside)
    num_warps: int = 4
    num_stages: int = 3     # (Triton pipelines only loads that feed a dot: the M > 1 path; see prefetch)
    prefetch: bool = False  # M = 1: load the next K step's tile before the FMAs of this one (by hand: compiled
                            # offline, the M = 1 loop has no asynchronous copies at any num_stages). Untimed.
    dot: bool = False       # M = 1 through the M > 1 path (x padded to 16 rows, a tensor-core dot), whose loads
                            # Triton pipelines. Untimed at M = 1; the same kernel at M = 9 ran 4096 x 13568 in
                            # 28.9 us (88% of the ceiling) where the FMA path's best at M = 1 was 32.8 (77%).
    f16: bool = False       # FP8 weights, dot form: the dot in float16 (e4m3 -> f16 is one conversion per two
                            # values; -> bf16 goes through f32), x rounded to f16 (overflows past 65504).


def _pow2_divisor(n: int, cap: int) -> int:
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def default_config(M: int, K: int, N: int, n_sms: int = 132) -> GemvConfig:
    """Column tiles of 64, then K splits. M = 1 wants many programs in flight: split until ~6 per SM while
    each split keeps >= 8 steps; M > 1 (tensor-core dot) until ~1.5 per SM. Measured on an H200
    (BENCHMARKS.md, `bench_gemv.py --sweep`): 4096 x 13568 at M = 1 33 us with 4 splits vs 44 us with 2;
    8192 x 4096 20 us with 16; small grids (SmolLM2's 576-wide layers: < 1 program per SM) 2x faster with
    8 warps than with 4."""
    bn = _pow2_divisor(N, 64)
    bk = _pow2_divisor(K, 64 if M == 1 else 128)
    want, min_steps = (6 * n_sms, 8) if M == 1 else (3 * n_sms // 2, 4)
    split = 1
    while (N // bn) * split < want and K % (bk * split * 2) == 0 and K // (bk * split * 2) >= min_steps:
        split *= 2
    warps = 8 if M == 1 and (N // bn) * split < n_sms else 4
    return GemvConfig(bn=bn, bk=bk, split_k=split, num_warps=warps)


def wide_dot_config(K: int, N: int) -> GemvConfig:
    """One token times a wide weight (N > K, MiMo's fused q/k/v) as the tensor-core form, one program per 64
    columns, K in steps of 128: `bench_gemv.py --quick --ms 1 --sweep`'s best there (one H200, session 16)."""
    return GemvConfig(bn=_pow2_divisor(N, 64), bk=_pow2_divisor(K, 128), split_k=1, num_warps=4, num_stages=3,
                      dot=True)


def fp8_config(M: int, K: int, N: int, n_sms: int = 132) -> GemvConfig:
    """FP8 weights (1 byte per value), 128-row K steps (a step's tile stays inside one 128 x 128 scale block).
    M = 1: the FMA form, K split until ~7 programs per SM (each split >= 4 steps). Measured on an H100 (session 19,
    `bench_fp8_gemv.py --sweep`, weights stored "nk"): 4096 x 14848 27.5 us (72% of the ceiling; bf16 42.6 us),
    4096 x 32768 54.9 us (79%; bf16 95.8), 16384 x 4096 29.7 us (73%; bf16 50.1); the "kn" layout and the
    tensor-core form were slower at M = 1 (44-56%). M > 1: the tensor-core form, K split until ~1.5 programs per
    SM: M = 9, "nk", 4096 x 14848 30.1 us (65%; bf16 42.5), 16384 x 4096 33.1 us at split 4 (66%; split 1: 76.9)."""
    bn, bk = _pow2_divisor(N, 64), _pow2_divisor(K, 128)
    want = 3 * n_sms // 2 if M > 1 else 7 * n_sms
    split = 1
    while (N // bn) * split < want and K % (bk * split * 2) == 0 and K // (bk * split * 2) >= 4:
        split *= 2
    return GemvConfig(bn=bn, bk=bk, split_k=split, num_warps=4, num_stages=3, dot=M > 1)


def supported(M: int, K: int, N: int) -> bool:
    """Shapes the kernel takes (others stay on XLA's dot)."""
    return 1 <= M <= 16 and K % 16 == 0 and N % 16 == 0


def _kernel(x_ref, w_ref, *refs, M: int, cfg: GemvConfig, steps: int, block: int, nk: bool):
    s_ref, o_ref = refs if block else (None, refs[0])
    ni, ki = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(ni * cfg.bn, cfg.bn)
    first = ki * steps

    def scale(k0):  # the [1, 1] scale of the block holding inputs k0.. and outputs n0.. (FP8 weights), else None
        if not block:
            return None
        if nk:
            return s_ref[pl.ds(n0 // block, 1), pl.ds(k0 // block, 1)]
        return s_ref[pl.ds(k0 // block, 1), pl.ds(n0 // block, 1)]

    if M == 1 and not cfg.dot:
        def tile(i):  # the weight tile [bk, bn] and x rows [bk, 1] of K step i (FP8: x times the block's scale)
            k0 = pl.multiple_of((first + i) * cfg.bk, cfg.bk)
            x = x_ref[:, pl.ds(k0, cfg.bk)] if nk else x_ref[pl.ds(k0, cfg.bk), :]  # [1, bk] / [bk, 1]
            if block:
                x = x.astype(F32) * scale(k0)
            w = w_ref[pl.ds(n0, cfg.bn), pl.ds(k0, cfg.bk)] if nk else w_ref[pl.ds(k0, cfg.bk), pl.ds(n0, cfg.bn)]
            return w, x

        def fma(acc, t):
            return acc + t[0].astype(F32) * t[1].astype(F32)

        zero = jnp.zeros((cfg.bn, cfg.bk) if nk else (cfg.bk, cfg.bn), F32)
        if cfg.prefetch and steps > 1:  # step i's FMAs run while step i + 1's loads are in flight
            acc, last = jax.lax.fori_loop(0, steps - 1, lambda i, c: (fma(c[0], c[1]), tile(i + 1)), (zero, tile(0)))
            acc = fma(acc, last)
        else:
            acc = jax.lax.fori_loop(0, steps, lambda i, a: fma(a, tile(i)), zero)
        out = jnp.sum(acc, axis=1)[None, :] if nk else jnp.sum(acc, axis=0, keepdims=True)  # [1, bn]
        rows = 1
    else:
        rows = 16
        rmask = jnp.arange(rows) < M

        def body(i, acc):
            k0 = pl.multiple_of((first + i) * cfg.bk, cfg.bk)
            w = w_ref[pl.ds(n0, cfg.bn), pl.ds(k0, cfg.bk)] if nk else w_ref[pl.ds(k0, cfg.bk), pl.ds(n0, cfg.bn)]
            x = plgpu.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, cfg.bk)], mask=rmask[:, None], other=0.0)
            if block:
                dt = jnp.float16 if cfg.f16 else x.dtype
                part = (jax.lax.dot_general(x.astype(dt), w.astype(dt), (((1,), (1,)), ((), ())),  # x . w^T
                                            preferred_element_type=F32) if nk
                        else jnp.dot(x.astype(dt), w.astype(dt), preferred_element_type=F32))
                return acc + part * scale(k0)
            return acc + jnp.dot(x, w, preferred_element_type=F32)

        out = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, cfg.bn), F32))
    lead = (ki,) if cfg.split_k > 1 else ()
    if rows == 1:
        o_ref[(*lead, pl.ds(0, 1), pl.ds(n0, cfg.bn))] = out.astype(o_ref.dtype)
    else:
        plgpu.store(o_ref.at[(*lead, pl.ds(0, rows), pl.ds(n0, cfg.bn))], out.astype(o_ref.dtype),
                    mask=(jnp.arange(rows) < M)[:, None])


def check_config(M: int, K: int, N: int, cfg: GemvConfig, block: int = 0) -> None:
    if not supported(M, K, N):
        raise ValueError(f"gemv: x [{M}, {K}] @ W [{K}, {N}] needs 1 <= M <= 16 and K, N multiples of 16")
    if N % cfg.bn or K % (cfg.bk * cfg.split_k):
        raise ValueError(f"gemv: K={K} N={N} not divisible by the block (bk={cfg.bk} x split {cfg.split_k}, "
                         f"bn={cfg.bn})")
    if block and (K % block or N % block or block % cfg.bk or block % cfg.bn):
        raise ValueError(f"gemv: FP8 weight K={K} N={N}: scale blocks of {block} must tile K and N and hold whole "
                         f"tiles (bk={cfg.bk}, bn={cfg.bn})")


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "partials", "block", "nk"))
def gemv(x, w, *, scale=None, block: int = 128, cfg: GemvConfig | None = None, interpret: bool = False,
         partials: bool = False, nk: bool = False):
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype (f32 accumulation); partials=True returns the f32
    [split, M, N] partials unsummed (for a caller that fuses the sum with what follows). scale: w is FP8 e4m3
    with float32 block scales [K / block, N / block] (mimo_jax.fp8). nk: w is stored [N, K] (each output's
    weights contiguous along K, the hub's FP8 layout; scale then [N / block, K / block])."""
    M, K = x.shape
    if nk and scale is None:
        raise ValueError("gemv: nk (a weight stored [N, K]) is for FP8 weights with their block scales")
    N = w.shape[0] if nk else w.shape[1]
    block = block if scale is not None else 0
    cfg = cfg or (fp8_config(M, K, N) if block else default_config(M, K, N))
    check_config(M, K, N, cfg, block)
    steps = K // cfg.bk // cfg.split_k
    split = cfg.split_k > 1
    out_dtype = F32 if (split or partials) else x.dtype
    shape = (cfg.split_k, M, N) if split else (M, N)
    xdtype = jnp.bfloat16 if block else w.dtype
    xin = x.astype(xdtype).reshape(K, 1) if M == 1 and not cfg.dot and not nk else x.astype(xdtype)
    out = pl.pallas_call(
        functools.partial(_kernel, M=M, cfg=cfg, steps=steps, block=block, nk=nk),
        grid=(N // cfg.bn, cfg.split_k),
        out_shape=jax.ShapeDtypeStruct(shape, out_dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="gemv_fp8" if block else "gemv_bf16",
    )(xin, w, *(() if scale is None else (scale.astype(F32),)))
    if partials:
        return out if split else out[None]
    return out.sum(axis=0).astype(x.dtype) if split else out
