"""launch.py end to end: a run streams tokens and a stats line; bad input gives one line and a non-zero exit."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hf_fixtures import random_hf_model, save_transformers_layout

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_transformers_layout(random_hf_model(0, num_layers=3), tmp_path_factory.mktemp("ckpt"))


def test_random_init_run_streams_and_reports(tmp_path):
    r = launch("--config", "configs/tiny_mimo.json", "--random_init", "--prompt_ids", "1,2,3,4",
               "--max_new_tokens", "5")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 5 and all(t.isdigit() for t in r.stdout.split())
    assert "decode" in r.stderr and "tok/s" in r.stderr


def test_checkpoint_run(ckpt):
    r = launch("--checkpoint", str(ckpt), "--prompt_ids", "5,6,7", "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 4


def test_missing_directory(tmp_path):
    assert_one_line_error(launch("--checkpoint", str(tmp_path / "nope"), "--prompt_ids", "1"), "not found")


def test_missing_config(ckpt, tmp_path):
    d = shutil.copytree(ckpt, tmp_path / "c")
    (d / "config.json").unlink()
    assert_one_line_error(launch("--checkpoint", str(d), "--prompt_ids", "1"), "config.json")


def test_missing_tensor(ckpt, tmp_path):
    d = shutil.copytree(ckpt, tmp_path / "c")
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.self_attn.v_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    assert_one_line_error(launch("--checkpoint", str(d), "--prompt_ids", "1"),
                          "missing tensor model.layers.1.self_attn.v_proj.weight")


def test_wrong_shape(ckpt, tmp_path):
    d = shutil.copytree(ckpt, tmp_path / "c")
    t = load_file(str(d / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"][:-2]
    save_file(t, str(d / "model.safetensors"))
    assert_one_line_error(launch("--checkpoint", str(d), "--prompt_ids", "1"), "model.norm.weight has shape")


def test_unknown_model_type(ckpt, tmp_path):
    d = shutil.copytree(ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(launch("--checkpoint", str(d), "--prompt_ids", "1"), "unknown model type 'bert'")


@pytest.mark.parametrize("args,fragment", [
    (["--prompt_ids", ""], "prompt is empty"),
    (["--prompt_ids", ",".join(["3"] * 40), "--max_seq_len", "32"], "context holds 32"),
    (["--prompt_ids", "1,99999"], "token id 99999 is outside the vocabulary"),
    (["--prompt", "hello"], "needs a tokenizer"),
    ([], "no prompt"),
    (["--prompt_ids", "1", "--top_p", "0"], "top_p"),
])
def test_bad_input(ckpt, args, fragment):
    assert_one_line_error(launch("--checkpoint", str(ckpt), *args), fragment)


def test_bad_config_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    assert_one_line_error(launch("--config", str(bad), "--random_init", "--prompt_ids", "1"), "not valid JSON")
