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


def supported(M: int, K: int, N: int) -> bool:
    """Shapes the kernel takes (others stay on XLA's dot)."""
    return 1 <= M <= 16 and K % 16 == 0 and N % 16 == 0


def _kernel(x_ref, w_ref, o_ref, *, M: int, cfg: GemvConfig, steps: int):
    ni, ki = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(ni * cfg.bn, cfg.bn)
    first = ki * steps

    if M == 1 and not cfg.dot:
        def tile(i):  # the weight tile [bk, bn] and x rows [bk, 1] of K step i
            k0 = pl.multiple_of((first + i) * cfg.bk, cfg.bk)
            return w_ref[pl.ds(k0, cfg.bk), pl.ds(n0, cfg.bn)], x_ref[pl.ds(k0, cfg.bk), :]

        def fma(acc, t):
            return acc + t[0].astype(F32) * t[1].astype(F32)

        zero = jnp.zeros((cfg.bk, cfg.bn), F32)
        if cfg.prefetch and steps > 1:  # step i's FMAs run while step i + 1's loads are in flight
            acc, last = jax.lax.fori_loop(0, steps - 1, lambda i, c: (fma(c[0], c[1]), tile(i + 1)), (zero, tile(0)))
            acc = fma(acc, last)
        else:
            acc = jax.lax.fori_loop(0, steps, lambda i, a: fma(a, tile(i)), zero)
        out = jnp.sum(acc, axis=0, keepdims=True)             # [1, bn]
        rows = 1
    else:
        rows = 16
        rmask = jnp.arange(rows) < M

        def body(i, acc):
            k0 = pl.multiple_of((first + i) * cfg.bk, cfg.bk)
            w = w_ref[pl.ds(k0, cfg.bk), pl.ds(n0, cfg.bn)]
            x = plgpu.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, cfg.bk)], mask=rmask[:, None], other=0.0)
            return acc + jnp.dot(x, w, preferred_element_type=F32)

        out = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, cfg.bn), F32))
    lead = (ki,) if cfg.split_k > 1 else ()
    if rows == 1:
        o_ref[(*lead, pl.ds(0, 1), pl.ds(n0, cfg.bn))] = out.astype(o_ref.dtype)
    else:
        plgpu.store(o_ref.at[(*lead, pl.ds(0, rows), pl.ds(n0, cfg.bn))], out.astype(o_ref.dtype),
                    mask=(jnp.arange(rows) < M)[:, None])


def check_config(M: int, K: int, N: int, cfg: GemvConfig) -> None:
    if not supported(M, K, N):
        raise ValueError(f"gemv: x [{M}, {K}] @ W [{K}, {N}] needs 1 <= M <= 16 and K, N multiples of 16")
    if N % cfg.bn or K % (cfg.bk * cfg.split_k):
        raise ValueError(f"gemv: K={K} N={N} not divisible by the block (bk={cfg.bk} x split {cfg.split_k}, "
                         f"bn={cfg.bn})")


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "partials"))
def gemv(x, w, *, cfg: GemvConfig | None = None, interpret: bool = False, partials: bool = False):
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype (f32 accumulation); partials=True returns the f32
    [split, M, N] partials unsummed (for a caller that fuses the sum with what follows)."""
    M, K = x.shape
    N = w.shape[1]
    cfg = cfg or default_config(M, K, N)
    check_config(M, K, N, cfg)
    steps = K // cfg.bk // cfg.split_k
    split = cfg.split_k > 1
    out_dtype = F32 if (split or partials) else x.dtype
    shape = (cfg.split_k, M, N) if split else (M, N)
    xin = x.astype(w.dtype).reshape(K, 1) if M == 1 and not cfg.dot else x.astype(w.dtype)
    out = pl.pallas_call(
        functools.partial(_kernel, M=M, cfg=cfg, steps=steps),
        grid=(N // cfg.bn, cfg.split_k),
        out_shape=jax.ShapeDtypeStruct(shape, out_dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="gemv_bf16",
    )(xin, w)
    if partials:
        return out if split else out[None]
    return out.sum(axis=0).astype(x.dtype) if split else out
