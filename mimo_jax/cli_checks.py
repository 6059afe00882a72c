"""The command line's checks, all before a weight is read: flag values, the model they name (read from its
config or GGUF header: Source), the prompts, the drafter and the devices. Each failure is one InputError or
CheckpointError line (cli.run prints it and exits 1)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from mimo_jax.cli_flags import FLAGS

if TYPE_CHECKING:
    from mimo_jax.config import ModelConfig


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
    need(FLAGS.decode_steps >= 0, f"--decode_steps must be >= 0 (0 = auto), got {FLAGS.decode_steps}")
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
    if FLAGS.dense != "bf16" and source.kind not in ("checkpoint", "random"):
        raise InputError(f"--dense {FLAGS.dense} applies to a safetensors checkpoint or a --random_init config, "
                         f"not a {source.kind} model")
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
    from mimo_jax import block_drafter, mtp_drafter
    from mimo_jax.errors import InputError

    k, choice = FLAGS.speculative_k, FLAGS.drafter
    if choice == "mtp" or (choice == "auto" and cfg.num_mtp_layers):
        if not cfg.num_mtp_layers and mtp_drafter.shipped_for(cfg) is None:
            raise InputError(f"--speculative_k {k} --drafter mtp drafts with the model's MTP layers; this model "
                             f"({cfg.model_type}) has none and the shipped MTP drafter was trained for another "
                             f"model (--drafter block or PATH: a drafter file)")
        return
    path = block_drafter.SHIPPED if choice in ("auto", "block") else Path(choice)
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
