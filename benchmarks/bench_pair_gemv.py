"""Unquantized (bf16) routed experts at one token: the pair GEMV kernel against XLA's take + einsum.

    python benchmarks/bench_pair_gemv.py [--layers 7] [--experts 64] [--k 8] [--K 4096] [--N 2048]

A stack of layers x experts bf16 expert weights (mid_mimo's shapes by default: gate/up 4096 x 2048 each, down
2048 x 4096, flattened [layers * E, K, N] as moe.experts passes it), one token's top-k distinct experts per call,
each call in another layer (none of its bytes in L2); time per call inside one jitted program, bytes = the k
experts' weights (+ x, out), against the read ceiling measured in this run. Each kernel result is checked against
the float32 reference (pair_gemv.reference).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np

from bench_gemv import timed
from ceiling import read_ceiling
from mimo_jax import quant
from pallas_kernels.pair_gemv import pair_gemv, reference


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=2048)
    a = ap.parse_args()
    ceiling = read_ceiling()
    L, E, K, N, k = a.layers, a.experts, a.K, a.N, a.k
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; {time.strftime('%Y-%m-%d')}; read ceiling "
          f"{ceiling / 1e12:.3f} TB/s; stack {L} x {E} experts, gate/up {K}x{N}, down {N}x{K}, top-{k}", flush=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    wg, wu = ((0.02 * jax.random.normal(kk, (L * E, K, N), jnp.float32)).astype(jnp.bfloat16) for kk in keys[:2])
    wd = (0.02 * jax.random.normal(keys[2], (L * E, N, K), jnp.float32)).astype(jnp.bfloat16)
    x = jax.random.normal(keys[3], (k, K), jnp.float32).astype(jnp.bfloat16)
    h = jax.random.normal(keys[3], (k, N), jnp.float32).astype(jnp.bfloat16)
    rng = np.random.default_rng(0)
    ids = [jnp.asarray(l * E + rng.choice(E, k, replace=False), jnp.int32) for l in range(L)]
    up_bytes, down_bytes = 2 * k * K * N * 2, k * K * N * 2
    # the weights go in as arguments: closed over, jit would embed the multi-GB stacks in the program as constants
    # the kernel column calls pair_gemv itself (the model routes to it only with quant.PAIR_GEMV_FLOAT)
    kernel = "interpret" if jax.default_backend() != "gpu" else "pallas"

    def gate_up(x, i, ws, impl):
        if impl == "xla":
            return quant.pair_qmatmul_gate_up(x, *ws, i, impl="xla")
        return pair_gemv(x, ws, i, interpret=impl == "interpret", epilogue="silu_mul")

    def down(h, i, ws, impl):
        return quant.pair_qmatmul(h, ws[0], i, impl="xla") if impl == "xla" else \
            pair_gemv(h, ws, i, interpret=impl == "interpret")

    rows = [("gate/up + SiLU", up_bytes, gate_up, x, (wg, wu), lambda x, i, ws: reference(x, ws, i, "silu_mul")),
            ("down", down_bytes, down, h, (wd,), lambda h, i, ws: reference(h, ws, i))]
    print("| product | pair GEMV kernel | XLA take + einsum |\n|---|---|---|")
    for name, nbytes, op, arg, ws, ref in rows:
        cells = []
        for impl in (kernel, "xla"):
            f = jax.jit(lambda v, ids, ws, impl=impl: [op(v, i, ws, impl) for i in ids])
            t = timed(f, arg, ids, ws) / L
            got = jax.jit(lambda v, i, ws, impl=impl: op(v, i, ws, impl))(arg, ids[-1], ws).astype(jnp.float32)
            want = jax.jit(ref)(arg, ids[-1], ws)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            cells.append(f"{1e6 * t:.1f} us ({100 * nbytes / t / ceiling:.0f}%, err {err:.0e})")
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
