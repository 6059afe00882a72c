"""Decode-sized products with FP8 block-scaled weights (mimo_jax/fp8.py) against the same weights in bf16.

    python benchmarks/bench_fp8_gemv.py [--ms 1,9] [--sweep] [--out DIR]

For MiMo's dense shapes that the hub ships in FP8 (q/k/v fused, full and sliding; the dense MLP; the 2-GPU
per-device q/k/v) and M in {1, 9} (decode, a k = 8 verify): time per product inside one jitted program over a
rotation of distinct weights (>= 256 MiB, none from L2), with the read ceiling measured in this run:
  - bf16 kernel: today's path for a bf16 weight (pallas_kernels.gemv, the model's config; XLA's dot for the dense MLP),
  - fp8 xla:     XLA's dot of the dequantized FP8 weight (what the model does without the kernel),
  - fp8 kernel:  the GEMV kernel reading the FP8 bytes (gemv.fp8_config), and with --sweep a few configs around it,
for each stored layout (--layouts: "nk" as the hub stores them, "kn").
% of the ceiling counts each path's own bytes (FP8: 1 byte per value + the scales). Every kernel result is checked
against the float64 product of the dequantized weight.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
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

from bench_gemv import timed
from ceiling import read_ceiling
from mimo_jax import fp8
from pallas_kernels import gemv as G

SHAPES = {"qkv full": (4096, 13568), "qkv sliding": (4096, 14848), "dense gate_up": (4096, 32768),
          "dense down": (16384, 4096), "qkv sliding /2": (4096, 7424)}
# bf16 on the hub, candidates for FP8 of our own (not in the default run): lm_head (152576 vocab) and o_proj (64 heads x 128)
EXTRA_SHAPES = {"lm_head": (4096, 152576), "o_proj": (8192, 4096), "lm_head_half": (4096, 76288)}
ROTATE = 256 << 20
KERNEL = "kernel"  # --smoke: "interpret" (CPU)


def variants(M, K, N):
    """Configs around gemv.fp8_config: K splits, tile widths, warps, stages, the dot in f16, and at M = 1 the
    other form (FMA vs tensor-core dot)."""
    d = G.fp8_config(M, K, N)
    out = [dataclasses.replace(d, split_k=d.split_k * 2), dataclasses.replace(d, split_k=d.split_k * 4),
           dataclasses.replace(d, bn=128), dataclasses.replace(d, bn=32), dataclasses.replace(d, num_warps=8),
           dataclasses.replace(d, num_stages=4)]
    if d.split_k > 1:
        out.append(dataclasses.replace(d, split_k=d.split_k // 2))
    if d.dot:
        out.append(dataclasses.replace(d, f16=True))
        if M == 1:
            out += [dataclasses.replace(d, dot=False, split_k=s) for s in (2, 4)]
    elif M == 1:
        out += [dataclasses.replace(d, dot=True), dataclasses.replace(d, dot=True, f16=True)]
    return out


def bench_one(M, K, N, ceiling, sweep, layout):
    R = int(min(64, max(4, math.ceil(ROTATE / (K * N)))))
    ws = [0.03 * jax.random.normal(jax.random.PRNGKey(i), (K, N), jnp.float32) for i in range(R)]
    fws = [fp8.quantize_jit(w, layout=layout) for w in ws]
    bfs = [w.astype(jnp.bfloat16) for w in ws]
    del ws
    xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (M, K), jnp.bfloat16) for i in range(R)]
    io = M * (K + N) * 2
    nb_bf16, nb_fp8 = K * N * 2 + io, K * N + fws[0].scale.size * 4 + io
    ref = np.asarray(xs[0], np.float64) @ np.asarray(fp8.dequantize(fws[0]), np.float64)
    res = {}

    def run(name, op, weights, nbytes, check=False):
        try:
            f = jax.jit(lambda xs, ws: [op(x, w) for x, w in zip(xs, ws)])
            t = timed(f, xs, weights) / R
            res[name] = {"us": 1e6 * t, "pct": 100 * nbytes / t / ceiling}
            if check:
                y = np.asarray(op(xs[0], weights[0]), np.float64)
                res[name]["err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
        except Exception as e:  # noqa: BLE001 -- report and go on
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    def bf16_path(x, w):
        if G.supported(M, K, N) and K * N < (1 << 26):
            cfg = G.wide_dot_config(K, N) if N > K and M == 1 else None
            return G.gemv(x, w, cfg=cfg)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    run("bf16", bf16_path, bfs, nb_bf16)
    run("fp8 xla", lambda x, w: fp8.matmul(x, w, impl="xla"), fws, nb_fp8, check=True)
    run("fp8 kernel", lambda x, w: fp8.matmul(x, w, impl=KERNEL), fws, nb_fp8, check=True)
    if sweep:
        for c in variants(M, K, N):
            name = (f"fp8[bn{c.bn},bk{c.bk},s{c.split_k},w{c.num_warps},st{c.num_stages}{',dot' if c.dot else ''}"
                    f"{',f16' if c.f16 else ''}]")
            try:
                G.check_config(M, K, N, c, 128)
            except ValueError:
                continue
            run(name, lambda x, w, c=c: fp8.matmul(x, w, cfg=c, impl=KERNEL), fws, nb_fp8, check=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,9")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--smoke", action="store_true", help="CPU: interpret mode, one tiny shape (script check only)")
    ap.add_argument("--layouts", default="nk,kn", help="FP8 weight layouts (mimo_jax.fp8), comma separated")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if a.smoke:
        global KERNEL, ROTATE
        KERNEL, ROTATE = "interpret", 1
        SHAPES["smoke"] = (256, 384)
        a.shapes = "smoke"
    ceiling = read_ceiling()
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"read ceiling {ceiling / 1e12:.3f} TB/s", flush=True)
    out = {"ceiling": ceiling, "rows": []}
    for name in a.shapes.split(","):
        K, N = {**SHAPES, **EXTRA_SHAPES}[name]
        for M, layout in itertools.product(map(int, a.ms.split(",")), a.layouts.split(",")):
            r = bench_one(M, K, N, ceiling, a.sweep, layout)
            out["rows"].append({"shape": name, "K": K, "N": N, "M": M, "layout": layout, **r})
            cells = [f"{k} {v['us']:.1f} us ({v['pct']:.0f}%){' err %.0e' % v['err'] if 'err' in v else ''}"
                     if "us" in v else f"{k} {v['error'][:80]}" for k, v in r.items()]
            print(f"{name} {K}x{N} M={M} {layout}: " + " | ".join(cells), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "bench_fp8_gemv.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
