"""Batch prompts in and results out: prompt files, the chat template, one JSONL record per generation.

    prompts = read_prompts("prompts.jsonl")          # [str | list[int]]; a file not ending in .jsonl: one per line
    with AtomicJsonlWriter("out.jsonl") as out:      # out.jsonl appears only once every record is written
        out.write(record(prompt, engine.generate(chat_ids(engine.tokenizer, prompt))))
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mimo_jax.errors import InputError

Prompt = str | list[int]


def read_prompts(path: str | Path) -> list[Prompt]:
    """A `.jsonl` file: one JSON object a line with a "prompt" field (text, or a list of token ids).
    Any other file: one text prompt a line (the line without its newline). Blank lines are skipped in both.
    Raises InputError for a missing or unreadable file, a malformed line (with its number), or no prompts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts file {path}: {e}") from None
    jsonl = path.suffix == ".jsonl"
    prompts = [_parse_jsonl_line(line, path, n) if jsonl else line
               for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts (blank lines are skipped)")
    return prompts


def _parse_jsonl_line(line: str, path: Path, n: int) -> Prompt:
    where = f"{path}, line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise InputError(f'{where}: expected an object with a "prompt" field, got {line.strip()[:60]!r}')
    prompt = obj["prompt"]
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or is_ids) or not prompt:
        raise InputError(f'{where}: "prompt" must be a non-empty string or list of token ids, got {prompt!r:.60}')
    return prompt


def chat_ids(tokenizer, text: str) -> list[int]:
    """`text` as one user message in the tokenizer's chat template, with the assistant turn opened, as
    transformers' apply_chat_template(tokenize=True) gives it (the template writes any BOS itself)."""
    if tokenizer is None:
        raise InputError("--chat needs a tokenizer with a chat template; this checkpoint has no tokenizer")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def stats_dict(stats) -> dict[str, Any]:
    """engine.GenerationStats as a JSON-ready dict (its fields plus decode_tok_s)."""
    out = dataclasses.asdict(stats)
    out["decode_tok_s"] = stats.decode_tok_s
    if not stats.speculative_k:
        del out["speculative_k"], out["accepted_hist"]
    return out


def record(prompt: Prompt, generation) -> dict[str, Any]:
    """One output line: the prompt as given, the generated text (None without a tokenizer), ids, stats."""
    return {"prompt": prompt, "text": generation.text, "token_ids": list(generation.token_ids),
            "stats": stats_dict(generation.stats)}


class AtomicJsonlWriter:
    """Writes JSON lines to a temporary file beside `path` and renames it onto `path` only when the `with`
    block ends without an exception; on an exception the temporary file is removed and `path` is untouched."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InputError(f"output directory not found: {self.path.parent}")
        if self.path.is_dir():
            raise InputError(f"--output {self.path} is a directory")

    def __enter__(self) -> "AtomicJsonlWriter":
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            raise InputError(f"cannot write to {self.path.parent}: {e}") from None
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        return self

    def write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
            if exc_type is None:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a plain file's mode
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
