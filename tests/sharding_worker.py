"""Run by test_sharding.py in a fresh process with 8 simulated CPU devices; prints one JSON result line."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from mimo_jax import model, sharding  # noqa: E402
from mimo_jax.config import load_config  # noqa: E402
from mimo_jax.engine import Engine  # noqa: E402


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = load_config(os.path.join(root, "configs", "tiny_mimo.json"))
    # 8 q / 8 kv heads on both attention types so that "tp" really splits heads 2, 4 and 8 ways (heads that do
    # not divide fall back to replicated attention, which the "replicated" runs cover). The first 4 of tiny_mimo's 8
    # layers: every layer kind it has (full + dense, sliding + MoE, full + MoE), half the layers to compile.
    configs = {"wide": base.first_layers(4, num_heads=8, num_kv_heads=8, swa_num_heads=8, swa_num_kv_heads=8)}
    out = {"devices": len(jax.devices()), "logits": {}, "greedy": {}}
    rng = np.random.default_rng(0)
    for name, cfg in configs.items():
        params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
        ids = rng.integers(0, cfg.vocab_size, 40).tolist()
        ref = Engine(cfg, params, max_seq_len=128, prefill_chunk=16)
        ref_logits = ref.score(ids)
        prompt = ids[:27]
        ref_greedy = ref.generate(prompt, 24).token_ids
        # 2 devices in the CPU default layout (unrolled: one buffer per layer weight), 8 in the stacked "scan" layout
        # (the GPU default for small layers), so both layouts are checked sharded; 1- and 4-device meshes measured
        # nothing these do not, dropped for the suite's time.
        for n, layout in ((2, "unrolled"), (8, "scan")):
            for attention in ("tp", "replicated"):
                e = Engine(cfg, params, max_seq_len=128, prefill_chunk=16, mesh=sharding.make_mesh(n),
                           attention=attention, layout=layout)
                got = e.score(ids)
                key = f"{name}/{n}/{attention}/{layout}"
                out["logits"][key] = float(np.max(np.abs(got - ref_logits)) / np.max(np.abs(ref_logits)))
                out["greedy"][key] = e.generate(prompt, 24).token_ids == ref_greedy
            if n == 8:
                spec = Engine(cfg, params, max_seq_len=128, prefill_chunk=16, mesh=sharding.make_mesh(n),
                              speculative_k=4)
                out["greedy"][f"{name}/{n}/speculative"] = spec.generate(prompt, 24).token_ids == ref_greedy
        out["out_in_mesh"] = out_in_on_mesh(cfg, params, ids, ref_logits, prompt, ref_greedy)
    out["embed"] = vocab_split_embed()
    print("RESULT " + json.dumps(out))


def vocab_split_embed():
    """model.embed on a vocab-split table (2 and 8 devices): through sharding.vocab_embed (a shard_map, no gather
    of the table), equal to jnp.take for ids across the shards, negative ids included."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    res = {}
    table = np.random.default_rng(1).standard_normal((64, 12)).astype(np.float32)
    tokens = np.array([[0, 7, 8, 31, 32, 63, -1, -64]], np.int32)
    for n in (2, 8):
        mesh = sharding.make_mesh(n)
        placed = jax.device_put(table, NamedSharding(mesh, P(sharding.AXIS, None)))
        with jax.set_mesh(mesh):
            routed = "shard_map" in str(jax.make_jaxpr(model.embed)({"embed": placed}, tokens))
            got = np.asarray(jax.jit(model.embed)({"embed": placed}, tokens))
        res[str(n)] = routed and bool(np.array_equal(got, np.take(table, tokens, axis=0)))
    return res


def out_in_on_mesh(cfg, params, ids, ref_logits, prompt, ref_greedy):
    """The GPU's small-weights-"out, in" conversion (ops.OUT_IN_ON_MESH, off by default, with OUT_IN_ROUTER) on a 2-device
    tensor-parallel mesh: the converted params keep their shards transposed, the sharding table names the same
    specs for them (re-placing moves nothing), and logits / greedy equal the single-device run."""
    from mimo_jax import ops

    saved = ops.OUT_IN_ON_MESH, ops.OUT_IN_ROUTER
    ops.OUT_IN_ON_MESH = ops.OUT_IN_ROUTER = True
    try:
        e = Engine(cfg, params, max_seq_len=128, prefill_chunk=16, mesh=sharding.make_mesh(2), attention="tp",
                   layout="unrolled")
        e.params = e._for_device(e.params, "gpu")
    finally:
        ops.OUT_IN_ON_MESH, ops.OUT_IN_ROUTER = saved
    is_w = lambda a: isinstance(a, ops.OutInWeight)  # noqa: E731
    converted = [w.t for w in jax.tree_util.tree_leaves(e.params, is_leaf=is_w) if is_w(w)]
    placed = e._place(e.params)
    same = all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in
               zip(jax.tree_util.tree_leaves(e.params), jax.tree_util.tree_leaves(placed)))
    split = sum(len({str(s.index) for s in t.addressable_shards}) > 1 for t in converted)
    got = e.score(ids)
    return {"converted": len(converted), "split": split, "specs_match": same,
            "logits": float(np.max(np.abs(got - ref_logits)) / np.max(np.abs(ref_logits))),
            "greedy": e.generate(prompt, 24).token_ids == ref_greedy}


if __name__ == "__main__":
    main()
