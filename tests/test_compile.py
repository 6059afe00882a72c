"""The real MiMo-V2-Flash configuration lowers and compiles on CPU from abstract shapes (no weights in memory)."""
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mimo_jax import model
from mimo_jax.config import load_config
from mimo_jax.engine import _decode, _prefill

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name,billions", [("mimo_v2_flash", 309), ("mimo_v2_5_pro", 1020)])
def test_real_config_compiles_from_abstract_shapes(name, billions):
    cfg = load_config(CONFIGS / f"{name}.json")
    params = model.param_shapes(cfg, jnp.bfloat16)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert abs(n_params / 1e9 - billions) / billions < 0.01  # public totals: 309B, 1.02T
    cache = model.cache_shapes(cfg, batch=1, capacity=4096)
    i32, f32 = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    t0 = time.perf_counter()
    decode = _decode.lower(params, jax.ShapeDtypeStruct((1,), jnp.int32), i32, cache, key, f32, i32, f32,
                           cfg=cfg, is_greedy=True).compile()
    _prefill.lower(params, jax.ShapeDtypeStruct((1, 64), jnp.int32), jax.ShapeDtypeStruct((64,), jnp.int32),
                   cache, cfg).compile()
    print(f"{name}: decode step + 64-token prefill chunk lowered and compiled in {time.perf_counter() - t0:.0f} s")
    assert "while" in decode.as_text()  # the layers are scanned, not unrolled
