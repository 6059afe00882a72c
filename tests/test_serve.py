"""The OpenAI-compatible server, through the official `openai` client against a server this file starts on a free
port: a tiny random Llama with SmolLM2's tokenizer and chat template (the bundled GGUF), 8 slots of 256 positions;
and one built as `python -m mimo_jax.serve --speculative_k 2` builds it (a random tiny MiMo, its MTP layer drafting)."""
import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from mimo_jax import model  # noqa: E402
from mimo_jax.batching import Batcher  # noqa: E402
from mimo_jax.config import config_from_hf, load_config  # noqa: E402
from mimo_jax.engine import Engine  # noqa: E402
from mimo_jax.prompts import chat_ids  # noqa: E402
from mimo_jax import serve  # noqa: E402
from mimo_jax.serve import TextOut, create_app  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CAPACITY, SLOTS, NAME = 256, 8, "tiny"


@pytest.fixture(scope="module")
def server():
    try:
        from mimo_jax.gguf_reader import default_gguf_path, read_gguf
        gguf = read_gguf(default_gguf_path())
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the bundled SmolLM2 is not installed ({e})")
    from mimo_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf)
    cfg = load_config(CONFIGS / "tiny_llama.json").replace(vocab_size=config_from_hf(gguf.hf_config).vocab_size)
    engine = Engine(cfg, model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32), tokenizer=tokenizer,
                    max_seq_len=CAPACITY, prefill_chunk=64)
    batcher = Batcher(engine, SLOTS, CAPACITY)
    yield from _serving(engine, batcher)


def _serving(engine, batcher, name=NAME):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(batcher, name), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield engine, batcher, url
    srv.should_exit = True
    thread.join(timeout=10)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def metrics(url) -> dict:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("mimo_")}


def reference(engine, ids, n) -> str:
    return engine.tokenizer.decode(engine.generate(ids, max_new_tokens=n, stop_at_eos=False).token_ids)


def test_models_health_metrics(server):
    engine, batcher, url = server
    assert [m.id for m in client(url).models.list().data] == [NAME]
    assert httpx.get(url + "/health").status_code == 200
    m = metrics(url)
    assert m["mimo_slots_total"] == SLOTS and "mimo_tokens_per_second" in m


def test_completion_streamed_and_not(server):
    engine, _, url = server
    prompt = "The capital of France is"
    want = reference(engine, engine.tokenizer.encode(prompt), 12)
    c = client(url)
    out = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    n_prompt = len(engine.tokenizer.encode(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    ids = [5, 6, 7, 8]  # a prompt of token ids
    out = c.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == reference(engine, ids, 5)


def test_chat_streamed_and_not(server):
    engine, _, url = server
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = reference(engine, chat_ids(engine.tokenizer, messages[0]["content"]), 10)
    c = client(url)
    out = c.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 10
    assert out.usage.prompt_tokens == len(chat_ids(engine.tokenizer, messages[0]["content"]))
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_seed(server):
    engine, _, url = server
    c = client(url)
    full = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    for stream in (False, True):
        kw = dict(model=NAME, prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop, "\x00never"],
                  extra_body={"ignore_eos": True})
        if stream:
            text = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw))
        else:
            out = c.completions.create(**kw)
            text = out.choices[0].text
            assert out.choices[0].finish_reason == "stop"
        assert text == full[:full.index(stop)]
    sampled = [c.completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=1.0, top_p=0.9, seed=s,
                                    extra_body={"ignore_eos": True}).choices[0].text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_text_out_holds_back_a_stop_prefix():
    class Chars:  # one token per character
        def stream_decoder(self):
            class D:
                def push(self, ids):
                    return "".join(chr(i) for i in ids)

                def flush(self):
                    return ""
            return D()

    t = TextOut(Chars(), ["END"])
    assert t.push([ord(ch) for ch in "abcE"]) == "abc"  # "E" may start "END"
    assert t.push([ord("N")]) == ""
    assert t.push([ord("x")]) == "ENx"
    assert t.push([ord(ch) for ch in "yEND"]) == "y" and t.stopped


@pytest.mark.slow
def test_32_concurrent_streams(server):
    """32 streams at once over 8 slots (the rest wait in the queue): each gets exactly its max_tokens."""
    engine, batcher, url = server
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(i):
        max_tokens = 8 + i % 13
        stream = await c.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=max_tokens, stream=True,
            temperature=0.0 if i % 2 else 0.8, seed=i, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        finish, usage = None, None
        async for ch in stream:
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
            usage = ch.usage or usage
        return max_tokens, finish, usage

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    before = metrics(url)["mimo_generation_tokens_total"]
    results = asyncio.run(all_of_them())
    for max_tokens, finish, usage in results:
        assert finish == "length" and usage.completion_tokens == max_tokens
    assert metrics(url)["mimo_generation_tokens_total"] - before == sum(r[0] for r in results)
    assert metrics(url)["mimo_slots_in_use"] == 0


@pytest.mark.slow
def test_dropped_clients_free_their_slots(server, monkeypatch):
    """8 streams each read 2 chunks and hang up: their requests are cancelled and the slots free again."""
    engine, batcher, url = server
    tick = batcher.tick
    monkeypatch.setattr(batcher, "tick", lambda: time.sleep(0.01) or tick())  # 200 tokens take > 2 s
    before = metrics(url)["mimo_requests_cancelled_total"]
    c = client(url)
    for i in range(8):
        stream = c.completions.create(model=NAME, prompt=f"Story {i}:", max_tokens=200, stream=True,
                                      extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it), next(it)
        stream.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        m = metrics(url)
        if m["mimo_slots_in_use"] == 0 and m["mimo_requests_cancelled_total"] - before == 8:
            break
        time.sleep(0.1)
    assert m["mimo_slots_in_use"] == 0 and m["mimo_requests_cancelled_total"] - before == 8
    out = c.completions.create(model=NAME, prompt="still serving", max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4


def test_bad_requests_are_400(server):
    engine, _, url = server
    post = lambda path, body: httpx.post(url + path, content=body if isinstance(body, str) else json.dumps(body),  # noqa: E731
                                         headers={"content-type": "application/json"})
    ok = {"model": NAME, "prompt": "hi"}
    cases = {
        "malformed JSON": ("/v1/completions", '{"model": "tiny", "prompt": '),
        "not an object": ("/v1/completions", "[1, 2]"),
        "unknown model": ("/v1/completions", {**ok, "model": "gpt-4"}),
        "over-long prompt": ("/v1/completions", {**ok, "prompt": [1] * CAPACITY}),
        "prompt + max_tokens over the context": ("/v1/completions", {**ok, "prompt": [1] * 200, "max_tokens": 100}),
        "negative max_tokens": ("/v1/completions", {**ok, "max_tokens": -1}),
        "zero max_tokens": ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 0}),
        "temperature out of range": ("/v1/completions", {**ok, "temperature": 3}),
        "token id outside the vocabulary": ("/v1/completions", {**ok, "prompt": [10 ** 9]}),
        "n > 1": ("/v1/completions", {**ok, "n": 2}),
        "no prompt": ("/v1/completions", {"model": NAME}),
        "no messages": ("/v1/chat/completions", {"model": NAME, "messages": []}),
        "bad stop": ("/v1/completions", {**ok, "stop": 5}),
    }
    for what, (path, body) in cases.items():
        r = post(path, body)
        assert r.status_code == 400, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and "Traceback" not in r.text, what
    assert post("/v1/completions", {**ok, "model": "gpt-4"}).json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model="gpt-4", prompt="hi")
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert metrics(url)["mimo_slots_in_use"] == 0


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    """The engine and batcher `python -m mimo_jax.serve --config tiny_mimo.json --random_init --speculative_k 2
    ...` builds (no tokenizer: prompts are token ids, the text is the ids); tiny_mimo's first 4 layers (full and
    sliding, dense and MoE), half its layers to compile."""
    path = tmp_path_factory.mktemp("spec") / "tiny_mimo_4.json"
    path.write_text(json.dumps(load_config(CONFIGS / "tiny_mimo.json").first_layers(4).to_dict()))
    args = serve._args(["--config", str(path), "--random_init", "--speculative-k=2",
                        "--batch_size", "2", "--max_seq_len", "128", "--prefill_chunk", "16"])
    engine = serve.load_engine(args)
    assert engine.speculative_k == 2
    yield from _serving(engine, Batcher(engine, args.batch_size, engine.max_seq_len), "tiny_mimo")


def test_speculative_server_streams(spec_server):
    """--speculative_k 2: 3 concurrent streams over 2 slots (up to 3 tokens a step each), each the plain batch-1
    greedy output with the right count; /metrics reports the acceptance."""
    engine, batcher, url = spec_server
    plain = Engine(engine.cfg, engine.params, max_seq_len=engine.max_seq_len, prefill_chunk=16)
    prompts = [[3 + i, 40 + 7 * i, 9, 200 - i] * (1 + i) for i in range(3)]
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)

    async def one(ids, n):
        stream = await c.completions.create(model="tiny_mimo", prompt=ids, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        async for ch in stream:
            text += ch.choices[0].text if ch.choices else ""
            usage = ch.usage or usage
        return text, usage

    async def all_of_them():
        return await asyncio.gather(*(one(ids, 9 + 2 * i) for i, ids in enumerate(prompts)))

    for i, (text, usage) in enumerate(asyncio.run(all_of_them())):
        want = plain.generate(prompts[i], max_new_tokens=9 + 2 * i, stop_at_eos=False).token_ids
        assert text.split() == [str(t) for t in want] and usage.completion_tokens == len(want)
    m = metrics(url)
    assert m["mimo_speculative_k"] == 2 and m["mimo_speculative_slot_steps_total"] > 0
    assert "mimo_speculative_accepted_per_step" in m and m["mimo_slots_in_use"] == 0
