"""The Mosaic GPU int4 dequant-matmul (pallas_kernels/int4_mgpu.py) against the HBM read ceiling, on one Hopper GPU.

    python benchmarks/bench_int4_mgpu.py [--quick] [--sweep] [--table] [--ms 1,4,16] [--json PATH]

Measures the HBM read ceiling in the same run (jnp.sum over 4 GiB of bf16), checks the kernel against the
f32 jnp reference (rel. error of the norm and max |err| / max |ref|), then times per (M, K, N), int4_sym g128:
the Mosaic GPU kernel, today's Triton-lowered kernel (pallas_kernels.int4_matmul, default config), XLA's
dequantize + dot (mimo_jax.quant.dequantize then a bf16 dot) and XLA's int4 convert + dot with a per-channel
scale (XLA's best int4 form). Bytes counted: packed weights + scales + x + output. Weights rotate over
enough copies (>= 256 MiB, > 4x L2) that no call reads them from L2; ops are enqueued back to back inside one
jit (kernels repeated T times with perturbed x so host dispatch hides behind device work), median of 5.
Every shape / variant is guarded: a failure is printed and the run goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pallas_kernels import int4_mgpu as MG  # noqa: E402

from bench_int4 import timeit  # noqa: E402  (the same wall-clock timer as the Triton kernel's table)

SHAPES = ((4096, 16384), (16384, 4096), (4096, 2048), (2048, 4096), (6144, 2048))
ROTATE_BYTES = 256 << 20   # > 4x the H200's L2
GS = 128
LOG = []
RESULTS = []


T0 = time.time()


def log(*a):
    s = f"[{time.time() - T0:6.1f}s] " + " ".join(str(v) for v in a)
    print(s, flush=True)
    LOG.append(s)




def repeated(op, T):
    def f(x, *rest):
        outs = []
        for t in range(T):
            xt = x if t == 0 else x + jnp.asarray(t * 2.0 ** -6, x.dtype)
            outs.append(op(xt, *rest))
        return outs
    return jax.jit(f)


def device_times(fn, arg_list, passes=2):
    """Device time per call of fn over arg_list (distinct weights, so no L2 reuse), from CUPTI kernel
    records (jax's Mosaic GPU profiler extension): (seconds per call summed over all its kernels,
    {kernel name: seconds per call}), plus the host wall time per call of the same loop."""
    from jax._src.lib import mosaic_gpu as lib
    ext = lib._mosaic_gpu_ext
    jax.block_until_ready([fn(*a) for a in arg_list[:2]])   # compile + warm
    ext._cupti_init()
    try:
        t = time.perf_counter()
        outs = [fn(*a) for _ in range(passes) for a in arg_list]
        jax.block_until_ready(outs)
        wall = (time.perf_counter() - t) / (passes * len(arg_list))
    finally:
        timings = ext._cupti_get_timings(True)
    n = passes * len(arg_list)
    by = {}
    for name, ms in timings:
        by[name] = by.get(name, 0.0) + ms * 1e-3 / n
    return sum(by.values()), by, wall


def hbm_ceiling():
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 31,), jnp.bfloat16)  # 4 GiB
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    t = timeit(f, x, min_total=0.1, reps=5)
    del x
    return (1 << 32) / t


def rotation(nbytes):
    return int(min(64, max(4, math.ceil(ROTATE_BYTES / nbytes))))


def make_weights(K, N, R, key=0, bn=128):
    """R random int4_sym g128 weights, each a dict: packed / scales (mimo_jax.quant layout), wt / st (tiled
    kernel layout), wnk (the untiled [N, K] int4 layout)."""
    @jax.jit
    def one(k):
        k1, k2 = jax.random.split(k)
        packed = jax.random.randint(k1, (K // 2, N), 0, 256, jnp.int32).astype(jnp.uint8)
        scales = (0.01 + 0.01 * jax.random.uniform(k2, (K // GS, N))).astype(jnp.float16)
        wt, st = MG.to_kernel_layout(packed, scales, GS, bn=bn)
        return dict(packed=packed, scales=scales, wt=wt, st=st, wnk=MG.to_nk(packed, GS))
    return [one(jax.random.PRNGKey(key * 1000 + i)) for i in range(R)]


def kargs(cfg, w):
    return (w["wnk"], w["scales"]) if cfg.layout == "nk" else (w["wt"], w["st"])


def wbytes(K, N):
    return K * N // 2 + K // GS * N * 2


def io_bytes(M, K, N):
    return M * K * 2 + M * N * 2


def errs(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("nan"), float("nan")
    return (float(np.linalg.norm(a - b) / np.linalg.norm(b)),
            float(np.max(np.abs(a - b)) / np.max(np.abs(b))))


def record(kind, M, K, N, t, nb, ceiling, extra="", by=None, wall=None):
    r = dict(kind=kind, M=M, K=K, N=N, us=t * 1e6, tbs=nb / t / 1e12, pct=100 * nb / t / ceiling, extra=extra,
             kernels={k: v * 1e6 for k, v in (by or {}).items()}, wall_us=None if wall is None else wall * 1e6)
    RESULTS.append(r)
    dump()
    parts = ""
    if by and len(by) > 1:
        parts = " [" + ", ".join(f"{k[:24]} {v * 1e6:.2f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])) + "]"
    w = "" if wall is None else f" (host loop {wall * 1e6:.1f} us/call)"
    log(f"  {kind:22s} M={M:<3d} K={K:<5d} N={N:<5d} device {t * 1e6:7.2f} us {nb / t / 1e12:5.2f} TB/s "
        f"{r['pct']:5.1f}%{w}{parts} {extra}")
    return r


JSON_PATH = None


def dump():
    if JSON_PATH:
        try:
            with open(JSON_PATH, "w") as f:
                json.dump(dict(results=RESULTS, log=LOG), f, indent=1)
        except OSError:
            pass


def guard(what, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- report and go on
        msg = str(e).replace("\n", " | ")
        log(f"  FAILED {what}: {type(e).__name__}: {msg[:1500]}")
        tb = traceback.format_exc().splitlines()
        log("    " + " / ".join(l.strip() for l in tb[-6:])[:1500])
        return None


# --------------------------------------------------------------------------- measurements

def check_mgpu(M, K, N, cfg, ws, tag):
    w0 = ws[0]
    x = jax.random.normal(jax.random.PRNGKey(M + 7), (M, K), jnp.float32).astype(jnp.bfloat16)
    out = jax.jit(lambda x, w, s: MG.int4_matmul_mgpu(x, w, s, group_size=GS, cfg=cfg))(x, *kargs(cfg, w0))
    ref = jax.jit(lambda x, w, s: MG.reference(x, w, s, GS, jnp.float32))(x, w0["wt"], w0["st"])
    e, emax = errs(out, ref)
    ok = e < 1e-2
    log(f"  check {tag:22s} M={M:<3d} K={K:<5d} N={N:<5d} rel err {e:.2e} max {emax:.2e} "
        f"{'ok' if ok else 'BAD'}")
    RESULTS.append(dict(kind="check:" + tag, M=M, K=K, N=N, rel=e, maxrel=emax))
    return ok


def _x(M, K):
    return jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.float32).astype(jnp.bfloat16)


def time_mgpu(M, K, N, cfg, ws, ceiling, tag):
    x = _x(M, K)
    f = jax.jit(lambda x, w, s: MG.int4_matmul_mgpu(x, w, s, group_size=GS, cfg=cfg))
    t, by, wall = device_times(f, [(x, *kargs(cfg, w)) for w in ws])
    return record("mgpu:" + tag, M, K, N, t, wbytes(K, N) + io_bytes(M, K, N), ceiling, str(cfg), by, wall)


def time_triton(M, K, N, ws, ceiling):
    from pallas_kernels import int4_matmul as K4
    x = _x(M, K)
    f = jax.jit(lambda x, p, s: K4.int4_matmul(x, p, s, None, fmt="int4_sym", group_size=GS))
    t, by, wall = device_times(f, [(x, w["packed"], w["scales"]) for w in ws])
    return record("triton (today)", M, K, N, t, wbytes(K, N) + io_bytes(M, K, N), ceiling, "", by, wall)


def time_xla_deq(M, K, N, ws, ceiling):
    """XLA: group dequantize (the mimo_jax.quant layout, as quant.dequantize computes it) + bf16 dot."""
    x = _x(M, K)

    def deq(p, s):
        q = MG._unpack(p, GS).astype(jnp.float32) - 8.0
        return (q * jnp.repeat(s.astype(jnp.float32), GS, axis=0)).astype(jnp.bfloat16)

    f = jax.jit(lambda x, p, s: x @ deq(p, s))
    t, by, wall = device_times(f, [(x, w["packed"], w["scales"]) for w in ws])
    return record("xla dequantize+dot", M, K, N, t, wbytes(K, N) + io_bytes(M, K, N), ceiling, "", by, wall)


def time_xla_int4(M, K, N, ceiling):
    """XLA's best int4 form (../shared/MEASURED.md): jnp.int4 [K, N] converted inside the dot, per-channel
    scale (bytes counted as our g128 weight, for comparison with BENCHMARKS.md)."""
    R = rotation(K * N // 2)
    qs = [jax.random.randint(jax.random.PRNGKey(i), (K, N), -8, 8).astype(jnp.int4) for i in range(R)]
    s = jnp.full((N,), 0.01, jnp.bfloat16)
    f = jax.jit(lambda x, s, q: (x @ q.astype(jnp.bfloat16)) * s)
    t, by, wall = device_times(f, [(_x(M, K), s, q) for q in qs])
    return record("xla int4 convert+dot", M, K, N, t, wbytes(K, N) + io_bytes(M, K, N), ceiling, "", by, wall)


# --------------------------------------------------------------------------- drivers

def variants(M, K, N):
    """Configs tried per shape: the default (2 compute warpgroups x 64 rows, tiled layout) and wider CTAs
    (more warps streaming per SM); wider ones use the "nk" layout so that one set of weights serves all BN."""
    d = MG.default_config(M, K, N, GS)
    out = [("tiled W2x64", d), ("tiled W2x64 st8", dataclasses.replace(d, stages=8))]
    # (4 compute warpgroups x 64 rows hung on the H200, jax 0.11.2: int4_mgpu.check refuses it)
    for W, R in ((2, 128),):
        if N % (W * R) == 0:
            c = MG.default_config(M, K, N, GS, num_compute_wgs=W, wg_rows=R, layout="nk")
            out.append((f"nk W{W}x{R}", c))
    return out


def sweep(ceiling, shapes, ms, triton=True, xla=True):
    """Per shape and M: every variant (checked, then timed), then today's kernel and XLA; the best correct
    variant is logged as 'BEST'."""
    log("## int4_sym g128: Mosaic GPU variants vs today's Triton kernel vs XLA (device time, CUPTI)")
    for K, N in shapes:
        ws = guard(f"weights {K}x{N}", lambda: make_weights(K, N, rotation(wbytes(K, N))))
        if ws is None:
            continue
        for M in ms:
            best = None
            for tag, cfg in variants(M, K, N):
                ok = guard(f"check {tag} M={M} {K}x{N}", lambda: check_mgpu(M, K, N, cfg, ws, tag))
                if ok:
                    r = guard(f"time {tag} M={M} {K}x{N}", lambda: time_mgpu(M, K, N, cfg, ws, ceiling, tag))
                    if r and (best is None or r["us"] < best["us"]):
                        best = r
            if best:
                record("BEST mgpu " + best["kind"][5:], M, K, N, best["us"] * 1e-6,
                       wbytes(K, N) + io_bytes(M, K, N), ceiling, best["extra"])
            if triton:
                guard(f"time triton M={M} {K}x{N}", lambda: time_triton(M, K, N, ws, ceiling))
            if xla:
                guard(f"time xla deq M={M} {K}x{N}", lambda: time_xla_deq(M, K, N, ws, ceiling))
        ws = None  # free this shape's weights before the next shape's


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="variants on a subset of shapes, M in {1, 16}")
    ap.add_argument("--sweep", action="store_true", help="variants on all shapes")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--shapes", default="", help="e.g. 4096x16384,4096x2048 (K x N)")
    ap.add_argument("--no-xla", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_int4_mgpu.json"))
    a = ap.parse_args()
    global JSON_PATH
    JSON_PATH = a.json
    dev = jax.devices()[0]
    log(f"device {dev.device_kind}, jax {jax.__version__}, date {time.strftime('%Y-%m-%d %H:%M')}")
    ceiling = hbm_ceiling()
    log(f"HBM read ceiling (jnp.sum over 4 GiB bf16): {ceiling / 1e12:.2f} TB/s")
    ms = tuple(int(m) for m in a.ms.split(","))
    shapes = SHAPES
    if a.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in a.shapes.split(","))
    if a.quick:
        sweep(ceiling, shapes, (1, 16), xla=False)
    if a.sweep or not a.quick:
        sweep(ceiling, shapes, ms, xla=not a.no_xla)
    try:
        with open(a.json, "w") as f:
            json.dump(dict(ceiling=ceiling, device=dev.device_kind, jax=jax.__version__, results=RESULTS,
                           log=LOG), f, indent=1)
    except OSError as e:
        log(f"could not write {a.json}: {e}")


if __name__ == "__main__":
    main()
