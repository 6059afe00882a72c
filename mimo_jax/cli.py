"""mimo_jax command line: stream a generation from a checkpoint, a GGUF file, or a config with random weights.

    mimo-jax --prompt "What is the capital of France?"          # the bundled SmolLM2-135M-Instruct (GGUF), chat
    mimo-jax --nochat --prompt "The capital of France is"       # raw completion, no chat template
    mimo-jax --checkpoint /path/to/MiMo-V2-Flash --prompt "..."
    mimo-jax --config configs/tiny_mimo.json --random_init --prompt_ids 1,2,3
    mimo-jax --prompts_file prompts.jsonl --output results.jsonl            # a batch, one JSON line each

`python launch.py ...` is the same program. Flags are read here only and become keyword arguments of the
library once. Every flag is checked against the model's config before a weight is read; a bad flag or input
prints one `error: ...` line and exits 1 (2 for an unknown flag), Ctrl-C prints `interrupted` and exits 130.
Boolean flags take --flag, --noflag, --no-flag, --flag=true|false; `--max-new-tokens` spells `--max_new_tokens`.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from absl import flags

from mimo_jax.cli_checks import (Source, check_flags, check_model_flags, context_length, parse_prompts,  # noqa: F401
                                 read_source)
from mimo_jax.cli_flags import FLAGS, _normalize, help_text  # noqa: F401 - FLAGS, _normalize: tests read them


def _help() -> str:
    return help_text(__doc__)


# ---- entry points ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """The `mimo-jax` console script and `python launch.py`: run and exit with its status."""
    _handle_interrupts()
    status = run(sys.argv if argv is None else argv)
    if status == 130:
        exit_now(status)
    sys.exit(status)


_INTERRUPTED = threading.Event()  # Ctrl-C arrived
_UNWIND = threading.Event()  # set while Ctrl-C must unwind the stack: an --output file or a streamed line is open


def _handle_interrupts() -> None:
    """Ctrl-C exits at once ('interrupted', status 130) -- except while an --output file is being written or a
    line streamed, where it raises KeyboardInterrupt so that the file is removed and the line ended on the way
    out. Exiting at once is what makes it safe during imports and XLA calls: a KeyboardInterrupt inside jaxlib's
    initialisation surfaces as ImportError, one inside a gc callback is swallowed, and the interpreter's
    shutdown after either can crash. A KeyboardInterrupt swallowed while unwinding is raised again."""
    import _thread
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background: leave it ignored
        return

    def on_sigint(signum, frame):
        _INTERRUPTED.set()
        if _UNWIND.is_set():
            raise KeyboardInterrupt
        exit_now(130, "interrupted\n")

    def redeliver():
        time.sleep(0.05)  # the main thread has left the callback by then
        _thread.interrupt_main()

    def on_unraisable(info, previous=sys.unraisablehook):
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            _thread.start_new_thread(redeliver, ())  # threading.Thread.start would wait, interruptibly, in here
        else:
            previous(info)

    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = on_unraisable


class _Unwinding:
    """`with _Unwinding():` Ctrl-C raises KeyboardInterrupt inside the block (see _handle_interrupts)."""

    def __enter__(self):
        _UNWIND.set()

    def __exit__(self, *exc):
        _UNWIND.clear()


def exit_now(status: int, message: str = "") -> None:
    """Exit without the interpreter's shutdown, which can crash (SIGSEGV) after Ctrl-C lands inside an import
    of jaxlib or an XLA call; what must not be half-written was cleaned up as the interrupt unwound."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a reentrant flush from a signal handler
            pass
    os.write(2, message.encode())
    os._exit(status)


def run(argv: list[str]) -> int:
    """Parse argv (argv[0] is the program), run, and return the exit status; errors are one stderr line."""
    from mimo_jax.errors import MimoError

    try:
        args = _normalize(argv)
        if args is None:
            print(_help(), end="")
            return 0
        FLAGS.unparse_flags()
        try:
            rest = FLAGS(args)
        except flags.Error as e:
            print(f"error: {e} (see --help)", file=sys.stderr)
            return 2
        if len(rest) > 1:
            print(f"error: unexpected arguments {' '.join(rest[1:])} (a prompt goes after --prompt)", file=sys.stderr)
            return 2
        if FLAGS.version:
            print(f"mimo_jax {version()}")
            return 0
        _generate()
        return 0
    except MimoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:  # an --output file being written was removed on the way out (AtomicJsonlWriter)
        if isinstance(e, KeyboardInterrupt) or _INTERRUPTED.is_set():
            print("interrupted", file=sys.stderr)
            return 130
        raise


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mimo_jax")
    except metadata.PackageNotFoundError:  # run from a clone that was not pip-installed
        import re

        pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)


# ---- the run ---------------------------------------------------------------------------------------------

def _generate() -> None:
    check_flags()
    prompts = parse_prompts()
    if FLAGS.output is not None:
        from mimo_jax.prompts import AtomicJsonlWriter

        AtomicJsonlWriter(FLAGS.output)  # checks the destination before the model loads
    if FLAGS.coordinator_address:  # before any other JAX call: the mesh then spans every host's devices
        import jax

        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    from mimo_jax import compile_cache

    compile_cache.enable_or_warn(FLAGS.compilation_cache)  # before anything compiles
    source = read_source()
    check_model_flags(source, prompts)
    chat = FLAGS.chat if FLAGS.chat is not None else source.has_chat_template

    t0 = time.perf_counter()
    engine = load(source)
    inputs = [model_input(engine, p, chat) for p in prompts]
    check_budgets(engine, inputs)
    t1 = time.perf_counter()
    if FLAGS.prompts_file is None or FLAGS.batch_size == 1:  # the batched path warms its own buckets up
        warm_up(engine, inputs)
    note = "; chat template applied (--nochat: raw text)" if chat and FLAGS.chat is None and any(
        isinstance(p, str) for p in prompts) else ""
    print(f"[loaded in {t1 - t0:.1f} s, compiled in {time.perf_counter() - t1:.1f} s{note}]", file=sys.stderr)
    if FLAGS.prompts_file is None:
        stream_one(engine, prompts[0], inputs[0], chat, source)
    else:
        run_batch(engine, prompts, inputs, chat, source)


def load(source: Source):
    import jax.numpy as jnp

    from mimo_jax import Engine, sharding

    dtype = None if FLAGS.dtype == "auto" else jnp.dtype(FLAGS.dtype)  # None: the engine's auto_dtype()
    kwargs = dict(max_seq_len=context_length(source.cfg), speculative_k=FLAGS.speculative_k, drafter=FLAGS.drafter,
                  mesh=sharding.make_mesh(FLAGS.num_devices) if FLAGS.num_devices > 1 else None,
                  attention=FLAGS.attention, decode_steps=FLAGS.decode_steps or None)
    quant = None if FLAGS.quant_experts == "none" else FLAGS.quant_experts
    if source.kind == "checkpoint":  # experts quantized while streaming onto their devices (loader.py)
        return Engine.from_pretrained(source.path, dtype=dtype, quant_experts=quant, quant_group=FLAGS.quant_group,
                                      dense=FLAGS.dense, **kwargs)
    if source.kind == "random":
        engine = Engine.from_config(source.cfg, seed=FLAGS.seed, dtype=dtype, dense=FLAGS.dense, **kwargs)
    else:
        engine = Engine.from_gguf(source.path, dtype, **kwargs)
    if quant:
        from mimo_jax.quantize_model import quantize_experts

        engine.params = engine._place(quantize_experts(engine.params, FLAGS.quant_experts, FLAGS.quant_group))
    return engine


def model_input(engine, prompt, chat: bool) -> list[int]:
    from mimo_jax.prompts import chat_ids

    return engine.encode(chat_ids(engine.tokenizer, prompt) if chat and isinstance(prompt, str) else prompt)


def check_budgets(engine, inputs) -> None:
    """Every prompt + --max_new_tokens fits the context (rather than generation stopping short silently)."""
    from mimo_jax.errors import InputError

    for i, ids in enumerate(inputs):
        if len(ids) + FLAGS.max_new_tokens > engine.max_seq_len:
            which = f"prompt {i + 1} of {len(inputs)}" if len(inputs) > 1 else "the prompt"
            raise InputError(f"{which} has {len(ids)} tokens; with --max_new_tokens {FLAGS.max_new_tokens} it needs "
                             f"{len(ids) + FLAGS.max_new_tokens} positions, the context holds {engine.max_seq_len} "
                             f"(--max_seq_len): lower --max_new_tokens or raise --max_seq_len")


def sampling_kwargs():
    return dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)


def warm_up(engine, inputs) -> None:
    """Compile, untimed, every shape the run will use, so that each prompt's stats time the model, not XLA."""
    seen = set()
    for ids in inputs:
        key = engine.compile_key(ids, FLAGS.max_new_tokens)
        if key not in seen:
            seen.add(key)
            engine.warm_up(ids, FLAGS.max_new_tokens, **sampling_kwargs())


def empty_answer_note(prompt, text: str | None, stats, chat: bool, source: Source) -> str | None:
    """Why a text prompt got an empty answer, when the model ended it at once."""
    if not isinstance(prompt, str) or text is None or text.strip() or stats.finish_reason != "eos":
        return None
    if not chat and source.has_chat_template:
        return ("[empty answer: the model ended at once (end-of-sequence). It is a chat model and --nochat sent "
                "the prompt as raw text; without --nochat it is wrapped in the model's chat template]")
    return "[empty answer: the model's first token was end-of-sequence]"


def stream_one(engine, prompt, ids, chat: bool, source: Source) -> None:
    stream = engine.stream(ids, max_new_tokens=FLAGS.max_new_tokens, **sampling_kwargs())
    decoder = engine.tokenizer.stream_decoder() if engine.tokenizer else None
    pieces = []
    with _Unwinding():
        try:
            for token in stream:
                pieces.append(decoder.push(token) if decoder else f"{token} ")
                sys.stdout.write(pieces[-1])
                sys.stdout.flush()
            if decoder:
                pieces.append(decoder.flush())
                sys.stdout.write(pieces[-1])
        finally:  # Ctrl-C included: end the line
            sys.stdout.write("\n")
            sys.stdout.flush()
    print(stream.stats.line(), file=sys.stderr)
    note = empty_answer_note(prompt, "".join(pieces) if decoder else None, stream.stats, chat, source)
    if note:
        print(note, file=sys.stderr)


def run_batched(engine, prompts, inputs, chat: bool, source: Source) -> None:
    """All prompts through --batch_size slots (continuous batching); output in input order, the file written
    when all are done."""
    from tqdm import tqdm

    from mimo_jax.batching import generate_all
    from mimo_jax.prompts import AtomicJsonlWriter, record

    t0, tokens = time.perf_counter(), [0]
    with tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr) as bar:
        def on_done(i, g):
            tokens[0] += g.stats.new_tokens
            bar.update()
            bar.set_postfix(tok_s=f"{tokens[0] / (time.perf_counter() - t0):.1f}")
        gens = generate_all(engine, inputs, batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens,
                            warm_up=True, on_done=on_done, **sampling_kwargs())
    empty = [n for n in (empty_answer_note(p, g.text, g.stats, chat, source) for p, g in zip(prompts, gens)) if n]
    with _Unwinding(), (AtomicJsonlWriter(FLAGS.output) if FLAGS.output else _Stdout()) as out:
        for prompt, g in zip(prompts, gens):
            out.write(record(prompt, g))
    where = f" to {FLAGS.output}" if FLAGS.output else ""
    print(f"[{len(prompts)} prompts, {tokens[0]} new tokens{where}, batch {FLAGS.batch_size}]", file=sys.stderr)
    if empty:
        print(f"[{len(empty)} of {len(prompts)} answers empty] {empty[0]}", file=sys.stderr)


class _Stdout:
    """AtomicJsonlWriter's interface over stdout (no --output)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()

    def write(self, obj):
        import json

        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def run_batch(engine, prompts, inputs, chat: bool, source: Source) -> None:
    """One generation per prompt, in order, a progress bar on stderr; the output file appears at the end."""
    if FLAGS.batch_size > 1:
        return run_batched(engine, prompts, inputs, chat, source)
    from tqdm import tqdm

    from mimo_jax.prompts import AtomicJsonlWriter, record

    new_tokens, empty = 0, []
    with _Unwinding(), (AtomicJsonlWriter(FLAGS.output) if FLAGS.output else _Stdout()) as out, \
            tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr) as bar:
        for prompt, ids in zip(prompts, inputs):
            generation = engine.generate(ids, max_new_tokens=FLAGS.max_new_tokens, **sampling_kwargs())
            out.write(record(prompt, generation))
            new_tokens += generation.stats.new_tokens
            note = empty_answer_note(prompt, generation.text, generation.stats, chat, source)
            if note:
                empty.append(note)
            bar.update()
            bar.set_postfix(tok_s=f"{generation.stats.decode_tok_s:.1f}")
    where = f" to {FLAGS.output}" if FLAGS.output else ""
    print(f"[{len(prompts)} prompts, {new_tokens} new tokens{where}]", file=sys.stderr)
    if empty:
        print(f"[{len(empty)} of {len(prompts)} answers empty] {empty[0]}", file=sys.stderr)
