"""Float (bf16) routed experts at decode: row r of x[P, K] times expert ids[r] of W[E, K, N], one Pallas kernel.

XLA's path for unquantized experts (take the pairs' experts, einsum) ran as one reduce fusion per product at ~8% of
the read ceiling: mid_mimo with bf16 experts took 11.2 ms per token on an H100, 9.8 ms of it in experts, against a
1.9 ms floor (BENCHMARKS.md, session 20), and transformers + torch.compile ran the same model in 5.0 ms. Here every
program owns one pair, a column tile [bn] and a K range, and streams that expert's tile as gemv.py's one-token form
does (FMA into a [bk, bn] accumulator, one reduction at the end), so each touched expert's weights are read once.
Pairs with an id >= E (expert parallelism's skip) read nothing and give a zero row. With two weights (gate, up)
the kernel reads x once for both and SiLU(gate) * up is applied where the split-K partials are summed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gemv import GemvConfig, _pow2_divisor
from pallas_kernels.int4_matmul import sum_partials

F32 = jnp.float32


def default_config(P: int, K: int, N: int, n_weights: int = 1, n_sms: int = 132) -> GemvConfig:
    """Column tiles of 64, K in steps of 64, split along K until ~6 programs per SM with >= 8 steps each."""
    bn, bk = _pow2_divisor(N, 64), _pow2_divisor(K, 64)
    split = 1
    while P * (N // bn) * n_weights * split < 6 * n_sms and K % (bk * split * 2) == 0 and K // (bk * split * 2) >= 8:
        split *= 2
    return GemvConfig(bn=bn, bk=bk, split_k=split, num_warps=4)


def supported(K: int, N: int) -> bool:
    return K % 16 == 0 and N % 16 == 0


def _kernel(ids_ref, x_ref, *refs, E: int, cfg: GemvConfig, steps: int, n_weights: int):
    w_refs, o_ref = refs[:n_weights], refs[n_weights]
    ni, p, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = pl.multiple_of(ni * cfg.bn, cfg.bn)
    e = ids_ref[p]
    width = o_ref.shape[2] // n_weights
    outs = [o_ref.at[ki, pl.ds(p, 1), pl.ds(j * width + n0, cfg.bn)] for j in range(n_weights)]

    @pl.when(e >= E)
    def _skip():
        for out in outs:
            out[...] = jnp.zeros((1, cfg.bn), o_ref.dtype)

    @pl.when(e < E)
    def _compute():
        def body(i, accs):
            k0 = pl.multiple_of((ki * steps + i) * cfg.bk, cfg.bk)
            x = x_ref[pl.ds(k0, cfg.bk), pl.ds(p, 1)].astype(F32)  # [bk, 1]
            return tuple(a + w[e, pl.ds(k0, cfg.bk), pl.ds(n0, cfg.bn)].astype(F32) * x for a, w in zip(accs, w_refs))

        accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((cfg.bk, cfg.bn), F32) for _ in range(n_weights)))
        for out, acc in zip(outs, accs):
            out[...] = jnp.sum(acc, axis=0, keepdims=True).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "epilogue"))
def pair_gemv(x, weights, ids, *, cfg: GemvConfig | None = None, interpret: bool = False, epilogue: str = "none"):
    """x [P, K], weights: (W,) or (W_gate, W_up) each [E, K, N], ids int32 [P] (>= E: a zero row) -> [P, N] in x's
    dtype: x[r] @ W[ids[r]] (epilogue "silu_mul" with two weights: SiLU(x[r] @ Wg[ids[r]]) * (x[r] @ Wu[ids[r]]))."""
    P, K = x.shape
    E, _, N = weights[0].shape
    nw = len(weights)
    if (epilogue == "silu_mul") != (nw == 2) or any(w.shape != weights[0].shape for w in weights):
        raise ValueError(f"pair_gemv: epilogue {epilogue!r} with {nw} weights of shapes {[w.shape for w in weights]}")
    if weights[0].shape[1] != K or not supported(K, N):
        raise ValueError(f"pair_gemv: x {x.shape} @ W {weights[0].shape}: K must match, K and N multiples of 16")
    cfg = cfg or default_config(P, K, N, nw)
    if N % cfg.bn or K % (cfg.bk * cfg.split_k):
        raise ValueError(f"pair_gemv: K={K} N={N} not divisible by the block (bk={cfg.bk} x {cfg.split_k}, "
                         f"bn={cfg.bn})")
    steps = K // cfg.bk // cfg.split_k
    out = pl.pallas_call(
        functools.partial(_kernel, E=E, cfg=cfg, steps=steps, n_weights=nw),
        grid=(N // cfg.bn, P, cfg.split_k),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, P, nw * N), F32),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="pair_gemv",
    )(ids.astype(jnp.int32), x.T, *weights)
    return sum_partials(out, N, epilogue).astype(x.dtype)


def reference(x, weights, ids, epilogue: str = "none"):
    """The jnp product pair_gemv computes (f32)."""
    E = weights[0].shape[0]
    outs = [jnp.einsum("pk,pkn->pn", x.astype(F32), jnp.take(w, jnp.minimum(ids, E - 1), axis=0).astype(F32))
            for w in weights]
    out = outs[0] if epilogue == "none" else jax.nn.silu(outs[0]) * outs[1]
    return jnp.where((ids < E)[:, None], out, 0.0)

