"""A/B of the decode MoE's expert kernel: the same profile_step run with decode pairs on pallas_kernels.int4_m1
(as routed: int4_matmul.M1_ROUTES; for mxfp4 only the down projection) and on the grouped int4_matmul kernel, in one process each, after a GPU check that the kernels agree with
the f32 dequantize + dot reference at the decode shapes. For mxfp4 a third arm, "jnp_decode": the grouped kernel
with e2m1 decoded by jnp ops (KernelConfig method "magic_sub") instead of the PTX decode (`_e2m1_asm`, method
"asm", the default), whose check also demands exact weights (one-hot rows of x read single weights: a flushed
subnormal code would show), and a fourth, "m1": all mxfp4 decode pairs (gate/up too) routed to int4_m1.

    python benchmarks/ab_decode_experts.py --fmt mxfp4 [--config configs/mid_mimo.json] [profile_step flags]

Prints the check's relative errors, then profile_step's tables ("routed", "grouped", mxfp4: "jnp_decode", "m1"); any
flag this script does not know goes to profile_step.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check(fmt: str, group: int) -> None:
    """Decode shapes of mid_mimo (8 pairs of 64 experts): gate/up K=4096 N=2048, down K=2048 N=4096."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mimo_jax import quant as Q
    from pallas_kernels import int4_matmul as im
    from pallas_kernels.int4_m1 import default_m1_config, int4_m1_matmul

    ids = jnp.array([3, 17, 64, 40, 9, 63, 0, 22], jnp.int32)  # 64: a skipped pair (zero row)
    for K, N in ((4096, 2048), (2048, 4096)):
        w = Q.quantize(jax.random.normal(jax.random.PRNGKey(K), (64, K, N), jnp.float32) * 0.02, fmt, group)
        x = jax.random.normal(jax.random.PRNGKey(1), (8, K), jnp.float32).astype(jnp.bfloat16)
        ref = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32),
                         Q.dequantize(w, jnp.float32)[jnp.minimum(ids, 63)]) * (ids < 64)[:, None]
        grouped = im.default_grouped_config(8, K, N, group, 64)
        arms = [("int4_m1", "m1"), ("grouped", grouped)]
        if fmt == "mxfp4":
            arms.append(("jnp_decode", dataclasses.replace(grouped, method="magic_sub")))
            # one-hot rows: row r reads weight (k_r, n) alone, exact in bf16 (e2m1 * 2^k), for all n
            ks = jnp.array([0, 1, 31, 32, 100, 2047, 1000, 17], jnp.int32)
            onehot = jax.nn.one_hot(ks, K, dtype=jnp.bfloat16)
            exact = Q.dequantize(w, jnp.float32)[jnp.minimum(ids, 63), ks] * (ids < 64)[:, None]
            y = jax.jit(lambda x, w, i: Q.pair_qmatmul(x, w, i, impl="pallas", cfg=grouped))(onehot, w, ids)
            wrong = int((np.asarray(y, np.float32) != np.asarray(exact)).sum())
            print(f"check {fmt} K={K} N={N} grouped single weights: {wrong} of {exact.size} differ", flush=True)
            assert wrong == 0
        for name, cfg in arms:
            if cfg == "m1":  # int4_m1 called directly (whatever the routing)
                m1 = default_m1_config(8, K, N, group, 1, layout="kn")
                f = jax.jit(lambda x, w, i: int4_m1_matmul(x, (Q._weight_arrays(w),), jnp.minimum(i, 64), fmt=fmt,
                                                           group_size=group, cfg=m1))
            else:
                f = jax.jit(lambda x, w, i: Q.pair_qmatmul(x, w, i, impl="pallas", cfg=cfg))
            y = np.asarray(f(x, w, ids), np.float64)
            err = np.linalg.norm(y - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
            print(f"check {fmt} K={K} N={N} {name}: rel. err {err:.2e}, skipped row zero: {not y[2].any()}",
                  flush=True)
            assert err < 5e-3 and not y[2].any()


def grouped_only(method: str | None = None) -> None:
    """Route decode pairs to the grouped kernel (an explicit config; with method, every default grouped config
    takes that nibble decode), then run profile_step in this process."""
    from pallas_kernels import int4_matmul as im

    if method is not None:
        default = im.default_grouped_config
        im.default_grouped_config = lambda *a, **kw: dataclasses.replace(default(*a, **kw), method=method)

    original = im.int4_grouped_matmul

    def grouped(x, group_sizes, weights, row_scale=None, *, fmt, group_size, cfg=None, **kw):
        if cfg is None and kw.get("row_experts") is not None:
            E, _, N = weights[0][0].shape
            cfg = im.default_grouped_config(x.shape[0], x.shape[1], N, group_size, E)
        return original(x, group_sizes, weights, row_scale, fmt=fmt, group_size=group_size, cfg=cfg, **kw)

    im.int4_grouped_matmul = grouped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="mxfp4", choices=["int4_sym", "int4_asym", "mxfp4"])
    ap.add_argument("--config", default="configs/mid_mimo.json")
    ap.add_argument("--side", default="both", choices=["both", "check", "routed", "grouped", "jnp_decode", "m1"],
                    help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    group = 32 if args.fmt == "mxfp4" else 128
    step_args = ["--config", args.config, "--quant_experts", args.fmt, "--quant_group", str(group), *rest]
    if args.side == "both":  # one process each: none holds the GPU's memory while another runs
        for side in ("check", "routed", "grouped", *(("jnp_decode", "m1") if args.fmt == "mxfp4" else ())):
            print(f"\n==== {side} ====", flush=True)
            subprocess.run([sys.executable, __file__, "--side", side, "--fmt", args.fmt, "--config", args.config,
                            *rest], check=True)
        return
    if args.side == "check":
        check(args.fmt, group)
        return
    if args.side == "grouped":
        grouped_only()
    elif args.side == "jnp_decode":
        if args.fmt != "mxfp4":
            ap.error("--side jnp_decode is an mxfp4 arm")
        grouped_only("magic_sub")
    elif args.side == "m1":  # mxfp4 decode pairs routed to int4_m1 as int4's are
        from pallas_kernels import int4_matmul as im

        if im.M1_ROUTES.get(args.fmt) == (1, 2):
            ap.error(f"--side m1: {args.fmt} pairs already run int4_m1 (the routed arm)")
        im.M1_ROUTES = {**im.M1_ROUTES, args.fmt: (1, 2)}
    sys.argv = [str(ROOT / "benchmarks" / "profile_step.py"), *step_args, "--tag", f"{args.fmt}_{args.side}"]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
