"""Multi-host start: two processes joined by jax.distributed.initialize (CPU, gloo collectives) run the model
over a mesh spanning both, and agree with one process on one device."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import model
from mimo_jax.config import load_config
from mimo_jax.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_processes_match_one(tmp_path):
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed_worker.py"), str(i), port,
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for i in range(2)]
    # the one-process reference, computed while the two processes start up and compile
    cfg = load_config(ROOT / "configs" / "tiny_mimo.json").first_layers(4)  # the workers'
    engine = Engine(cfg, model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32), max_seq_len=64,
                    prefill_chunk=16)
    ref = engine.score(list(range(1, 30)))
    ref_tokens = engine.generate(list(range(1, 12)), max_new_tokens=12).token_ids
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    for i in range(2):
        got = np.load(tmp_path / f"logits{i}.npy")
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5
        assert np.load(tmp_path / f"tokens{i}.npy").tolist() == ref_tokens
