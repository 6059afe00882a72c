"""The read ceiling every benchmark measures in its own run: jnp.sum over a large array, bytes read / time."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def read_ceiling(nbytes: int | None = None, reps: int = 10) -> float:
    """Bytes per second read by a jitted jnp.sum (4 GiB on an accelerator, 256 MiB on CPU by default)."""
    nbytes = nbytes or ((1 << 32) if jax.default_backend() != "cpu" else (1 << 28))
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        r = f(x)
    r.block_until_ready()
    return reps * x.nbytes / (time.perf_counter() - t)
