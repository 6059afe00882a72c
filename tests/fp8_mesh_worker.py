"""Run by test_fp8_dense.py in a fresh process with 2 simulated CPU devices; prints one JSON result line:
FP8 products on a mesh (the GEMV kernel in interpret mode under shard_map, N split and K split) against the
float64 reference, an Engine with FP8 dense weights on 2 devices against one device (greedy tokens), and a hub
FP8 checkpoint loaded with dense="fp8" onto 2 devices against one device (every array, and greedy tokens)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jax.sharding import PartitionSpec as P  # noqa: E402

from mimo_jax import fp8, model, sharding  # noqa: E402
from mimo_jax.config import load_config  # noqa: E402
from mimo_jax.engine import Engine  # noqa: E402
from mimo_jax.quantize_model import quantize_dense  # noqa: E402


def products():
    mesh = sharding.make_mesh(2)
    out = {}
    w = 0.05 * jax.random.normal(jax.random.PRNGKey(0), (512, 768), jnp.float32)
    for layout in ("kn", "nk"):
        fw = fp8.quantize(w, layout=layout)
        ref = None
        for name, logical in (("n_split", (None, sharding.AXIS)), ("k_split", (sharding.AXIS, None))):
            stored = logical[::-1] if layout == "nk" else logical
            spec = fp8.Fp8Weight(P(*stored), P(*stored), fw.block, fw.layout)
            placed = sharding.shard({"w": fw}, {"w": spec}, mesh)["w"]
            assert placed.spec == tuple(P(*stored))
            for M in (1, 9):
                x = jax.random.normal(jax.random.PRNGKey(M), (M, 512), jnp.float32).astype(jnp.bfloat16)
                ref = np.asarray(x, np.float64) @ np.asarray(fp8.dequantize(fw), np.float64)
                with jax.set_mesh(mesh):
                    got = jax.jit(lambda x, f: fp8.matmul(x, f, impl="interpret"))(x, placed)
                err = float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())
                out[f"{layout} {name} M={M}"] = err
    return out


def engine(fmt: str = "fp8"):
    base = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                    "tiny_mimo.json"))
    cfg = base.first_layers(4, num_heads=8, num_kv_heads=8, swa_num_heads=8, swa_num_kv_heads=8)
    params = quantize_dense(model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32), fmt)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 12).tolist()
    one = Engine(cfg, params, max_seq_len=64).generate(prompt, 10).token_ids
    sharded = Engine(cfg, params, max_seq_len=64, mesh=sharding.make_mesh(2))
    two = sharded.generate(prompt, 10).token_ids
    noted = [w.spec for w in jax.tree_util.tree_leaves(sharded.params, is_leaf=lambda a: isinstance(a, fp8.Fp8Weight))
             if isinstance(w, fp8.Fp8Weight)]
    return {"one": one, "two": two, "noted": [list(s) if s is not None else None for s in noted]}


def loaded(directory: str):
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hf_fixtures import fp8_round_trip, random_hf_model, save_hub_layout
    from mimo_jax.loader import load_checkpoint

    hf = random_hf_model(7, num_layers=4, window=5, hidden_size=256, moe_intermediate_size=128, n_routed_experts=8,
                         num_attention_heads=4, num_key_value_heads=2)
    fp8_round_trip(hf)
    path = save_hub_layout(hf, tempfile.mkdtemp(dir=directory), shards=2)
    mesh = sharding.make_mesh(2)
    _, one = load_checkpoint(path, jnp.float32, dense="fp8")
    _, two = load_checkpoint(path, jnp.float32, dense="fp8", mesh=mesh)
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)))
    split = any(isinstance(w, fp8.Fp8Weight) and "model" in tuple(w.w.sharding.spec)
                for w in jax.tree_util.tree_leaves(two, is_leaf=lambda a: isinstance(a, fp8.Fp8Weight)))
    kw = dict(dtype=jnp.float32, dense="fp8", max_seq_len=64)
    greedy = [Engine.from_pretrained(path, **kw, **m).generate([1, 2, 3, 4], 6).token_ids for m in ({}, {"mesh": mesh})]
    return {"same_arrays": same, "split": split, "greedy": greedy}


if __name__ == "__main__":
    print(json.dumps({"devices": len(jax.devices()), "products": products(), "engine": engine(),
                      "engine_all": engine("fp8_all"),
                      "loaded": loaded(sys.argv[1] if len(sys.argv) > 1 else "/tmp")}))
