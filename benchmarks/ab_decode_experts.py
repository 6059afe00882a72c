"""A/B of the decode MoE's expert kernel: the same profile_step run with decode pairs on pallas_kernels.int4_m1
(as routed; mxfp4 pairs are routed to the grouped kernel, so for mxfp4 these two arms run the same kernel) and
on the grouped int4_matmul kernel (the route before), in one process each, after a GPU check that the kernels
agree with the f32 dequantize + dot reference at the decode shapes. With --fold (mxfp4 only) three more arms:
decode pairs on the grouped kernel with the e8m0 scale folded into the decoded weights (KernelConfig.fold_scale),
one group per dot and 2 or 4 groups sharing one dot (unroll 2, 4), each checked too.

    python benchmarks/ab_decode_experts.py --fmt mxfp4 [--fold] [--config configs/mid_mimo.json] [profile_step flags]

Prints the check's relative errors, then profile_step's tables ("routed", "grouped", then with --fold
"folded", "folded_u2", "folded_u4"); any flag this script does not know goes to profile_step.py.
"""
from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FOLD_SIDES = {"folded": 1, "folded_u2": 2, "folded_u4": 4}  # arm -> groups sharing one dot


def fold_config(M: int, K: int, N: int, group: int, E: int, unroll: int):
    """The grouped kernel's default decode config with the scale folded in and `unroll` groups per dot; split-K
    halved while unroll * split does not divide the groups (check_shapes rejects what still does not)."""
    import dataclasses

    from pallas_kernels import int4_matmul as im

    cfg = im.default_grouped_config(M, K, N, group, E)
    split = cfg.split_k
    while split > 1 and (K // group) % (split * unroll):
        split //= 2
    return dataclasses.replace(cfg, fold_scale=True, unroll=unroll, split_k=split)


def check(fmt: str, group: int, fold: bool = False) -> None:
    """Decode shapes of mid_mimo (8 pairs of 64 experts): gate/up K=4096 N=2048, down K=2048 N=4096."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mimo_jax import quant as Q
    from pallas_kernels import int4_matmul as im

    ids = jnp.array([3, 17, 64, 40, 9, 63, 0, 22], jnp.int32)  # 64: a skipped pair (zero row)
    for K, N in ((4096, 2048), (2048, 4096)):
        w = Q.quantize(jax.random.normal(jax.random.PRNGKey(K), (64, K, N), jnp.float32) * 0.02, fmt, group)
        x = jax.random.normal(jax.random.PRNGKey(1), (8, K), jnp.float32).astype(jnp.bfloat16)
        ref = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32),
                         Q.dequantize(w, jnp.float32)[jnp.minimum(ids, 63)]) * (ids < 64)[:, None]
        arms = [("int4_m1", None), ("grouped", im.default_grouped_config(8, K, N, group, 64))]
        if fold:
            arms += [(side, fold_config(8, K, N, group, 64, u)) for side, u in FOLD_SIDES.items()]
        for name, cfg in arms:
            y = np.asarray(jax.jit(lambda x, w, i: Q.pair_qmatmul(x, w, i, impl="pallas", cfg=cfg))(x, w, ids),
                           np.float64)
            err = np.linalg.norm(y - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
            print(f"check {fmt} K={K} N={N} {name}: rel. err {err:.2e}, skipped row zero: {not y[2].any()}",
                  flush=True)
            assert err < 2e-2 and not y[2].any()


def grouped_only(fold_unroll: int | None = None) -> None:
    """Route decode pairs to the grouped kernel (an explicit config; with fold_unroll, the folded-scale loop
    with that many groups per dot), then run profile_step in this process."""
    from pallas_kernels import int4_matmul as im

    original = im.int4_grouped_matmul

    def grouped(x, group_sizes, weights, row_scale=None, *, fmt, group_size, cfg=None, **kw):
        if cfg is None and kw.get("row_experts") is not None:
            E, _, N = weights[0][0].shape
            M, K = x.shape
            cfg = (im.default_grouped_config(M, K, N, group_size, E) if fold_unroll is None
                   else fold_config(M, K, N, group_size, E, fold_unroll))
        return original(x, group_sizes, weights, row_scale, fmt=fmt, group_size=group_size, cfg=cfg, **kw)

    im.int4_grouped_matmul = grouped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="mxfp4", choices=["int4_sym", "int4_asym", "mxfp4"])
    ap.add_argument("--config", default="configs/mid_mimo.json")
    ap.add_argument("--fold", action="store_true", help="mxfp4: add the folded-scale grouped kernel arms")
    ap.add_argument("--side", default="both", choices=["both", "check", "routed", "grouped", *FOLD_SIDES],
                    help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.fold and args.fmt != "mxfp4":
        ap.error("--fold needs --fmt mxfp4 (the scale fold is an e8m0 exponent trick)")
    group = 32 if args.fmt == "mxfp4" else 128
    step_args = ["--config", args.config, "--quant_experts", args.fmt, "--quant_group", str(group), *rest]
    if args.side == "both":  # one process each: none holds the GPU's memory while another runs
        fold = ["--fold"] if args.fold else []
        for side in ("check", "routed", "grouped", *(FOLD_SIDES if args.fold else ())):
            print(f"\n==== {side} ====", flush=True)
            subprocess.run([sys.executable, __file__, "--side", side, "--fmt", args.fmt, "--config", args.config,
                            *fold, *rest], check=True)
        return
    if args.side == "check":
        check(args.fmt, group, args.fold)
        return
    if args.side == "grouped":
        grouped_only()
    elif args.side in FOLD_SIDES:
        grouped_only(FOLD_SIDES[args.side])
    sys.argv = [str(ROOT / "benchmarks" / "profile_step.py"), *step_args, "--tag", f"{args.fmt}_{args.side}"]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
