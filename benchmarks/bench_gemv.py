"""Decode-sized dense bf16 projections: XLA's dot vs the Pallas weight-streaming kernel (pallas_kernels/gemv.py).

    python benchmarks/bench_gemv.py [--quick] [--out DIR]

For each weight shape of the models we decode (SmolLM2, MiMo-V2-Flash / mid_mimo, Flash with heads split over
2 GPUs) and M in {1, 9} (decode, a k = 8 verify): time per product inside one jitted program that runs it over a
rotation of distinct weights (>= 256 MiB, so none comes from L2) with distinct inputs (so XLA merges nothing),
achieved TB/s and % of the read ceiling measured in this run, for
  - xla:        jnp.dot as the model writes it (XLA picks multiply+reduce, cuBLAS or a Triton GEMM),
  - xla_cublas: the same with xla_gpu_enable_triton_gemm=false (compile option),
  - pallas:     the kernel with its default config, and the best of a few configs.
Also checks the kernel against an f32 reference on every shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import gemv as G
from ceiling import read_ceiling

SHAPES = {  # name -> (K, N)
    "smollm2 qkv": (576, 960), "smollm2 o": (576, 576), "smollm2 gate_up": (576, 3072),
    "smollm2 down": (1536, 576), "smollm2 lm_head": (576, 49152),
    "flash qkv (full)": (4096, 13568), "flash qkv (swa)": (4096, 14848), "flash o": (8192, 4096),
    "flash router": (4096, 256), "flash dense gate_up": (4096, 32768), "flash dense down": (16384, 4096),
    "flash lm_head": (4096, 152576),
    "flash/2 qkv (full)": (4096, 6784), "flash/2 qkv (swa)": (4096, 7424), "flash/2 o": (4096, 4096),
    "flash/2 lm_head": (4096, 76288), "mid_mimo router": (4096, 64),
}
SMALL = ("smollm2 qkv", "smollm2 o", "smollm2 gate_up", "smollm2 down", "mid_mimo router", "flash router")
QUICK = ("smollm2 qkv", "smollm2 down", "flash qkv (full)", "flash qkv (swa)", "flash o", "flash/2 qkv (swa)",
         "flash/2 o")
ROTATE = 256 << 20


def timed(f, *args, reps=5, min_total=0.03):
    """Seconds per call: calls enqueued back to back (host dispatch hides behind device work), one sync per
    batch, best batch of `reps`."""
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    n = max(3, min(100, int(min_total / max(time.perf_counter() - t, 1e-6))))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        outs = [f(*args) for _ in range(n)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t) / n)
    return float(np.min(ts))


def bench_one(M, K, N, ceiling, cfgs, pads=()):
    R = int(min(64, max(4, math.ceil(ROTATE / (K * N * 2)))))
    ws = [jax.random.normal(jax.random.PRNGKey(i), (K, N), jnp.bfloat16) * 0.03 for i in range(R)]
    xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (M, K), jnp.bfloat16) for i in range(R)]
    nbytes = K * N * 2 + M * (K + N) * 2
    res = {}

    def run(name, op, options=None):
        f = jax.jit(lambda xs, ws: [op(x, w) for x, w in zip(xs, ws)])
        c = f.lower(xs, ws).compile(compiler_options=options) if options else f
        t = timed(c, xs, ws) / R
        res[name] = {"us": 1e6 * t, "pct": 100 * nbytes / t / ceiling}
        return t

    dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)  # noqa: E731
    run("xla", dot)
    for m in pads:  # XLA rewrites a one-row dot of a small weight to multiply + reduce; a padded x keeps it a dot
        if M < m:
            run(f"xla_pad{m}", lambda x, w, m=m: dot(jnp.pad(x, ((0, m - M), (0, 0))), w)[:M])
    if pads:  # the router's form: f32 operands
        run("xla_f32", lambda x, w: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)))
    try:
        run("xla_cublas", dot, {"xla_gpu_enable_triton_gemm": False})
    except Exception as e:  # noqa: BLE001
        res["xla_cublas"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    ref = np.asarray(xs[0], np.float32) @ np.asarray(ws[0], np.float32)
    best = None
    for i, cfg in enumerate([None] + cfgs):
        c = cfg or G.default_config(M, K, N)
        try:
            G.check_config(M, K, N, c)
        except ValueError:
            continue
        name = "pallas" if i == 0 else (f"pallas[{c.bn},{c.bk},s{c.split_k},w{c.num_warps},st{c.num_stages}"
                                        f"{',prefetch' if c.prefetch else ''}{',dot' if c.dot else ''}]")
        try:
            t = run(name, lambda x, w, c=c: G.gemv(x, w, cfg=c))
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
            continue
        if i == 0:
            y = np.asarray(G.gemv(xs[0], ws[0], cfg=c), np.float32)
            res["pallas"]["rel_err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
        if best is None or t < best[0]:
            best = (t, name)
    if best:
        res["best_pallas"] = best[1]
    return res


def variants(M, K, N):
    d = G.default_config(M, K, N)
    out = [dataclasses.replace(d, bn=2 * d.bn), dataclasses.replace(d, bn=max(16, d.bn // 2)),
           dataclasses.replace(d, num_warps=8), dataclasses.replace(d, num_stages=4),
           dataclasses.replace(d, split_k=max(1, d.split_k // 2)), dataclasses.replace(d, split_k=d.split_k * 2)]
    if M == 1:
        out.append(dataclasses.replace(d, prefetch=True))
        out.append(dataclasses.replace(G.default_config(9, K, N), dot=True))  # the verify's tiling, as a dot
        out.append(dataclasses.replace(d, bk=d.bk // 2))
        out.append(dataclasses.replace(d, bk=2 * d.bk, split_k=max(1, d.split_k // 2)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time config variants around the default")
    ap.add_argument("--ms", default="1,9")
    ap.add_argument("--small", action="store_true", help="only the small layers' shapes (SmolLM2, routers), with the "
                    "padded-row and f32 forms of XLA's dot")
    ap.add_argument("--pads", default=None, help="comma separated row counts: also time XLA's dot with x padded to "
                    "that many rows (default: 2,16 with --small, else none)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    pads = tuple(map(int, a.pads.split(","))) if a.pads else ((2, 16) if a.small else ())
    ceiling = read_ceiling()
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"read ceiling {ceiling / 1e12:.3f} TB/s", flush=True)
    print("| shape | K x N | M | xla us (%) | xla cublas us (%) | pallas default us (%) | best pallas | err |")
    print("|---|---|---|---|---|---|---|---|")
    out = {"ceiling": ceiling, "rows": []}
    for name, (K, N) in SHAPES.items():
        if (a.quick and name not in QUICK) or (a.small and name not in SMALL):
            continue
        for M in map(int, a.ms.split(",")):
            r = bench_one(M, K, N, ceiling, variants(M, K, N) if a.sweep else [], pads)
            out["rows"].append({"shape": name, "K": K, "N": N, "M": M, **r})

            def cell(k):
                v = r.get(k, {})
                return v.get("error", "")[:40] if "error" in v else (f"{v['us']:.1f} ({v['pct']:.0f}%)" if v else "")
            bp = r.get("best_pallas", "")
            print(f"| {name} | {K}x{N} | {M} | {cell('xla')} | {cell('xla_cublas')} | {cell('pallas')} | "
                  f"{bp} {cell(bp) if bp != 'pallas' else ''} | {r.get('pallas', {}).get('rel_err', float('nan')):.1e} |",
                  flush=True)
            if pads:
                print("    " + ", ".join(f"{k} {cell(k)}" for k in r if k.startswith("xla_")), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "bench_gemv.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
