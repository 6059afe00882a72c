"""Plain decode step time of one config under structural variants of the layer loop (a measuring aid).

    python benchmarks/decode_variants.py --config configs/smollm2_135m.json --variant scan|unroll

scan: the layer plan's lax.scan (today's model). unroll: the same layers as a Python loop with static layer
indices (one flat program, no while loop). Run it once per XLA_FLAGS setting to compare command buffers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from mimo_jax import model
from mimo_jax.config import load_config


def _unrolled_run(x, params, experts, cache, positions, kind, cfg, outer=(), got=(), first=0, taps=()):
    length = jax.tree_util.tree_leaves(params)[0].shape[0]
    for i in range(length):
        p = jax.tree_util.tree_map(lambda a: a[i], params)
        x, cache = model.decoder_layer(p, x, positions, cache, (*outer, i), kind, cfg, experts)
    return x, cache, got  # (no layer taps here)


def time_decode(cfg, params, capacity: int, steps: int = 200):
    cache = model.init_cache(cfg, 1, capacity, jnp.bfloat16)
    tok = jnp.zeros((1, 1), jnp.int32)
    f = jax.jit(lambda p, t, pos, c: model.forward(p, t, pos, c, cfg), donate_argnums=3)
    logits, cache = f(params, tok, jnp.zeros((1,), jnp.int32), cache)
    logits.block_until_ready()
    t = time.perf_counter()
    for i in range(steps):
        logits, cache = f(params, tok, jnp.full((1,), i + 1, jnp.int32), cache)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
    tok.block_until_ready()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2_135m.json")
    ap.add_argument("--variant", default="scan")
    ap.add_argument("--capacity", type=int, default=256)
    args = ap.parse_args()
    cfg = load_config(args.config).replace(num_mtp_layers=0)
    if args.variant == "unroll":
        model._scan_run = _unrolled_run
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    t = time_decode(cfg, params, args.capacity)
    print(f"variant {args.variant} | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | {Path(args.config).stem}: "
          f"{1e3 * t:.3f} ms/step ({1 / t:.0f} tok/s)")


if __name__ == "__main__":
    main()
