"""JAX's persistent compilation cache for the command line and the server (their --compilation_cache flag).

Why on by default: XLA autotunes each GEMM-like fusion when a process compiles it, and the configuration it
picks can differ from one process to the next (timing noise), which moves bf16 rounding: on one H200 the same
greedy SmolLM2 run gave different logits in one process of three, and the real model's greedy text differed
between two launches (BENCHMARKS.md, session 13). Turning autotuning off or XLA's deterministic-ops mode fixes
that but doubled mid_mimo's decode step (1.50 -> 3.2-3.4 ms). With the compiled programs (and XLA's per-fusion
autotuning results) kept on disk, every later process on the machine runs the same programs: the same numbers
run to run, and no recompilation at start-up. (JAX writes an entry in place: a process killed in the middle of
a write leaves a short file, which later runs report as a warning and recompile; deleting the directory clears it.)"""
from __future__ import annotations

import os
import sys

DEFAULT_DIR = os.path.join("~", ".cache", "mimo_jax", "xla")


def enable(path: str | None) -> str | None:
    """Use `path` (user-expanded; created if missing; OSError if it cannot be, or is not writable) as JAX's
    persistent compilation cache, every program
    cached however small or fast to compile (a program left out would be autotuned afresh). None / "" = off.
    Call before the first compilation. Returns the directory used, or None."""
    if not path:
        return None
    import jax

    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def enable_or_warn(path: str | None) -> str | None:
    """enable(path); a directory that cannot be created or written turns the cache off with one warning line on
    stderr (the run itself does not need it)."""
    try:
        return enable(path)
    except OSError as e:
        print(f"warning: compilation cache off ({e})", file=sys.stderr)
        import jax

        jax.config.update("jax_compilation_cache_dir", None)
        return None
