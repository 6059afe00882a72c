"""Expert-parallel decode on several GPUs at MiMo-V2-Flash layer shapes with random int4 experts.

    python benchmarks/bench_sharded.py --devices 2 --layers 48 --attention tp

Weights are generated directly on their devices (no host copy). Prints: the HBM read ceiling per device
(measured now), the decode step time against the floor (bytes one step must read, spread over the devices),
the time split by stubbing parts out (attention only / MoE only), the latency of one small psum, and the
collectives in the compiled step.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
import re
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mimo_jax import model, quant, sharding
from mimo_jax.config import MOE, load_config
from mimo_jax.quantize_model import _is_expert, check_format, expert_layout, quantized_struct

from ceiling import read_ceiling

GROUP = 128


def abstract_params(cfg, fmt: str = "int4_sym"):
    """The params' shapes with every routed-expert stack as the QuantizedWeight quantizing it to `fmt` gives
    (groups of GROUP; MXFP4: 32)."""
    fmt, group = check_format(fmt, GROUP)

    def to_q(path, s):
        return quantized_struct(s, fmt, group, layout=expert_layout(fmt)) if _is_expert(path, s) else s
    return jax.tree_util.tree_map_with_path(to_q, model.param_shapes(cfg, jnp.bfloat16))


def random_params(cfg, mesh, attention, fmt: str = "int4_sym"):
    """Random params made on their devices (each device only its shard): random 4-bit codes, expert scales of
    one magnitude (float16 0.004; MXFP4's e8m0 2^-7, so e2m1 codes up to 6 give weights up to ~0.05)."""
    shapes = abstract_params(cfg, fmt)
    specs = sharding.specs(shapes, cfg, mesh, attention)
    is_q = lambda a: isinstance(a, quant.QuantizedWeight)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=is_q)
    spec_leaves = jax.tree_util.tree_flatten(specs, is_leaf=is_q)[0]

    def on_mesh(spec):
        return NamedSharding(mesh, spec)

    out_shardings = jax.tree_util.tree_unflatten(treedef, [
        jax.tree_util.tree_map(on_mesh, sp) if is_q(sp) else on_mesh(sp) for sp in spec_leaves])

    def dense(s, k):
        if len(s.shape) == 1:
            return jnp.ones(s.shape, s.dtype)
        return (s.shape[-2] ** -0.5 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)

    def expert(w, k):
        scales = (jnp.full(w.scales.shape, 127 - 7, jnp.uint8) if w.fmt == "mxfp4"
                  else jnp.full(w.scales.shape, 0.004, w.scales.dtype))
        mins = None if w.mins is None else jnp.full(w.mins.shape, -0.03, w.mins.dtype)
        return dataclasses.replace(w, packed=jax.random.bits(k, w.packed.shape, jnp.uint8), scales=scales, mins=mins)

    def make(key):
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(treedef, [expert(s, k) if is_q(s) else dense(s, k)
                                                      for s, k in zip(leaves, keys)])

    return jax.jit(make, out_shardings=out_shardings)(jax.random.PRNGKey(0))


def time_decode(cfg, params, mesh, attention, steps=64):
    cache = model.init_cache(cfg, 1, 1024, jnp.bfloat16)
    cache = sharding.shard(cache, sharding.specs(cache, cfg, mesh, attention), mesh)
    tok = jnp.zeros((1, 1), jnp.int32)
    with jax.set_mesh(mesh):
        compiled = model.forward.lower(params, tok, jnp.zeros((1,), jnp.int32), cache, cfg).compile()
        for i in range(3):
            logits, cache = compiled(params, tok, jnp.full((1,), i, jnp.int32), cache)
        logits.block_until_ready()
        t = time.perf_counter()
        for i in range(3, 3 + steps):
            logits, cache = compiled(params, tok, jnp.full((1,), i, jnp.int32), cache)
        logits.block_until_ready()
    return (time.perf_counter() - t) / steps, compiled.as_text()


def psum_latency(mesh, h, reps=48):
    x = jax.device_put(jnp.ones((mesh.shape[sharding.AXIS], h), jnp.bfloat16),
                       NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS)))

    @jax.jit
    def f(x):
        def body(c, _):
            y = jax.shard_map(lambda a: jax.lax.psum(a, sharding.AXIS), mesh=mesh,
                              in_specs=jax.sharding.PartitionSpec(sharding.AXIS),
                              out_specs=jax.sharding.PartitionSpec(sharding.AXIS))(c)
            return y * 0.5, None
        return jax.lax.scan(body, x, None, length=reps)[0]

    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        r = f(x)
    r.block_until_ready()
    return (time.perf_counter() - t) / (10 * reps)


def step_bytes(cfg, n_dev):
    h, total = cfg.hidden_size, 0.0
    for attn_kind, mlp_kind in cfg.layer_kinds:
        s = cfg.attention(attn_kind)
        total += 2 * (h * (s.num_heads * s.head_dim + s.num_kv_heads * (s.head_dim + s.v_head_dim))
                      + s.num_heads * s.v_head_dim * h)
        if mlp_kind == MOE:
            total += cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size * (0.5 + 2 / GROUP)
            total += 4 * h * cfg.num_experts
        else:
            total += 2 * 3 * h * cfg.intermediate_size
    return total + 2 * h * cfg.vocab_size


def engine_rows(cfg, params, mesh, args):
    from mimo_jax.engine import Engine

    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 1024).tolist()
    for k in (0, args.k):
        e = Engine(cfg, params, max_seq_len=2048, prefill_chunk=1024, mesh=mesh, attention=args.attention,
                   speculative_k=k)
        e.generate(prompt, max_new_tokens=8, stop_at_eos=False)  # compile
        st = e.generate(prompt, max_new_tokens=64, stop_at_eos=False).stats
        if k == 0:
            t_plain = 1 / st.decode_tok_s
            print(f"engine: prefill of a 1024-token prompt {st.prefill_ms:.0f} ms; plain decode "
                  f"{1e3 * t_plain:.2f} ms/token ({st.decode_tok_s:.1f} tok/s)")
        else:
            t_step = st.decode_s / max(st.spec_steps, 1)
            proj = ", ".join(f"a={a}: {(a + 1) / t_step:.0f} tok/s" for a in (4.3, 5.6, 6.3))
            print(f"engine: speculative k={k} step {1e3 * t_step:.2f} ms ({t_step / t_plain:.2f}x plain), "
                  f"{st.mean_accepted:.2f} accepted/step (random MTP); projected {proj}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mimo_v2_flash.json")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--devices", type=int, default=len(jax.devices()))
    ap.add_argument("--attention", default="tp")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--engine", action="store_true", help="also time through the Engine: 1K-token prefill, plain "
                    "decode and the speculative step (k = --k, MTP drafter with random weights)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--skip_split", action="store_true")
    args = ap.parse_args()
    global GROUP
    GROUP = args.group
    base = load_config(args.config)
    n = args.layers
    cfg = base.first_layers(n, num_mtp_layers=base.num_mtp_layers if args.engine else 0)
    mesh = sharding.make_mesh(args.devices)
    ceiling = read_ceiling() / 1e12
    params = random_params(cfg, mesh, args.attention)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    print(f"{args.devices} x {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.config} with {n} layers, "
          f"int4_sym g{GROUP} experts, attention {args.attention}; {nbytes / 1e9:.1f} GB of weights; "
          f"HBM read ceiling {ceiling:.2f} TB/s per device (measured now)")
    t_full, hlo = time_decode(cfg, params, mesh, args.attention)
    floor = step_bytes(cfg, args.devices) / (args.devices * ceiling * 1e12)
    print(f"decode step: {1e3 * t_full:.3f} ms ({1 / t_full:.0f} tok/s); floor {1e3 * floor:.3f} ms "
          f"(step bytes {step_bytes(cfg, 1) / 1e9:.2f} GB over {args.devices} devices) -> "
          f"{100 * floor / t_full:.0f}% of the floor-limited speed")
    ops = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in ("all-reduce", "all-gather", "all-to-all",
                                                                      "reduce-scatter", "collective-permute")}
    print(f"collectives in the compiled step (static count; loop bodies run once per layer): {ops}")
    if args.engine:
        engine_rows(cfg, params, mesh, args)
    if args.skip_split:
        return
    real_attention, real_moe = model.attention, model.moe
    try:
        model.moe = lambda p, stack, index, h, *a: jnp.zeros_like(h)
        jax.clear_caches()
        t_attn, _ = time_decode(cfg, params, mesh, args.attention)
        model.moe = real_moe
        model.attention = lambda p, x, positions, cache, index, spec: (jnp.zeros_like(x), cache)
        jax.clear_caches()
        t_moe, _ = time_decode(cfg, params, mesh, args.attention)
    finally:
        model.attention, model.moe = real_attention, real_moe
    t_psum = psum_latency(mesh, cfg.hidden_size)
    print(f"per layer: full {1e6 * t_full / n:.1f} us; attention-only model {1e6 * t_attn / n:.1f} us; "
          f"MoE-only model {1e6 * t_moe / n:.1f} us; one psum of [1, {cfg.hidden_size}] bf16 {1e6 * t_psum:.1f} us")


if __name__ == "__main__":
    main()
