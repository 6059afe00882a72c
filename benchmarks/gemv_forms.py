"""Which way of writing a one-token dense product does XLA turn into the fewest, fastest kernels inside a layer scan?

    python benchmarks/gemv_forms.py [--layers 30] [--hidden 576] [--ffn 1536]

SmolLM2's decode step spends ~5 us per small product as two kernels: XLA strength-reduces the one-row dot into
a multiply that writes the f32 product [K, N] to memory and a column reduction that reads it back
(`profile_step.py` on SmolLM2, session 10). This times a SmolLM2-shaped MLP chain (RMSNorm, gate/up, SiLU, down,
residual) as a `lax.scan` over stacked weights, one token, in several forms, and counts the kernels XLA emits in
the loop body:
  - kn:        weights [K, N] through ops.matmul (jnp.dot);
  - nk:        weights stored [N, K] (ops.OutInWeight: the reduction runs over the minor axis, a row reduction);
  - *_dot:     the same with `xla_gpu_gemm_rewrite_size_threshold=0` (keeps a real GEMM instead of multiply+reduce).
Prints us per layer against the layer's bytes over the read ceiling measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from ceiling import read_ceiling

from mimo_jax import ops
from mimo_jax.layers import rms_norm


def chain(layout):
    """The MLP chain through the model's own pieces: layers.rms_norm, ops.matmul (an ops.OutInWeight for "nk")."""
    def layer(h, p):
        x = rms_norm(h, p["norm"], 1e-6)
        w = p if layout == "kn" else {k: ops.OutInWeight(v) for k, v in p.items() if k != "norm"}
        g, u = ops.matmul(x, w["gate"]), ops.matmul(x, w["up"])
        return h + ops.matmul(jax.nn.silu(g) * u, w["down"]), None

    return jax.jit(lambda h, params: jax.lax.scan(layer, h, params)[0])


def weights(L, d, f, key=0):
    """Stacked [L, K, N] bf16 weights of the chain, and its norm scales."""
    ks = jax.random.split(jax.random.PRNGKey(key), 3)
    mk = lambda k_, s: jax.random.normal(k_, s, jnp.bfloat16) * 0.03
    return {"norm": jnp.ones((L, d), jnp.bfloat16), "gate": mk(ks[0], (L, d, f)), "up": mk(ks[1], (L, d, f)),
            "down": mk(ks[2], (L, f, d))}


def body_kernels(hlo: str) -> int:
    """Kernels in the while body: fusions and custom calls of the body computation."""
    bodies = [m for m in re.split(r"\n(?=%|ENTRY)", hlo) if "-> (s32[]" in m.split("\n")[0] and " while(" not in m]
    body = max(bodies, key=len) if bodies else ""
    return len(re.findall(r"= [^\n]*? (fusion|custom-call)\(", body))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    L, d, f = a.layers, a.hidden, a.ffn
    ceiling = read_ceiling()
    layer_bytes = 3 * d * f * 2 + d * 2
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"{L} layers, hidden {d}, ffn {f}; read ceiling {ceiling / 1e12:.2f} TB/s; floor "
          f"{1e6 * layer_bytes / ceiling:.2f} us per layer", flush=True)
    h = jax.random.normal(jax.random.PRNGKey(9), (1, d), jnp.bfloat16)
    rows, ref = [], None
    for name, layout, opts in (("kn", "kn", None), ("nk", "nk", None),
                               ("kn_dot", "kn", {"xla_gpu_gemm_rewrite_size_threshold": 0}),
                               ("nk_dot", "nk", {"xla_gpu_gemm_rewrite_size_threshold": 0})):
        p = weights(L, d, f)
        if layout == "nk":  # the same matrices, stored transposed
            p = {k: (v if v.ndim == 2 else jnp.swapaxes(v, 1, 2)) for k, v in p.items()}
        try:
            c = chain(layout).lower(h, p).compile(compiler_options=opts) if opts else chain(layout).lower(h, p).compile()
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        y = np.asarray(c(h, p), np.float32)
        ref = y if ref is None else ref
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        jax.block_until_ready(c(h, p))
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            outs = [c(h, p) for _ in range(a.reps)]
            jax.block_until_ready(outs)
            ts.append((time.perf_counter() - t) / a.reps)
        us = 1e6 * min(ts) / L
        k = body_kernels(c.as_text())
        rows.append({"form": name, "us_per_layer": us, "kernels_per_layer": k, "rel_err_vs_kn": err,
                     "pct_floor": 100 * (1e6 * layer_bytes / ceiling) / us})
        print(f"  {name:7s} {us:6.2f} us/layer  {k:2d} kernels in the loop body  "
              f"{rows[-1]['pct_floor']:4.1f}% of the floor  (err vs kn {err:.1e})", flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / f"gemv_forms_{name}.hlo.txt").write_text(c.as_text())
    with open(Path(a.out) / "gemv_forms.json", "w") as fh:
        json.dump({"ceiling": ceiling, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
