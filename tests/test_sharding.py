"""Sharded == single device on 8 simulated CPU devices (mesh sizes 2 and 8, unrolled and scan layouts; TP and
replicated attention; speculative at 8)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimo_jax.sharding import TABLE


@pytest.fixture(scope="module")
def result():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sharding_worker.py"))], capture_output=True,
                          text=True, timeout=1500, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def test_eight_devices_simulated(result):
    assert result["devices"] == 8


def test_sharded_logits_equal_single_device(result):
    assert len(result["logits"]) == 4  # 2 mesh sizes (each its layout) x 2 attention modes
    for key, err in result["logits"].items():
        assert err < 1e-5, key


def test_sharded_greedy_identical(result):
    assert len(result["greedy"]) == 5  # and speculative at 8 devices
    assert all(result["greedy"].values()), {k: v for k, v in result["greedy"].items() if not v}


def test_out_in_weights_on_a_mesh_equal_single_device(result):
    """ops.OUT_IN_ON_MESH: attention's small weights stored "out, in" on a 2-device TP mesh stay split (the table
    transposes their specs) and give the single device's logits and greedy tokens."""
    r = result["out_in_mesh"]
    assert r["converted"] > 0 and r["split"] > 0 and r["specs_match"], r
    assert r["logits"] < 1e-5 and r["greedy"], r


def test_vocab_split_embedding_looks_up_locally(result):
    """model.embed on a mesh: each device's own rows and one psum (sharding.vocab_embed), == jnp.take."""
    assert result["embed"] == {"2": True, "8": True}


def test_experts_are_split_by_expert():
    assert TABLE[("w_gate", 3)][0] == "experts" and TABLE[("w_down", 3)][0] == "experts"
