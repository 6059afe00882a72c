"""Plain decode step: the fused Pallas layer kernels vs the XLA path, same weights, same cache bucket.

    python benchmarks/bench_fused.py --config configs/smollm2_135m.json [--profile] [--steps 300]

Checks first that both paths agree (logits of a few steps, greedy tokens), then times each (warm, the exact
shapes compiled before timing, the cache donated, tokens fed back on the device), measures the HBM read
ceiling in the same run and prints ms/token, tok/s and % of the floor; --profile adds the kernel table of
one step of each path (profile_step.py's attribution).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import profile_step  # noqa: E402  (sets the HLO dump flags before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mimo_jax import fused_decode, model  # noqa: E402
from mimo_jax.config import load_config  # noqa: E402

from bench_decode import step_bytes  # noqa: E402
from ceiling import read_ceiling  # noqa: E402


def make_step(cfg, kernels):
    def step(params, token, pos, cache):
        h, cache = model.forward_hidden(params, token, pos, cache, cfg, kernels)
        logits = model.lm_logits(params, h[:, 0], cfg)
        return jnp.argmax(logits, -1).astype(jnp.int32)[:, None], logits, pos + 1, cache
    return jax.jit(step, donate_argnums=3)


def prefill(cfg, params, ids, capacity):
    cache = model.init_cache(cfg, 1, capacity, jnp.bfloat16)
    _, cache = model.forward(params, jnp.asarray(ids[None]), jnp.arange(len(ids), dtype=jnp.int32), cache, cfg)
    return cache


def run(step, params, cache, token, pos, n):
    for _ in range(n):
        token, _, pos, cache = step(params, token, pos, cache)
    return token, pos, cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2_135m.json")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--quant_experts", default="none")
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--paths", default="xla,pallas")
    ap.add_argument("--attn_out_stages", type=int, default=0, help="pipeline stages of the fused attn_out kernel's "
                    "key loop (pallas_kernels.decode_layer.ATTN_OUT_STAGES; 0: its default)")
    ap.add_argument("--dots", action="store_true", help="the fused kernels' products as pipelined 16-row dots "
                    "(pallas_kernels.decode_layer.DOTS)")
    ap.add_argument("--fma", action="store_true", help="the fused kernels' products as FMA loops (DOTS off: the "
                    "form before session 16)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from pallas_kernels import decode_layer

    if args.attn_out_stages:
        decode_layer.ATTN_OUT_STAGES = args.attn_out_stages
    decode_layer.DOTS = (decode_layer.DOTS or args.dots) and not args.fma
    cfg = load_config(args.config).replace(num_mtp_layers=0)
    if args.layers:
        n = args.layers
        cfg = cfg.first_layers(n)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    expert_itemsize = None
    if args.quant_experts != "none":
        from mimo_jax.quantize_model import quantize_experts

        params = quantize_experts(params, args.quant_experts, 128)
        expert_itemsize = 0.5 + 2 / 128
    ceiling = read_ceiling()
    floor = step_bytes(cfg, 2, args.capacity, expert_itemsize=expert_itemsize) / ceiling
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).astype(np.int32)
    cache = prefill(cfg, params, ids, args.capacity)
    why = fused_decode.unsupported(cfg, params, cache)
    print(f"== {Path(args.config).stem} ({cfg.num_layers} layers), {jax.devices()[0].device_kind}, jax "
          f"{jax.__version__}; ceiling {ceiling / 1e9:.0f} GB/s; floor {1e3 * floor:.4f} ms/token; fused path: "
          f"{why or 'yes'}")
    paths = args.paths.split(",")
    steps = {p: make_step(cfg, p) for p in paths}
    # agreement: 8 greedy steps from the same cache, logits compared at each
    token0, pos0 = jnp.asarray(ids[-1:][None]), jnp.array([args.prompt_len], jnp.int32)
    outs = {}
    for p in paths:
        c = jax.tree_util.tree_map(jnp.copy, cache)
        tok, pos, rows, toks = token0, pos0, [], []
        for _ in range(8):
            tok, logits, pos, c = steps[p](params, tok, pos, c)
            rows.append(np.asarray(logits, np.float32))
            toks.append(int(tok[0, 0]))
        outs[p] = (np.concatenate(rows), toks)
    if len(paths) > 1:
        ref, got = outs[paths[0]], outs[paths[1]]
        err = np.abs(got[0] - ref[0]).max() / np.abs(ref[0]).max()
        print(f"agreement over 8 steps: max |logit diff| / max |logit| = {err:.2e}; greedy tokens "
              f"{'identical' if ref[1] == got[1] else f'differ: {ref[1]} vs {got[1]}'}")
    for p in paths:
        c = jax.tree_util.tree_map(jnp.copy, cache)
        tok, pos, c = run(steps[p], params, c, token0, pos0, 3)  # compiled above; settle
        tok.block_until_ready()
        t = time.perf_counter()
        tok, pos, c = run(steps[p], params, c, tok, pos, args.steps)
        tok.block_until_ready()
        dt = (time.perf_counter() - t) / args.steps
        print(f"{p:>7}: {1e3 * dt:.4f} ms/token ({1 / dt:.0f} tok/s), {100 * floor / dt:.1f}% of the floor")
        if args.profile:
            trace = tempfile.mkdtemp()
            with jax.profiler.trace(trace):
                tok, pos, c = run(steps[p], params, c, tok, pos, 10)
                tok.block_until_ready()
            print_table(trace, cfg.num_layers, 10)


def print_table(trace, n_layers, runs):
    import collections
    import glob

    xplane = sorted(glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True))[-1]
    kernels, _, _ = profile_step.kernel_events(xplane)
    op_names = profile_step.op_names_by_module(profile_step._DUMP)
    groups, per = collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(lambda: [0, 0.0])
    for name, us, st in kernels:
        module = str(st.get("hlo_module", ""))
        if "step" not in module:
            continue
        op = profile_step.op_name_of(op_names, module, str(st.get("hlo_op", "")), str(st.get("tf_op", "")), name)
        g = profile_step.group_of(name, op)
        for d in (groups[g], per[(g, name)]):
            d[0] += 1
            d[1] += us
    total = sum(c for c, _ in groups.values()) / runs
    print(f"   kernels/step {total:.0f} ({total / n_layers:.1f}/layer), kernel time "
          f"{sum(u for _, u in groups.values()) / runs / 1e3:.4f} ms/step")
    for g, (c, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"   | {g} | {c / runs:.0f} | {us / runs:.1f} us |")
    for (g, name), (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"   | {g} | {name[:50]} | {c / runs:.0f} | {us / runs:.1f} us | {us / c:.2f} us each |")


if __name__ == "__main__":
    main()
