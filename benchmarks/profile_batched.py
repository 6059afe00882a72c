"""The batched decode step (Batcher, B slots all decoding) timed and profiled kernel by kernel.

    python benchmarks/profile_batched.py --config configs/mid_mimo.json --quant_experts int4_sym --slots 32

B requests (random prompts of --prompt_len tokens) are admitted and prefilled, then the Batcher ticks with
every slot decoding and no prefill work: wall time per step (ticks back to back, as the server runs them),
then one traced stretch of ticks as a table of kernels grouped as in profile_step.py, and the step's floor
(weights + every touched expert + the slots' KV, over the read ceiling measured in this run).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step as P  # noqa: E402  (sets the HLO dump flags before jax starts)

os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace("(decode|step)", "(decode|step|generate)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mimo_jax import model  # noqa: E402
from mimo_jax.batching import Batcher, Request  # noqa: E402
from mimo_jax.config import load_config  # noqa: E402
from mimo_jax.engine import Engine  # noqa: E402

from ceiling import read_ceiling  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mid_mimo.json")
    ap.add_argument("--quant_experts", default="none")
    ap.add_argument("--quant_group", type=int, default=128)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keep_hlo", default="", help="copy the step's optimized HLO to this file")
    a = ap.parse_args()
    cfg = load_config(a.config)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    expert_itemsize = None
    if a.quant_experts != "none":
        from mimo_jax.quantize_model import quantize_experts

        params = quantize_experts(params, a.quant_experts, a.quant_group)
        expert_itemsize = 0.5 + 2 / a.quant_group
    engine = Engine(cfg, params, max_seq_len=a.capacity, prefill_chunk=a.prompt_len)
    batcher = Batcher(engine, a.slots, a.capacity)
    ceiling = read_ceiling()
    rng = np.random.default_rng(0)
    reqs = [batcher.submit(Request(ids=rng.integers(0, cfg.vocab_size, a.prompt_len).tolist(),
                                   max_new_tokens=a.capacity - a.prompt_len - 1, stop_at_eos=False))
            for _ in range(a.slots)]
    t0 = time.perf_counter()
    while not all(batcher._decoding) or batcher._prefills:  # admission, prefill, first steps (compiles)
        batcher.tick()
    for _ in range(5):
        batcher.tick()
    print(f"== {Path(a.config).stem}: {jax.devices()[0].device_kind}, {a.slots} slots decoding, capacity {a.capacity},"
          f" experts {a.quant_experts}; ready in {time.perf_counter() - t0:.1f} s; ceiling {ceiling / 1e9:.0f} GB/s")
    walls = []
    for _ in range(3):
        jax.block_until_ready(batcher.state)
        t = time.perf_counter()
        for _ in range(a.steps):
            batcher.tick()
        jax.block_until_ready(batcher.state)
        walls.append((time.perf_counter() - t) / a.steps)
    wall = min(walls)
    from bench_decode import step_bytes

    e_touched = (cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** a.slots)
                 if cfg.num_experts else None)
    nbytes = step_bytes(cfg, 2, a.capacity, a.slots, e_touched, expert_itemsize=expert_itemsize)
    kv_one = sum((a.capacity if kind == "full" else cfg.attention(kind).window) * cfg.attention(kind).num_kv_heads
                 * (cfg.attention(kind).head_dim + cfg.attention(kind).v_head_dim) * 2 for kind, _ in cfg.layer_kinds)
    nbytes += (a.slots - 1) * kv_one  # step_bytes counts one sequence's cache
    print(f"  wall {1e3 * wall:.3f} ms/step ({a.slots / wall:.0f} tok/s over the slots; best of 3: "
          f"{', '.join(f'{1e3 * w:.3f}' for w in walls)}) | floor {1e6 * nbytes / ceiling:.0f} us "
          f"({nbytes / 1e9:.2f} GB) -> {100 * nbytes / ceiling / wall:.1f}% of the floor")
    trace = tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(trace):
        for _ in range(10):
            batcher.tick()
        jax.block_until_ready(batcher.state)
    xplane = sorted(glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True))[-1]
    kernels, modules, _ = P.kernel_events(xplane)
    op_names = P.op_names_by_module(P._DUMP)
    per = collections.defaultdict(lambda: [0, 0.0])
    for name, us, st in kernels:
        module = str(st.get("hlo_module", ""))
        if not re.search("generate", module):
            continue
        g = P.group_of(name, P.op_name_of(op_names, module, str(st.get("hlo_op", "")), str(st.get("tf_op", "")), name))
        per[(g, name)][0] += 1
        per[(g, name)][1] += us
    runs = 10
    groups = collections.defaultdict(lambda: [0, 0.0])
    for (g, _), (c, us) in per.items():
        groups[g][0] += c
        groups[g][1] += us
    total = sum(us for _, us in groups.values()) / runs
    print(f"  kernel time {total / 1e3:.3f} ms/step ({sum(c for c, _ in groups.values()) / runs:.0f} kernels); "
          f"host/gaps {1e3 * wall - total / 1e3:.3f} ms")
    print("  | group | kernels/step | us/step |")
    for g, (c, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"  | {g} | {c / runs:.0f} | {us / runs:.1f} |")
    print("  top kernels: | group | kernel | count/step | us/step | us each |")
    for (g, name), (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"  | {g} | {name[:60]} | {c / runs:.1f} | {us / runs:.1f} | {us / c:.2f} |")
    if a.keep_hlo:
        import shutil

        dumps = [f for f in glob.glob(os.path.join(P._DUMP, "*after_optimizations.txt")) if "generate" in f]
        if dumps:
            shutil.copy(max(dumps, key=os.path.getsize), a.keep_hlo)
    for r in reqs:
        batcher.cancel(r)


if __name__ == "__main__":
    main()
