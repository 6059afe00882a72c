"""Instruction mix of a Pallas (Triton) kernel's main loop for sm_90, without a GPU.

    pip install --target /tmp/tri triton==3.6.0     # the GPU image's version; not a project dependency
    PYTHONPATH=/tmp/tri python benchmarks/triton_sass.py [--what int4_m1|gemv|fused|formats]

Lowers the int4_m1 variants at the decode shapes for `lowering_platforms=("cuda",)` on this (CPU) machine,
captures the Triton IR jax emits, compiles it with pip Triton for sm_90 (ttgir -> ptx -> cubin; ptxas and
nvdisasm ship in the wheel) and counts the SASS instructions of the longest loop. "instr/weight" = loop
instructions x 32 threads / weights per warp and iteration (mma.sync m16n8k16: 128 weights per HMMA; wgmma
m64n16k16: 256 per HGMMA and warp). XLA bundles its own Triton, so this is a guide to what the GPU runs, not
a copy of it. Uses jax internals (the Pallas Triton lowering entry point), so it may need updating with jax.
--what gemv: the dense bf16 GEMV (pallas_kernels/gemv.py) at M = 1 with and without its hand prefetch, and at
M = 9: instructions per weight of the loop and its asynchronous copies (LDGSTS: a pipelined load).
--what fp8: the FP8 block-scaled GEMV (gemv.fp8_config) at MiMo's dense shapes.
--what formats: the routed decode-pair kernel for int4_sym (group 128) and MXFP4 (group 32) at mid_mimo's shapes;
MXFP4 also with its scales inside the e2m1 decode (int4_matmul.FOLD_SCALE_IN_DECODE).
--what fused: the fused decode layer's three kernels (pallas_kernels/decode_layer.py) for SmolLM2 shapes: whole
kernel instruction mix, global / local-memory loads, and attn_out's asynchronous copies at 1-3 stages; with the
products as FMAs, then as pipelined dots (DOTS).
--what pair: the bf16 routed-expert pair GEMV (pallas_kernels/pair_gemv.py) at mid_mimo's shapes, 448- and 64-expert stacks.
--what layouts: the expert kernels at mid_mimo's shapes with the weights stored "kn" and "nk" (mimo_jax.quant
layouts): the routed decode pairs (int4_m1, M1_NK's forms for nk) and the grouped verify kernel (9 tokens x top-8).
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import lowering as _L  # noqa: E402


def capture_ttir(fn, *args) -> list[str]:
    """The Triton IR of every pallas_call in jax.jit(fn)(*args), lowered for CUDA."""
    texts, orig = [], _L.lower_jaxpr_to_triton_module

    def keep(*a, **k):
        r = orig(*a, **k)
        texts.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    _L.lower_jaxpr_to_triton_module = keep
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        _L.lower_jaxpr_to_triton_module = orig
    return texts


def sass_of(ttir: str, num_warps: int, num_stages: int) -> tuple[str, int]:
    """(SASS text, shared memory bytes) of a Triton IR kernel compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ttir")
        open(src, "w").write(ttir)
        cc = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
        cubin = os.path.join(d, "k.cubin")
        open(cubin, "wb").write(cc.asm["cubin"])
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        return subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout, \
            cc.metadata.shared


def loop_mix(ttir: str, num_warps: int, num_stages: int) -> collections.Counter:
    """SASS opcode counts of the longest backward-branch loop of the kernel compiled for sm_90."""
    sass, _ = sass_of(ttir, num_warps, num_stages)
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.search(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m:
            ins.append((m.group(1), m.group(2)))
    best = (0, len(ins) - 1)
    loops = [(labels[t.group(1)], j) for j, (op, rest) in enumerate(ins) if op.startswith("BRA")
             for t in [re.search(r"\.(L_x_\d+)", rest)] if t and labels.get(t.group(1), j) < j]
    if loops:
        best = max(loops, key=lambda ab: ab[1] - ab[0])
    return collections.Counter(op.split(".")[0] for op, _ in ins[best[0]:best[1] + 1])


def opcode_mix(sass: str) -> collections.Counter:
    return collections.Counter(m.group(1).split(".")[0] for m in
                               re.finditer(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))


def gemv_main():
    import dataclasses
    from pallas_kernels import gemv as G
    S = jax.ShapeDtypeStruct
    for M, K, N in ((1, 8192, 4096), (1, 4096, 14848), (9, 4096, 14848)):
        d = G.default_config(M, K, N)
        for cfg in ((d, dataclasses.replace(d, prefetch=True), dataclasses.replace(G.default_config(9, K, N), dot=True))
                    if M == 1 else (d,)):
            (ttir,) = capture_ttir(lambda x, w: G.gemv(x, w, cfg=cfg), S((M, K), jnp.bfloat16), S((K, N), jnp.bfloat16))
            c = loop_mix(ttir, cfg.num_warps, cfg.num_stages)
            per_thread = cfg.bk * cfg.bn / (32 * cfg.num_warps)
            print(f"M={M} {K}x{N} prefetch={cfg.prefetch} dot={cfg.dot}: loop {sum(c.values())} instr = "
                  f"{sum(c.values()) / per_thread:.2f}/weight, LDGSTS {c['LDGSTS']}; "
                  + " ".join(f"{k} {v}" for k, v in c.most_common(8)), flush=True)


def fp8_main():
    """The FP8 block-scaled GEMV (mimo_jax/fp8.py) at MiMo's shapes: its default form, the dot in f16, the FMA form."""
    import dataclasses
    from pallas_kernels import gemv as G
    S = jax.ShapeDtypeStruct
    for M, K, N in ((1, 4096, 14848), (9, 4096, 14848), (1, 16384, 4096), (9, 16384, 4096), (1, 4096, 32768)):
        d = G.fp8_config(M, K, N)
        for nk in (False, True):
            for cfg in (d, dataclasses.replace(d, dot=True, f16=True), dataclasses.replace(d, dot=False)):
                if M > 1 and not cfg.dot:
                    continue
                w = S((N, K) if nk else (K, N), jnp.float8_e4m3fn)
                (ttir,) = capture_ttir(lambda x, w, s: G.gemv(x, w, scale=s, cfg=cfg, nk=nk), S((M, K), jnp.bfloat16),
                                       w, S((K // 128, N // 128), jnp.float32))
                c = loop_mix(ttir, cfg.num_warps, cfg.num_stages)
                per_thread = cfg.bk * cfg.bn / (32 * cfg.num_warps)
                print(f"fp8 M={M} {K}x{N} nk={nk} dot={cfg.dot} f16={cfg.f16} split={cfg.split_k}: loop "
                      f"{sum(c.values())} instr = {sum(c.values()) / per_thread:.2f}/weight, LDGSTS {c['LDGSTS']}; "
                      + " ".join(f"{k} {v}" for k, v in c.most_common(10)), flush=True)


def fused_main():
    from mimo_jax import model
    from mimo_jax.config import load_config
    from pallas_kernels import decode_layer
    for dot in (False, True):  # the products as FMAs, then as pipelined 16-row dots (DOTS)
        decode_layer.DOTS = dot
        jax.clear_caches()  # the kernels' jits read the knobs when they trace
        print(f"-- products as {'16-row dots (DOTS, DOT_STAGES)' if dot else 'FMAs'}")
        _fused_kernels(model, load_config, decode_layer.DOT_STAGES if dot else 1)


def _fused_kernels(model, load_config, dot_stages):
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                   "smollm2_135m.json")).replace(num_mtp_layers=0)
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    cache = jax.eval_shape(lambda: model.init_cache(cfg, 1, 256))
    S = jax.ShapeDtypeStruct
    ttirs = capture_ttir(lambda p, t, q, c: model.forward_hidden(p, t, q, c, cfg, "pallas"), params,
                         S((1, 1), jnp.int32), S((1,), jnp.int32), cache)
    for ttir in ttirs:
        name = re.search(r"tt.func public @(\w+)", ttir).group(1)
        for stages in ((1, 2, 3) if "attn_out" in name and dot_stages == 1 else (dot_stages,)):
            sass, smem = sass_of(ttir, 4, stages)
            c = opcode_mix(sass)
            print(f"{name} stages {stages}: {sum(c.values())} instr, LDG {c['LDG']}, LDGSTS {c['LDGSTS']}, LDL "
                  f"{c['LDL']}, BAR {c['BAR']}, smem {smem} B; " + " ".join(f"{k} {v}" for k, v in c.most_common(8)),
                  flush=True)


def per_weight(c: collections.Counter) -> float:
    if c["HGMMA"]:
        return sum(c.values()) / (8 * c["HGMMA"])
    return sum(c.values()) / (4 * max(c["HMMA"], 1))


def formats_main():
    """The routed decode-pair kernel (int4_grouped_matmul with row_experts and no config: int4_m1 with its default
    config) for each 4-bit format at mid_mimo's pair shapes: where MXFP4 (group 32, e8m0 scales folded per F
    groups) spends more instructions per weight than int4 (group 128)."""
    from pallas_kernels import int4_matmul as K4
    S = jax.ShapeDtypeStruct
    for fmt, g, sdt, in_decode in (("int4_sym", 128, jnp.float16, False), ("mxfp4", 32, jnp.uint8, False),
                                   ("mxfp4", 32, jnp.uint8, True)):
        K4.FOLD_SCALE_IN_DECODE = in_decode  # the knob, read when the kernel traces (its jit cache cleared)
        jax.clear_caches()
        for name, K, N, nw in (("gate/up", 4096, 2048, 2), ("down", 2048, 4096, 1)):
            cfg = K4.routed_m1_config(fmt, 8, K, N, g, nw)
            fn = lambda x, i, p, s: K4.int4_grouped_matmul(x, None, ((p, s, None),) * nw, fmt=fmt, group_size=g,
                                                           row_experts=i, epilogue="silu_mul" if nw == 2 else "none")
            (ttir,) = capture_ttir(fn, S((8, K), jnp.bfloat16), S((8,), jnp.int32), S((64, K // 2, N), jnp.uint8),
                                   S((64, K // g, N), sdt))
            c = loop_mix(ttir, cfg.num_warps, cfg.num_stages)
            print(f"{fmt:8s} g{g:<3d} {name:8s} fold {cfg.fold}{' in decode' if in_decode else ''} split "
                  f"{cfg.split_k} bn {cfg.bn}: loop "
                  f"{sum(c.values()):5d} instr, {per_weight(c):.2f} instr/weight; "
                  + " ".join(f"{k} {v}" for k, v in c.most_common(10)), flush=True)


def layouts_main():
    """Routed decode pairs and the grouped verify kernel, weights "kn" vs "nk", int4_sym g128 and MXFP4."""
    from pallas_kernels import int4_matmul as K4
    S = jax.ShapeDtypeStruct
    for fmt, g, sdt in (("int4_sym", 128, jnp.float16), ("mxfp4", 32, jnp.uint8)):
        for layout in ("kn", "nk"):
            for name, K, N, nw in (("gate/up", 4096, 2048, 2), ("down", 2048, 4096, 1)):
                p = S((64,) + ((K // 2, N) if layout == "kn" else (N, K // 2)), jnp.uint8)
                sc = S((64, K // g, N), sdt)
                ep = "silu_mul" if nw == 2 else "none"
                for rows, what in ((8, "decode pairs"), (72, "verify grouped")):
                    if rows == 8:
                        cfg = K4.routed_m1_config(fmt, 8, K, N, g, nw, layout)
                        fn = lambda x, i, p, s: K4.int4_grouped_matmul(  # noqa: E731
                            x, None, ((p, s, None),) * nw, fmt=fmt, group_size=g, row_experts=i, epilogue=ep,
                            layout=layout)
                        args = (S((8, K), jnp.bfloat16), S((8,), jnp.int32), p, sc)
                        desc = f"m1 {cfg.orient} bn{cfg.bn} w{cfg.num_warps} split {cfg.split_k}"
                    else:
                        cfg = K4.default_grouped_config(72, K, N, g, 64)
                        fn = lambda x, gs, p, s: K4.int4_grouped_matmul(  # noqa: E731
                            x, gs, ((p, s, None),) * nw, fmt=fmt, group_size=g, epilogue=ep, layout=layout)
                        args = (S((72, K), jnp.bfloat16), S((64,), jnp.int32), p, sc)
                        desc = f"grouped bm{cfg.bm} bn{cfg.bn} split {cfg.split_k}"
                    (ttir,) = capture_ttir(fn, *args)
                    c = loop_mix(ttir, cfg.num_warps, cfg.num_stages)
                    print(f"{fmt:8s} {layout} {name:8s} {what:15s} {desc:28s} loop {sum(c.values()):5d} instr, "
                          f"{per_weight(c):.2f} instr/weight; " + " ".join(f"{k} {v}" for k, v in c.most_common(8)),
                          flush=True)


def pair_main():
    """The bf16 routed-expert pair GEMV (pallas_kernels/pair_gemv.py) at mid_mimo's decode shapes on the flattened
    7-layer stack (448 experts: offsets past 2^31 elements): loop instructions per weight, and whether the weight
    addresses are computed in 64 bits (IMAD.WIDE / 64-bit adds on the expert offset)."""
    from pallas_kernels import pair_gemv as PG
    S = jax.ShapeDtypeStruct
    for name, K, N, nw, E in (("gate/up", 4096, 2048, 2, 448), ("down", 2048, 4096, 1, 448), ("gate/up small", 4096,
                                                                                          2048, 2, 64)):
        cfg = PG.default_config(8, K, N, nw)
        fn = lambda x, i, *ws: PG.pair_gemv(x, ws, i, cfg=cfg, epilogue="silu_mul" if nw == 2 else "none")  # noqa: E731
        (ttir,) = capture_ttir(fn, S((8, K), jnp.bfloat16), S((8,), jnp.int32), *([S((E, K, N), jnp.bfloat16)] * nw))
        sass, _ = sass_of(ttir, cfg.num_warps, cfg.num_stages)
        c = loop_mix(ttir, cfg.num_warps, cfg.num_stages)
        per_thread = nw * cfg.bk * cfg.bn / (32 * cfg.num_warps)
        i64 = f"{K * N}_i64" in ttir  # the expert stride (K * N elements) as a 64-bit constant: e * K * N in 64 bits
        print(f"pair {name} E={E} {K}x{N} bn{cfg.bn} bk{cfg.bk} split {cfg.split_k}: loop {sum(c.values())} instr = "
              f"{sum(c.values()) / per_thread:.2f}/weight, LDG {c['LDG']}, LDGSTS {c['LDGSTS']}; expert stride in i64: {i64}; "
              f"IMAD.WIDE in SASS: {sass.count('IMAD.WIDE')}; " + " ".join(f"{k} {v}" for k, v in c.most_common(8)),
              flush=True)


def main():
    what = sys.argv[sys.argv.index("--what") + 1] if "--what" in sys.argv else "int4_m1"
    if what != "int4_m1":
        return {"gemv": gemv_main, "fp8": fp8_main, "fused": fused_main, "formats": formats_main, "layouts": layouts_main,
                "pair": pair_main}[what]()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_int4_m1 import VARIANTS, m1_cfg
    from pallas_kernels import int4_matmul as K4
    from pallas_kernels.int4_m1 import int4_m1_matmul
    S = jax.ShapeDtypeStruct
    for name, K, N, nw in (("gate/up", 4096, 2048, 2), ("down", 2048, 4096, 1)):
        old = K4.default_grouped_config(8, K, N, 128, 64)
        fn = lambda x, i, p, s: K4.int4_grouped_matmul(x, None, ((p, s, None),) * nw, fmt="int4_sym", group_size=128,
                                                       cfg=old, row_experts=i, epilogue="silu_mul" if nw == 2 else "none")
        (ttir,) = capture_ttir(fn, S((8, K), jnp.bfloat16), S((8,), jnp.int32), S((64, K // 2, N), jnp.uint8),
                               S((64, K // 128, N), jnp.float16))
        c = loop_mix(ttir, old.num_warps, old.num_stages)
        print(f"{'int4_matmul row tiles (before)':36s} {name:8s} loop {sum(c.values()):5d} instr, "
              f"{per_weight(c):.2f} instr/weight; " + " ".join(f"{k} {v}" for k, v in c.most_common(8)), flush=True)
    for label in VARIANTS:
        for name, K, N, nw in (("gate/up", 4096, 2048, 2), ("down", 2048, 4096, 1)):
            cfg = m1_cfg(label, 8, K, N, nw)
            p = S((64,) + ((K // 2, N) if cfg.layout == "kn" else (N, K // 2)), jnp.uint8)
            s = S((64, K // 128, N), jnp.float16)
            fn = lambda x, i, p, s: int4_m1_matmul(x, ((p, s, None),) * nw, i, fmt="int4_sym", group_size=128,
                                                   cfg=cfg, epilogue="silu_mul" if nw == 2 else "none")
            (ttir,) = capture_ttir(fn, S((8, K), jnp.bfloat16), S((8,), jnp.int32), p, s)
            c = loop_mix(ttir, cfg.num_warps, cfg.num_stages)
            print(f"{label:36s} {name:8s} loop {sum(c.values()):5d} instr, {per_weight(c):.2f} instr/weight; "
                  + " ".join(f"{k} {v}" for k, v in c.most_common(8)), flush=True)


if __name__ == "__main__":
    main()
