"""Batch prompts in and results out: prompt files, the chat template, one JSONL record per generation.

    prompts = read_prompts("prompts.jsonl")          # [str | list[int]]; .json: a JSON list (or JSON lines);
                                                     # any other file: one text prompt a line
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
    A `.json` file: a JSON list whose items are such objects, strings or token-id lists (or, failing that,
    JSON lines as above). Any other file: one text prompt a line (the line without its newline). Blank
    lines are skipped. Raises InputError for a missing or unreadable file, a malformed line or item (with its
    number), or no prompts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts file {path}: {e}") from None
    if path.suffix == ".json":
        prompts = _parse_json_file(text, path)
    elif path.suffix == ".jsonl":
        prompts = _parse_jsonl(text, path)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts (blank lines are skipped)")
    return prompts


def _parse_jsonl(text: str, path: Path) -> list[Prompt]:
    return [_parse_jsonl_line(line, path, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _parse_json_file(text: str, path: Path) -> list[Prompt]:
    """A JSON list of prompts ({"prompt": ...} objects, strings or token-id lists), a single {"prompt": ...}
    object, or JSON lines saved under a .json name."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as whole:
        try:
            return _parse_jsonl(text, path)
        except InputError:
            raise InputError(f"{path}: not valid JSON ({whole.msg} at line {whole.lineno}, column {whole.colno}) "
                             f"nor JSON lines; expected a list of prompts") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise InputError(f'{path}: expected a JSON list of prompts (strings, token-id lists or {{"prompt": ...}} '
                         f"objects), got {type(doc).__name__}")
    return [_check_prompt(item["prompt"] if isinstance(item, dict) and "prompt" in item else item,
                          f"{path}, item {n}") for n, item in enumerate(doc, 1)]


def _parse_jsonl_line(line: str, path: Path, n: int) -> Prompt:
    where = f"{path}, line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise InputError(f'{where}: expected an object with a "prompt" field, got {line.strip()[:60]!r}')
    return _check_prompt(obj["prompt"], where)


def _check_prompt(prompt: Any, where: str) -> Prompt:
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or is_ids) or not prompt:
        raise InputError(f'{where}: a prompt must be a non-empty string or list of token ids (or an object with '
                         f'such a "prompt"), got {prompt!r:.60}')
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
