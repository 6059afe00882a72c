"""Text <-> token ids, from a GGUF's metadata, an HF `tokenizer.json`, or a sentencepiece `.model`.

    tok = Tokenizer.from_gguf(default_gguf_path())
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    stream = tok.stream_decoder()
    for token_id in generated: print(stream.push(token_id), end="")
    print(stream.flush())

GGUF byte-level BPE ("tokenizer.ggml.model" == "gpt2") is rebuilt with the `tokenizers` library the way
transformers' GGUF converter does (vocabulary + merges, control tokens as special added tokens,
user-defined tokens as plain added tokens, ByteLevel decoder), with one deliberate difference: the
pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does. For "smollm" that is digits split one by
one, then GPT-2's regex -- the pre-tokenizer of SmolLM2's own tokenizer.json. transformers has no entry
for "smollm" and uses GPT-2's regex alone; the two differ only where a space precedes a non-ASCII
numeral (" ²": ours ["Ġ", "Â²"], transformers ["ĠÂ", "²"]); ASCII digits have no merges in this vocabulary.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import re
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from mimo_jax.errors import CheckpointError

log = logging.getLogger(__name__)


class TokenizerError(CheckpointError, ValueError):
    """A tokenizer file or GGUF tokenizer description we cannot build."""


# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (llama-vocab.cpp), for the names we know.
_GPT2_SPLIT = None  # ByteLevel(use_regex=True) applies GPT-2's own regex
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = "digits+gpt2"  # llama.cpp: {"\\p{N}", <gpt2 regex>}
_PRE_TOKENIZERS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2, "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}  # fmt: skip
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pre_tokenizer(pre: str | None, add_prefix_space: bool):
    split = _PRE_TOKENIZERS.get(pre or "default", _GPT2_SPLIT)
    if pre and pre not in _PRE_TOKENIZERS:
        log.warning("GGUF pre-tokenizer %r unknown; using GPT-2's regex (as transformers does)", pre)
    if split is _GPT2_SPLIT:
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if split == _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)]
        )  # fmt: skip
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)]
    )  # fmt: skip


class _SentencePieceBackend:
    """sentencepiece.SentencePieceProcessor behind the two calls Tokenizer needs."""

    def __init__(self, path: pathlib.Path, add_bos: bool):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.add_bos = add_bos

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.sp.encode(text)
        return [self.sp.bos_id()] + ids if add_special_tokens and self.add_bos and self.sp.bos_id() >= 0 else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode(list(ids))
        # sentencepiece drops control tokens: decode the runs between them and keep them as text.
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)


class _HFBackend:
    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)


class Tokenizer:
    """encode/decode, special ids, chat template; build with from_gguf / from_file."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: Sequence[int], chat_template: str | None = None):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.chat_template = chat_template

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """From a GGUF path or an already-read `gguf_reader.GGUFModel` (byte-level BPE vocabularies)."""
        from mimo_jax.gguf_reader import GGUFModel, read_gguf

        model = source if isinstance(source, GGUFModel) else read_gguf(source)
        meta = model.metadata
        kind = meta("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"{model.path.name}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)"
            )
        tokens: list[str] = meta("tokenizer.ggml.tokens")
        types: list[int] = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = meta("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError(f"{model.path.name}: byte-level BPE without tokenizer.ggml.merges")

        # As transformers' byte_level_tokenizer: tokens outside the byte alphabet are re-spelled in it.
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {}
        for i, t in enumerate(tokens):
            vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
        tok = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(
            meta("tokenizer.ggml.pre"), bool(meta("tokenizer.ggml.add_space_prefix", False))
        )
        tok.decoder = decoders.ByteLevel()
        # Control tokens whole and special; one spelled outside the byte alphabet is a llama.cpp
        # mislabel that transformers also skips. User-defined tokens whole but not special.
        tok.add_special_tokens(
            [AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        )  # fmt: skip
        tok.add_tokens(
            [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        )

        bos = meta("tokenizer.ggml.bos_token_id")
        eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        prefix = [bos] if meta("tokenizer.ggml.add_bos_token", False) and bos is not None else []
        suffix = [eos[0]] if meta("tokenizer.ggml.add_eos_token", False) and eos[0] is not None else []
        if prefix or suffix:
            tok.post_processor = processors.TemplateProcessing(
                single=" ".join([tokens[i] for i in prefix] + ["$A"] + [tokens[i] for i in suffix]),
                special_tokens=[(tokens[i], i) for i in prefix + suffix],
            )
        return cls(
            _HFBackend(tok),
            bos_id=bos,
            eos_ids=[e for e in eos if e is not None],
            chat_template=meta("tokenizer.chat_template"),
        )

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "Tokenizer":
        """An HF `tokenizer.json` or a sentencepiece `.model` (a directory holding either works too).
        Special tokens and the chat template come from tokenizer_config.json / generation_config.json
        beside it when present."""
        path = pathlib.Path(path)
        if path.is_dir():
            found = find_tokenizer_file(path)
            if found is None:
                raise TokenizerError(f"{path} holds neither tokenizer.json nor tokenizer.model")
            path = found
        if not path.is_file():
            raise TokenizerError(f"No tokenizer file at {path}")
        config = _read_json(path.parent / "tokenizer_config.json")
        if path.suffix == ".json":
            backend = _HFBackend(tokenizers.Tokenizer.from_file(str(path)))
        elif path.suffix == ".model":
            backend = _SentencePieceBackend(path, add_bos=config.get("add_bos_token", True))
        else:
            raise TokenizerError(f"{path}: expected tokenizer.json or a sentencepiece .model")

        def special_id(name):
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(token) if token else None

        bos, eos = special_id("bos_token"), special_id("eos_token")
        if isinstance(backend, _SentencePieceBackend):
            bos = bos if bos is not None else (backend.sp.bos_id() if backend.sp.bos_id() >= 0 else None)
            eos = eos if eos is not None else (backend.sp.eos_id() if backend.sp.eos_id() >= 0 else None)
        generation_eos = _read_json(path.parent / "generation_config.json").get("eos_token_id")
        eos_ids = [eos] if eos is not None else []
        eos_ids += generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos else []
        return cls(backend, bos_id=bos, eos_ids=eos_ids, chat_template=_chat_template(config, path.parent))

    # -- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special-token text in `text` ("<|im_start|>") becomes its id, as in transformers."""
        return self._backend.encode(text, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() of each text (the `tokenizers` backend encodes them on its threads)."""
        batch = getattr(self._backend, "encode_batch", None)
        if batch is not None:
            return batch(texts, add_special_tokens)
        return [self._backend.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._backend.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the model's jinja chat template (jinja2 as transformers uses it). Without jinja2, a
        ChatML template (SmolLM2's, Qwen's) is rendered by a fallback; any other needs jinja2."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        special = {
            "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else "",
            "eos_token": self.id_to_token(self.eos_ids[0]) if self.eos_ids else "",
        }
        try:
            import jinja2  # noqa: F401
        except ImportError:
            return _chatml_fallback(self.chat_template, messages, add_generation_prompt)
        return _render_jinja(self.chat_template, messages=list(messages),
                             add_generation_prompt=add_generation_prompt, **special, **kwargs)  # fmt: skip


class StreamDecoder:
    """Text pieces for token ids arriving one at a time, never splitting a UTF-8 character.

    Decodes a short window of recent ids twice -- without and with the new ones -- and emits the
    difference once it no longer ends in U+FFFD (an incomplete byte sequence). Decoding the window
    rather than the new id alone also keeps sentencepiece's word-initial spaces. A text that truly
    ends in U+FFFD is held back until the next piece or `flush()`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window already emitted as context
        self._read = 0  # ids up to here are emitted

    def push(self, token_ids: int | Iterable[int]) -> str:
        try:
            self._ids.append(int(token_ids))
        except TypeError:
            self._ids.extend(int(i) for i in token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (a trailing incomplete character comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = lambda ids: self._tok.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
        seen = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]


# -- helpers ----------------------------------------------------------------------------------------


def find_tokenizer_file(directory: str | pathlib.Path) -> pathlib.Path | None:
    """The tokenizer a checkpoint directory holds (tokenizer.json, else a sentencepiece tokenizer.model)."""
    found = [p for p in (pathlib.Path(directory) / n for n in ("tokenizer.json", "tokenizer.model")) if p.is_file()]
    return found[0] if found else None


def chat_template_in(directory: str | pathlib.Path) -> str | None:
    """The chat template of a checkpoint directory's tokenizer (as from_file finds it), without building it."""
    directory = pathlib.Path(directory)
    return _chat_template(_read_json(directory / "tokenizer_config.json"), directory)


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _chat_template(config: dict, directory: pathlib.Path) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _render_jinja(template: str, **context) -> str:
    """As transformers' render: sandboxed, trim_blocks + lstrip_blocks, loop controls, tojson,
    raise_exception and strftime_now."""
    return _jinja_template(template).render(**context)


@functools.lru_cache(maxsize=8)
def _jinja_template(template: str):
    """The compiled template (compiling costs ~2 ms, rendering a short chat ~0.1 ms)."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _chatml_fallback(template: str, messages, add_generation_prompt: bool) -> str:
    """ChatML without jinja2; the template's default system message (if it inserts one) is kept."""
    if "<|im_start|>" not in template:
        raise TokenizerError("rendering this chat template needs jinja2 (pip install jinja2)")
    default_system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
    out = []
    if default_system and messages and messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{default_system.group(1)}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
