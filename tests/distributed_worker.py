"""One process of a 2-process jax.distributed run on CPU (started by test_distributed.py)."""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: str, out_dir: str):
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp

    from mimo_jax import model, sharding
    from mimo_jax.config import load_config
    from mimo_jax.engine import Engine

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # tiny_mimo's first 4 layers: every layer kind it has (full + dense, sliding + MoE, full + MoE)
    cfg = load_config(os.path.join(root, "configs", "tiny_mimo.json")).first_layers(4)
    params = jax.device_get(model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32))  # same on every host
    assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    engine = Engine(cfg, params, max_seq_len=64, prefill_chunk=16, mesh=sharding.make_mesh())
    logits = engine.score(list(range(1, 30)))
    tokens = engine.generate(list(range(1, 12)), max_new_tokens=12).token_ids
    np.save(os.path.join(out_dir, f"logits{process_id}.npy"), logits)
    np.save(os.path.join(out_dir, f"tokens{process_id}.npy"), np.asarray(tokens))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
