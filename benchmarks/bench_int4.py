"""Int4 dequant-matmul kernels against the HBM floor, on one GPU.

    python benchmarks/bench_int4.py [--check] [--sweep] [--table] [--grouped] [--quick]

Measures the HBM read ceiling in the same run (jnp.sum over 4 GiB of bf16), checks the kernels against
the XLA dequantize + dot reference, then times, per (M, K, N): the Pallas kernel, XLA's bf16 dot, XLA's
int4 -> bf16 convert + dot (per-channel scale, XLA's best int4 form) and, at M in {1, 16}, the XLA
fallback of mimo_jax.quant (group dequantize + dot). Bytes counted are the ones that must move: packed
weights + scales (+ mins) + activations + output. Weights rotate over enough copies (> 4x L2) that no
call reads them from L2; calls are enqueued back to back and synchronised once, so the time per op is
device time plus the launch gap a model's step also pays.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mimo_jax import quant as Q  # noqa: E402
from pallas_kernels import int4_matmul as K4  # noqa: E402

MS = (1, 2, 4, 8, 16, 32, 72)
SHAPES = ((4096, 16384), (16384, 4096), (4096, 2048), (2048, 4096), (6144, 2048))
ROTATE_BYTES = 256 << 20
IMPL = os.environ.get("BENCH_IMPL", "pallas")  # "interpret" only to smoke-test this script on a CPU
LOG = []


def log(*a):
    s = " ".join(str(v) for v in a)
    print(s, flush=True)
    LOG.append(s)


def timeit(f, *args, min_total=0.05, reps=5):
    """Seconds per call of f(*args): calls enqueued back to back, one sync per batch, median of reps."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    one = time.perf_counter() - t
    n = max(3, min(200, int(min_total / max(one, 1e-6))))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        outs = [f(*args) for _ in range(n)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t) / n)
    return float(np.median(ts))


def repeated(op, R, T=None):
    """jit of x, *rest -> op(x_t, *rest) for T perturbed copies x_t of x, so that one call holds T * R ops:
    enough device work that host dispatch (which grows with the number of weight arguments) hides
    behind it. Returns (jitted fn, T); time per op = time per call / (T * R). XLA baselines use T = 1:
    XLA merges dots that share a weight into one larger dot, which would read the weight once."""
    T = T or max(4, math.ceil(64 / R))

    def f(x, *rest):
        outs = []
        for t in range(T):
            # an add, not a scale: XLA's simplifier moves a scalar factor out of a dot and CSEs the copies
            xt = x if t == 0 else x + jnp.asarray(t * 2.0 ** -6, x.dtype)
            outs.append(op(xt, *rest))
        return outs

    return jax.jit(f), T


def hbm_ceiling():
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 31,), jnp.bfloat16)  # 4 GiB
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    t = timeit(f, x, min_total=0.1, reps=5)
    del x
    return (1 << 32) / t


def random_qweight(key, lead, K, N, fmt, gs):
    """Random codes and sane scales in the format (what the kernel streams; values need not be trained)."""
    k1, k2, k3 = jax.random.split(key, 3)
    packed = jax.random.randint(k1, (*lead, K // 2, N), 0, 256, jnp.int32).astype(jnp.uint8)
    if fmt == "mxfp4":
        scales = jax.random.randint(k2, (*lead, K // gs, N), 118, 124, jnp.int32).astype(jnp.uint8)
    else:
        scales = (0.01 + 0.01 * jax.random.uniform(k2, (*lead, K // gs, N))).astype(jnp.float16)
    mins = (-0.08 * jax.random.uniform(k3, (*lead, K // gs, N))).astype(jnp.float16) \
        if fmt == "int4_asym" else None
    return Q.QuantizedWeight(packed, scales, mins, fmt, gs, (K, N))


def io_bytes(M, K, N):
    return M * K * 2 + M * N * 2


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.isfinite(a).all() else float("nan")


# --------------------------------------------------------------------------- correctness on the GPU

def check():
    log("## correctness on GPU (kernel vs XLA dequantize + f32 dot; bf16 output)")
    worst = 0.0
    for fmt, gs in (("int4_sym", 32), ("int4_sym", 128), ("int4_asym", 32), ("int4_asym", 128), ("mxfp4", 32)):
        for (M, K, N) in ((1, 4096, 2048), (9, 2048, 4096), (16, 6144, 2048), (72, 4096, 512)):
            w = jax.random.normal(jax.random.PRNGKey(M + K), (K, N), jnp.float32)
            qw = Q.quantize(w, fmt, gs)
            x = jax.random.normal(jax.random.PRNGKey(N), (M, K), jnp.float32).astype(jnp.bfloat16)
            ref = x.astype(jnp.float32) @ Q.dequantize(qw, jnp.float32)
            for method in ("magic", "magic_sub", "asm"):
                cfg = dataclasses.replace(K4.default_config(M, K, N, gs), method=method)
                e = rel_err(jax.jit(lambda x, w: Q.qmatmul(x, w, impl=IMPL, cfg=cfg))(x, qw), ref)
                worst = max(worst, e if e == e else 1.0)
                if e != e or e > 1e-2 or method == "asm":
                    log(f"  dense {fmt:9s} g{gs:<3d} M={M:<3d} K={K:<5d} N={N:<5d} {method:9s} rel err {e:.2e}")
        E, K, N = 32, 1024, 512
        we = Q.quantize(jax.random.normal(jax.random.PRNGKey(1), (E, K, N)), fmt, gs)
        wu = Q.quantize(jax.random.normal(jax.random.PRNGKey(2), (E, K, N)), fmt, gs)
        ids = jnp.sort(jax.random.randint(jax.random.PRNGKey(3), (72,), 0, E))
        gsz = jnp.bincount(ids, length=E).astype(jnp.int32)
        x = jax.random.normal(jax.random.PRNGKey(4), (72, K), jnp.float32).astype(jnp.bfloat16)
        ref = jax.lax.ragged_dot(x.astype(jnp.float32), Q.dequantize(we, jnp.float32), gsz)
        refu = jax.lax.ragged_dot(x.astype(jnp.float32), Q.dequantize(wu, jnp.float32), gsz)
        e1 = rel_err(jax.jit(lambda x, w, g: Q.ragged_qmatmul(x, w, g, impl=IMPL))(x, we, gsz), ref)
        rs = jax.random.uniform(jax.random.PRNGKey(5), (72,))
        h = jax.jit(lambda x, a, b, g, r: Q.ragged_qmatmul_gate_up(x, a, b, g, r, impl=IMPL))(x, we, wu, gsz, rs)
        e2 = rel_err(h, jax.nn.silu(ref) * refu * rs[:, None])
        worst = max(worst, e1, e2)
        log(f"  grouped {fmt:9s} g{gs:<3d} E={E} M=72 rel err {e1:.2e}; fused gate/up {e2:.2e}")
    log(f"  worst rel err {worst:.2e} -> {'PASS' if worst < 1e-2 else 'FAIL'}")
    return worst < 1e-2


# --------------------------------------------------------------------------- dense timings

def _rotation(nbytes):
    return int(min(48, max(4, math.ceil(ROTATE_BYTES / nbytes))))


def time_pallas(M, K, N, fmt, gs, cfg, key=0):
    qw0 = random_qweight(jax.random.PRNGKey(key), (), K, N, fmt, gs)
    R = _rotation(qw0.nbytes)
    ws = [qw0] + [random_qweight(jax.random.PRNGKey(key + i + 1), (), K, N, fmt, gs) for i in range(R - 1)]
    x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.float32).astype(jnp.bfloat16)
    f, T = repeated(lambda x, ws: [Q.qmatmul(x, w, impl=IMPL, cfg=cfg) for w in ws], R)
    t = timeit(f, x, ws) / (R * T)
    return t, qw0.nbytes + io_bytes(M, K, N)


def time_xla_bf16(M, K, N):
    R = _rotation(K * N * 2)
    ws = [jax.random.normal(jax.random.PRNGKey(i), (K, N), jnp.bfloat16) for i in range(R)]
    x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.float32).astype(jnp.bfloat16)
    f, T = repeated(lambda x, ws: [x @ w for w in ws], R, T=1)
    return timeit(f, x, ws) / (R * T)


def time_xla_int4(M, K, N):
    """XLA's int4 path as ../shared/MEASURED.md measured it: jnp.int4 weights, per-channel scale."""
    R = _rotation(K * N // 2)
    qs = [jax.random.randint(jax.random.PRNGKey(i), (K, N), -8, 8).astype(jnp.int4) for i in range(R)]
    s = jnp.full((N,), 0.01, jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.float32).astype(jnp.bfloat16)
    f, T = repeated(lambda x, s, qs: [(x @ q.astype(jnp.bfloat16)) * s for q in qs], R, T=1)
    return timeit(f, x, s, qs) / (R * T)


def time_xla_fallback(M, K, N, fmt, gs):
    qw0 = random_qweight(jax.random.PRNGKey(0), (), K, N, fmt, gs)
    R = _rotation(qw0.nbytes)
    ws = [random_qweight(jax.random.PRNGKey(i), (), K, N, fmt, gs) for i in range(R)]
    x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.float32).astype(jnp.bfloat16)
    f, T = repeated(lambda x, ws: [Q.qmatmul(x, w, impl="xla") for w in ws], R, T=1)
    return timeit(f, x, ws) / (R * T)


def _try(M, K, N, c, ceiling, res, fmt="int4_sym", gs=128):
    try:
        t, nb = time_pallas(M, K, N, fmt, gs, c)
        res.append((t, c))
        log(f"  M={M:<3d} K={K:<5d} N={N:<5d} {c} {t * 1e6:8.1f} us {nb / t / 1e12:5.2f} TB/s "
            f"{100 * nb / t / ceiling:5.1f}%")
    except Exception as e:  # noqa: BLE001 -- report and go on
        log(f"  M={M} {c} FAILED {type(e).__name__}: {str(e)[:300]}")


def sweep(ceiling, quick=False):
    """Nibble conversion, then block shape / split-K, then warps / stages, at a few decode shapes."""
    log("## sweep (int4_sym g128; TB/s of bytes that must move; % of ceiling)")
    best = {}
    cases = [(1, 4096, 16384), (16, 4096, 16384), (1, 16384, 4096), (1, 4096, 2048), (16, 4096, 2048)]
    for (M, K, N) in cases[:2] if quick else cases:
        base = K4.default_config(M, K, N, 128)
        res = []
        for method in ("asm", "magic_sub"):
            _try(M, K, N, dataclasses.replace(base, method=method), ceiling, res)
        res.sort(key=lambda r: r[0])
        top = res[0][1]
        for bn in (64, 128, 256):
            for split in (1, 2, 4, 8, 16):
                c = dataclasses.replace(top, bn=bn, split_k=split)
                n_prog = (N // bn) * split * -(-M // c.bm)
                if N % bn == 0 and (K // 128) % split == 0 and 128 <= n_prog <= 1024 and c != top:
                    _try(M, K, N, c, ceiling, res)
        res.sort(key=lambda r: r[0])
        top = res[0][1]
        for nw, ns in ((2, 3), (4, 2), (4, 4), (4, 5), (8, 3), (8, 4)):
            _try(M, K, N, dataclasses.replace(top, num_warps=nw, num_stages=ns), ceiling, res)
        if (K // 128 // top.split_k) % 2 == 0:
            _try(M, K, N, dataclasses.replace(top, unroll=2), ceiling, res)
        res.sort(key=lambda r: r[0])
        best[(M, K, N)] = res[0]
        log(f"  BEST M={M} K={K} N={N}: {res[0][1]} {res[0][0] * 1e6:.1f} us")
    return best


GEMV_BEST = {}


def gemv_cfg(K, N, gs):
    """The M = 1 GEMV path's config: the in-run sweep's best, else >= ~2 programs per SM."""
    if (K, N) in GEMV_BEST:
        return GEMV_BEST[(K, N)]
    bn = 64 if N % 64 == 0 else 32
    split = 1
    while (N // bn) * split < 264 and (K // gs) % (split * 2) == 0 and split < 16:
        split *= 2
    return K4.KernelConfig(bm=1, bn=bn, split_k=split)


def gemv_sweep(ceiling):
    log("## M = 1: GEMV path (no tensor cores) vs the dot path; int4_sym g128 unless noted")
    for fmt, gs in (("int4_sym", 128), ("int4_asym", 32), ("mxfp4", 32)):
        w = jax.random.normal(jax.random.PRNGKey(0), (4096, 2048), jnp.float32)
        qw = Q.quantize(w, fmt, gs)
        x = jax.random.normal(jax.random.PRNGKey(1), (1, 4096), jnp.float32).astype(jnp.bfloat16)
        ref = x.astype(jnp.float32) @ Q.dequantize(qw, jnp.float32)
        e = rel_err(jax.jit(lambda x, w: Q.qmatmul(x, w, impl=IMPL, cfg=gemv_cfg(4096, 2048, gs)))(x, qw), ref)
        log(f"  gemv correctness {fmt} g{gs}: rel err {e:.2e} {'ok' if e < 1e-2 else 'FAIL'}")
    for (K, N) in ((4096, 16384), (16384, 4096), (4096, 2048)):
        res = []
        _try(1, K, N, K4.default_config(1, K, N, 128), ceiling, res)
        for bn in (32, 64):
            for split in (2, 4, 8, 16):
                n_prog = (N // bn) * split
                if (K // 128) % split == 0 and 256 <= n_prog <= 1024:
                    _try(1, K, N, K4.KernelConfig(bm=1, bn=bn, split_k=split), ceiling, res)
        res.sort(key=lambda r: r[0])
        gem = [r for r in res if r[1].bm == 1]
        if gem:
            GEMV_BEST[(K, N)] = gem[0][1]
        log(f"  BEST M=1 K={K} N={N}: {res[0][1]} {res[0][0] * 1e6:.1f} us")


def table(ceiling, fmt="int4_sym", gs=128, ms=MS, shapes=SHAPES):
    log(f"## dense table: {fmt} g{gs}; ceiling {ceiling / 1e12:.2f} TB/s")
    hdr = ("| M | K | N | kernel us | TB/s | % ceiling | XLA bf16 us | x vs bf16 | XLA int4 us | x vs int4 "
           "| XLA fallback us |")
    log(hdr)
    log("|" + "---|" * 11)
    rows = []
    for (K, N) in shapes:
        for M in ms:
            try:
                t, nb = time_pallas(M, K, N, fmt, gs, None)
                path = "dot"
                if M == 1 and GEMV_BEST:
                    tg, _ = time_pallas(M, K, N, fmt, gs, gemv_cfg(K, N, gs))
                    log(f"  (M=1 K={K} N={N}: dot path {t * 1e6:.1f} us, GEMV path {tg * 1e6:.1f} us)")
                    if tg < t:
                        t, path = tg, "gemv"
                tb = time_xla_bf16(M, K, N)
                ti = time_xla_int4(M, K, N)
                tf = time_xla_fallback(M, K, N, fmt, gs) if M in (1, 16) else float("nan")
            except Exception as e:  # noqa: BLE001
                log(f"| {M} | {K} | {N} | FAILED {type(e).__name__}: {str(e)[:150]} |")
                continue
            r = dict(M=M, K=K, N=N, path=path, us=t * 1e6, tbs=nb / t / 1e12, pct=100 * nb / t / ceiling,
                     bf16_us=tb * 1e6, x_bf16=tb / t, int4_us=ti * 1e6, x_int4=ti / t, fallback_us=tf * 1e6)
            rows.append(r)
            log(f"| {M} | {K} | {N} | {r['us']:.1f} | {r['tbs']:.2f} | {r['pct']:.0f}% | {r['bf16_us']:.1f} | "
                f"{r['x_bf16']:.2f} | {r['int4_us']:.1f} | {r['x_int4']:.2f} | {r['fallback_us']:.1f} |")
    return rows


# --------------------------------------------------------------------------- grouped (MoE) timings

def routing(key, tokens, top_k, E):
    ids = jax.vmap(lambda k: jax.random.choice(k, E, (top_k,), replace=False))(jax.random.split(key, tokens))
    ids = jnp.sort(ids.reshape(-1))
    return jnp.bincount(ids, length=E).astype(jnp.int32)


def grouped(ceiling, fmt="int4_sym", gs=128, cfgs=(None,), fused=True):
    log(f"## grouped: {fmt} g{gs}, 256 experts, top-8; bytes of touched experts only")
    E = 256
    out = []
    for tokens in (9, 1):
        for (K, N) in ((4096, 2048), (2048, 4096)):
            w = random_qweight(jax.random.PRNGKey(0), (E,), K, N, fmt, gs)
            wu = random_qweight(jax.random.PRNGKey(1), (E,), K, N, fmt, gs) if (fused and K == 4096) else None
            per_expert = w.nbytes // E
            R = 8
            gszs = [routing(jax.random.PRNGKey(10 + i), tokens, 8, E) for i in range(R)]
            touched = [int((g > 0).sum()) for g in gszs]
            M = tokens * 8
            x = jax.random.normal(jax.random.PRNGKey(5), (M, K), jnp.float32).astype(jnp.bfloat16)
            for cfg in cfgs:
                try:
                    f, T = repeated(lambda x, w, gs_: [Q.ragged_qmatmul(x, w, g, impl=IMPL, cfg=cfg) for g in gs_], R)
                    t = timeit(f, x, w, gszs) / (R * T)
                    nb = np.mean(touched) * per_expert + io_bytes(M, K, N)
                    r = dict(tokens=tokens, K=K, N=N, touched=float(np.mean(touched)), us=t * 1e6,
                             tbs=nb / t / 1e12, pct=100 * nb / t / ceiling, cfg=str(cfg), kind="single")
                    out.append(r)
                    log(f"  {tokens} tok x top-8: K={K} N={N} touched {r['touched']:.1f} {t * 1e6:7.1f} us "
                        f"{r['tbs']:.2f} TB/s {r['pct']:.0f}% cfg={cfg}")
                    if wu is not None:
                        f, T = repeated(lambda x, w, u, gs_: [Q.ragged_qmatmul_gate_up(x, w, u, g, impl=IMPL, cfg=cfg)
                                                              for g in gs_], R)
                        t = timeit(f, x, w, wu, gszs) / (R * T)
                        nb = 2 * np.mean(touched) * per_expert + io_bytes(M, K, N)
                        r = dict(r, us=t * 1e6, tbs=nb / t / 1e12, pct=100 * nb / t / ceiling, kind="gate_up")
                        out.append(r)
                        log(f"  {tokens} tok x top-8: fused gate+up K={K} N={N} {t * 1e6:7.1f} us "
                            f"{r['tbs']:.2f} TB/s {r['pct']:.0f}%")
                except Exception as e:  # noqa: BLE001
                    log(f"  grouped K={K} N={N} cfg={cfg} FAILED {type(e).__name__}: {str(e)[:200]}")
            del w, wu
    return out


def capture_ptx():
    """Keep the PTX of every Triton kernel compiled in this process (for reading offline)."""
    from jax._src.lib import triton as jtriton
    kept = []
    orig = getattr(jtriton, "compile", None)
    if orig is None:
        log(f"(no jax._src.lib.triton.compile to hook in this jaxlib: {dir(jtriton)})")
        return kept

    def compile_and_keep(*args, **kw):
        r = orig(*args, **kw)
        kept.append((kw.get("num_warps"), kw.get("num_stages"), getattr(r, "smem_bytes", None), r.asm))
        return r

    jtriton.compile = compile_and_keep
    return kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--grouped", action="store_true")
    ap.add_argument("--grouped-sweep", action="store_true")
    ap.add_argument("--grouped-split", action="store_true", help="grouped kernel: split-K / block sweep")
    ap.add_argument("--formats", action="store_true", help="M in {1,16} rows for every format")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gemv-sweep", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dump-ptx", action="store_true")
    a = ap.parse_args()
    kept = capture_ptx() if a.dump_ptx else None
    log(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; date {time.strftime('%Y-%m-%d')}")
    ceiling = hbm_ceiling()
    log(f"HBM read ceiling (sum over 4 GiB bf16): {ceiling / 1e12:.3f} TB/s")
    res = {"ceiling": ceiling}
    if a.check:
        res["check"] = check()
    if a.sweep:
        res["sweep"] = {str(k): (v[0], str(v[1])) for k, v in sweep(ceiling, a.quick).items()}
    if a.gemv_sweep:
        gemv_sweep(ceiling)
        res["gemv_best"] = {str(k): str(v) for k, v in GEMV_BEST.items()}
    if a.grouped_sweep:
        cfgs = [None] + [K4.KernelConfig(bn=bn, unroll=u, num_warps=nw, num_stages=ns, method=m)
                         for bn, u, nw, ns, m in ((128, 2, 4, 3, "magic_sub"), (128, 1, 4, 3, "asm"),
                                                  (64, 2, 4, 3, "asm"), (128, 2, 4, 4, "asm"))]
        res["grouped_sweep"] = grouped(ceiling, cfgs=cfgs, fused=False)
    if a.grouped_split:
        cfgs = [None] + [K4.KernelConfig(bn=bn, split_k=sk, unroll=u)
                         for bn, sk, u in ((128, 1, 1), (128, 2, 1), (128, 4, 1), (128, 8, 1), (64, 2, 1), (64, 4, 1))]
        res["grouped_split"] = grouped(ceiling, cfgs=cfgs, fused=True)
    if a.table:
        res["table"] = table(ceiling, ms=(1, 16) if a.quick else MS)
    if a.formats:
        res["formats"] = []
        for fmt, gs in (("int4_sym", 32), ("int4_asym", 32), ("mxfp4", 32)):
            res["formats"] += table(ceiling, fmt, gs, ms=(1, 16), shapes=((4096, 16384), (4096, 2048)))
    if a.grouped:
        res["grouped"] = grouped(ceiling)
        if not a.quick:
            res["grouped_mxfp4"] = grouped(ceiling, "mxfp4", 32, fused=False)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_int4.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    if kept:
        with open(os.path.join(a.out, "kernels_ptx.txt"), "w") as fh:
            for nw, ns, smem, asm in kept:
                fh.write(f"//// num_warps={nw} num_stages={ns} smem={smem}\n{asm}\n")
    with open(os.path.join(a.out, "bench_int4.log"), "w") as fh:
        fh.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
