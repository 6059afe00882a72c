"""The "kn" and "nk" stored expert layouts on the GPU: every expert kernel path (decode pairs through int4_m1, the
grouped verify kernel, gate/up fused and down) checked against the dequantised reference in both layouts, and
timed at mid_mimo's shapes (hidden 4096, expert intermediate 2048, 64 experts, top-8): one token (decode) and
9 tokens (a k = 8 verify), 8 disjoint expert sets so that weights do not come from L2. % of the read ceiling
measured in the same run, counting the touched experts' bytes.

    python benchmarks/check_layouts.py [--formats int4_sym,mxfp4] [--reps 50]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ceiling import read_ceiling  # noqa: E402
from mimo_jax import quant as Q  # noqa: E402
from pallas_kernels import int4_matmul as IM  # noqa: E402

H, I, E, TOP = 4096, 2048, 64, 8


def timed(f, reps):
    """Seconds per call of f() (compiled and warmed first); the calls are queued back to back."""
    jax.block_until_ready(f())
    jax.block_until_ready(f())
    t = time.perf_counter()
    for _ in range(reps):
        out = f()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def grouped_cfg(fmt, K, N, gs):
    """The grouped kernel's own config for TOP decode pairs (as int4_grouped_matmul picks it without a route)."""
    cfg = IM.default_grouped_config(TOP, K, N, gs, E)
    return dataclasses.replace(cfg, fold=IM.fit_fold(IM.GROUPED_FOLD.get(fmt, 1), K // gs // cfg.split_k))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int4_sym,mxfp4")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    ceiling = read_ceiling()
    print(f"device {jax.devices()[0].device_kind}, read ceiling {ceiling / 1e12:.2f} TB/s")
    rng = np.random.default_rng(0)
    for fmt in args.formats.split(","):
        gs = 32 if fmt == "mxfp4" else 128
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        w = {name: Q.quantize_jit(jax.random.normal(kk, (E,) + shape, jnp.bfloat16) * 0.02, fmt=fmt, group_size=gs)
             for name, kk, shape in (("gate", k[0], (H, I)), ("up", k[1], (H, I)), ("down", k[2], (I, H)))}
        per_expert = sum(x.nbytes for x in w.values()) // E
        sets = [rng.permutation(E)[:TOP] for _ in range(8)]  # each set: TOP distinct experts
        for tokens in (1, 9):
            xs = [jnp.asarray(rng.normal(size=(tokens * TOP, H)), jnp.bfloat16) for _ in sets]
            if tokens == 1:  # decode: one pair per expert, no sort
                ids = [jnp.asarray(s, jnp.int32) for s in sets]
            else:  # verify: every token picks from the set; rows sorted by expert
                ids = [jnp.asarray(np.sort(np.concatenate([rng.permutation(s) for _ in range(tokens)])), jnp.int32)
                       for s in sets]
            touched = len({int(e) for e in np.asarray(ids[0])})
            results = {}
            variants = ("kn", "nk", "nk grouped") if tokens == 1 else ("kn", "nk")
            for variant in variants:
                layout = variant.split()[0]
                wl = {n: Q.to_layout(v, layout) for n, v in w.items()}
                if tokens == 1:
                    # the route (int4_m1), or with an explicit config the grouped kernel's row tiles
                    cu, cd = ((grouped_cfg(fmt, H, I, gs), grouped_cfg(fmt, I, H, gs))
                              if variant.endswith("grouped") else (None, None))
                    f = jax.jit(lambda x, i, wl=wl, cu=cu, cd=cd: Q.pair_qmatmul(
                        Q.pair_qmatmul_gate_up(x, wl["gate"], wl["up"], i, cfg=cu), wl["down"], i, cfg=cd))
                else:
                    def f(x, i, wl=wl):
                        gsz = jnp.bincount(i, length=E).astype(jnp.int32)
                        h = Q.ragged_qmatmul_gate_up(x, wl["gate"], wl["up"], gsz)
                        return Q.ragged_qmatmul(h, wl["down"], gsz)
                    f = jax.jit(f)
                got = np.asarray(f(xs[0], ids[0]), np.float32)
                ref = np.asarray(jax.jit(lambda x, i, wl=wl: Q.pair_qmatmul(
                    Q.pair_qmatmul_gate_up(x, wl["gate"], wl["up"], i, impl="xla"), wl["down"], i, impl="xla"))(
                        xs[0], ids[0]), np.float32)
                rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                n = [0]

                def call():
                    j = n[0] % len(sets)
                    n[0] += 1
                    return f(xs[j], ids[j])

                sec = timed(call, args.reps)
                pct = 100 * touched * per_expert / sec / ceiling
                results[variant] = sec
                print(f"{fmt:9s} tokens {tokens}  {variant:10s}: {sec * 1e6:8.1f} us/MoE layer ({pct:4.1f}% of ceiling, "
                      f"{touched} experts)  rel err vs XLA {rel:.2e} {'OK' if rel < 2e-2 else 'FAIL'}")
            print(f"{fmt:9s} tokens {tokens}  nk / kn = {results['nk'] / results['kn']:.3f}")


if __name__ == "__main__":
    main()
