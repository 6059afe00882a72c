"""An OpenAI-compatible HTTP server over the batched engine (batching.Batcher):

    python -m mimo_jax.serve --checkpoint /path/to/model --port 8000       # no --checkpoint: the bundled SmolLM2

    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions (the chat template applied),
         stream true (server-sent events ending "data: [DONE]") or false; max_tokens (chat: also
         max_completion_tokens), temperature, top_p, top_k (extension), seed, stop, stream_options.include_usage,
         ignore_eos (extension, as vLLM's); usage counts.
    GET  /health (200 while the batch thread runs), /metrics (Prometheus text: requests, slots in use, tok/s,
         speculative acceptance).

--speculative_k K: every step drafts K tokens per slot and verifies them in one pass (batched_speculative.py;
greedy output unchanged, sampling lossless); the drafter is the engine's (--drafter, default: the model's MTP
layers).

One background thread drives the batch (Batcher.start); each HTTP request submits a batching.Request whose
callback feeds an asyncio queue on the server's loop. A client that disconnects (mid-stream or while waiting for
a non-streamed answer) cancels its request, which frees its slot at the next tick. Bad requests get the OpenAI
error JSON with status 400; an unexpected error a 500 with the same shape and no traceback. Flags are read only
in main().
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mimo_jax import compile_cache
from mimo_jax.batching import Batcher, Request
from mimo_jax.errors import InputError

DEFAULT_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's; chat defaults to what the context leaves


class _ClientGone(Exception):
    pass


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- request parsing: every check here, before a slot is asked for ----

def _number(body, name, default, lo, hi, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r:.40}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def _refuse_unsupported(body: dict) -> None:
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n = 1 is supported", "n")
    if body.get("best_of", 1) not in (1, None):
        raise BadRequest("best_of is not supported", "best_of")
    if body.get("echo"):
        raise BadRequest("echo is not supported", "echo")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("logprobs are not supported", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported", name)
    if body.get("logit_bias"):
        raise BadRequest("logit_bias is not supported", "logit_bias")
    if body.get("tools") or body.get("functions"):
        raise BadRequest("tools are not supported", "tools")


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stop


def _prompt_ids(engine, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise BadRequest("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        return engine.tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")


def _chat_ids(engine, messages) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise BadRequest("this model has no chat template: use /v1/completions", "messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a 'role' and 'content'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest("only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest("each message needs a 'role' and 'content'", "messages")
        out.append({"role": m["role"], "content": content})
    try:
        rendered = tok.apply_chat_template(out, add_generation_prompt=True)
    except Exception as e:  # the template's own raise_exception (e.g. roles out of order)
        raise BadRequest(f"the chat template refused these messages: {e}", "messages") from None
    return tok.encode(rendered, add_special_tokens=False)


def parse(body: Any, engine, capacity: int, model_name: str, chat: bool) -> tuple[Request, dict]:
    """A request body -> (the batching.Request, options: stream, include_usage, stop)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") != model_name:
        raise BadRequest(f"the model {body.get('model')!r} does not exist; this server has {model_name!r}",
                         "model", "model_not_found")
    _refuse_unsupported(body)
    if chat:
        ids = _chat_ids(engine, body.get("messages"))
    elif "prompt" not in body:
        raise BadRequest("'prompt' is required", "prompt")
    else:
        ids = _prompt_ids(engine, body["prompt"])
    if not ids:
        raise BadRequest("the prompt is empty", "prompt")
    if len(ids) >= capacity:
        raise BadRequest(f"this model's maximum context length is {capacity} tokens; the prompt has {len(ids)} "
                         f"(prompt + at least one new token)", "messages" if chat else "prompt",
                         "context_length_exceeded")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = capacity - len(ids) if chat else DEFAULT_MAX_TOKENS
    max_tokens = _number(body, name, default, 1, 1 << 31, integer=True)
    if len(ids) + max_tokens > capacity:
        raise BadRequest(f"this model's maximum context length is {capacity} tokens; the prompt has {len(ids)} "
                         f"and {name} asks for {max_tokens}", name, "context_length_exceeded")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    top_k = _number(body, "top_k", 0, -1, 1 << 31, integer=True)
    request = Request(ids, max_new_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                      top_p=float(_number(body, "top_p", 1.0, 0, 1)), top_k=max(top_k, 0),
                      seed=(seed if seed is not None else random.getrandbits(31)) % (1 << 32),
                      stop_at_eos=not body.get("ignore_eos", False))
    if request.top_p == 0:
        raise BadRequest("'top_p' must be in (0, 1]", "top_p")
    return request, {"stream": stream, "include_usage": bool(options.get("include_usage")), "stop": _stop(body)}


# ---- token ids -> text, with stop strings ----

class TextOut:
    """Text pieces of the generated tokens; a stop string ends the text before it (text that may be the start
    of a stop string is held back until it is known not to be)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stop, self.held, self.stopped = stop, "", False

    def push(self, tokens: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        if self.decoder is None:
            self.held += "".join(f"{t} " for t in tokens)
        else:
            self.held += self.decoder.push(tokens) if tokens else ""
            if final:
                self.held += self.decoder.flush()
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.held = self.held[:min(hits)], ""
            return out
        keep = 0 if final else max((k for s in self.stop for k in range(1, len(s))
                                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out


FINISH = {"eos": "stop", "length": "length", "context": "length", "cancelled": "stop"}


# ---- the app ----

def create_app(batcher: Batcher, model_name: str):
    """The FastAPI app; its lifespan starts and stops the batch thread."""
    engine, capacity, created = batcher.engine, batcher.capacity, int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="mimo_jax", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return JSONResponse(error_body(e.message, param=e.param, code=e.code), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        alive = batcher.running
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        rows = [("requests_total", "counter", "requests received", batcher.requests_total),
                ("requests_finished_total", "counter", "requests ended (any reason)", batcher.requests_finished),
                ("requests_cancelled_total", "counter", "requests cancelled (client gone, stop string)",
                 batcher.requests_cancelled),
                ("requests_waiting", "gauge", "requests queued for a slot", batcher.waiting),
                ("slots_in_use", "gauge", "slots holding a request (prefilling or decoding)", batcher.slots_in_use),
                ("slots_total", "gauge", "slots in the batch", batcher.batch_size),
                ("prompt_tokens_total", "counter", "prompt tokens prefilled", batcher.prompt_tokens_total),
                ("generation_tokens_total", "counter", "tokens generated", batcher.generated_tokens_total),
                ("decode_steps_total", "counter", "batched decode steps", batcher.steps_total),
                ("tokens_per_second", "gauge", "tokens generated per second, last 10 s",
                 round(batcher.tokens_per_second(), 3)),
                ("speculative_k", "gauge", "drafts per slot and step (0 = plain decoding)", batcher.speculative_k),
                ("speculative_accepted_total", "counter", "drafts accepted", batcher.accepted_total),
                ("speculative_slot_steps_total", "counter", "speculative steps taken, per slot",
                 batcher.slot_steps_total),
                ("speculative_accepted_per_step", "gauge", "drafts accepted per slot step (each also emits one)",
                 round(batcher.accepted_total / max(batcher.slot_steps_total, 1), 4))]
        text = "".join(f"# HELP mimo_{n} {h}\n# TYPE mimo_{n} {t}\nmimo_{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mimo_jax", "max_model_len": capacity}]}

    async def run(http: HTTPRequest, chat: bool):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        request, opts = parse(body, engine, capacity, model_name, chat)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request.on_tokens = lambda r, tokens, reason: loop.call_soon_threadsafe(queue.put_nowait, (tokens, reason))
        try:
            batcher.submit(request)
        except InputError as e:  # what parse did not catch (e.g. a token id outside the vocabulary)
            raise BadRequest(str(e)) from None
        prefix = "chatcmpl-" if chat else "cmpl-"
        meta = {"id": prefix + uuid.uuid4().hex[:24], "created": int(time.time()), "model": model_name}
        text = TextOut(engine.tokenizer, opts["stop"])

        async def next_item(poll_disconnect: bool):
            get = asyncio.ensure_future(queue.get())
            while True:
                done, _ = await asyncio.wait({get}, timeout=0.5)
                if done:
                    return get.result()
                if poll_disconnect and await http.is_disconnected():
                    get.cancel()
                    raise _ClientGone

        async def pieces(poll_disconnect: bool = False):
            """(text, finish_reason or None) until the request ends. Tokens that arrived while the previous
            event was sent go out as one event (under load the server sends fewer, larger events)."""
            while True:
                tokens, reason = await next_item(poll_disconnect)
                while not reason and not queue.empty():
                    more, reason = queue.get_nowait()
                    tokens = tokens + more
                piece = text.push(tokens, final=bool(reason))
                if text.stopped and not reason:
                    batcher.cancel(request)  # a stop string: the slot is freed at the next tick
                    reason = "stop_string"
                if piece or reason:
                    yield piece, (FINISH.get(reason, "stop") if reason else None)
                if reason:
                    return

        def usage():
            n = len(request.token_ids)
            return {"prompt_tokens": len(request.ids), "completion_tokens": n, "total_tokens": len(request.ids) + n}

        if opts["stream"]:
            return _Stream(_sse(pieces(), meta, chat, opts["include_usage"], usage), lambda: batcher.cancel(request))
        out, finish = [], None
        try:
            async for piece, finish in pieces(poll_disconnect=True):
                out.append(piece)
        except _ClientGone:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        finally:
            batcher.cancel(request)  # a no-op once it finished
        if request.finish_reason == "error":
            return JSONResponse(error_body("generation failed (see the server's log)", "server_error"), status_code=500)
        content = "".join(out)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                      "finish_reason": finish}
            return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage()}
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage()}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await run(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await run(http, chat=True)

    class _Stream(StreamingResponse):
        """Server-sent events; when the response ends for any reason (the client gone included), the request
        is cancelled (a no-op once it finished)."""

        def __init__(self, content, on_close):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return app


async def _sse(pieces, meta, chat: bool, include_usage: bool, usage):
    def event(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    extra = {"usage": None} if include_usage else {}
    if chat:
        kind = "chat.completion.chunk"
        yield event({**meta, "object": kind, **extra, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
    else:
        kind = "text_completion"
    async for piece, finish in pieces:
        if chat:
            delta = {"content": piece} if piece else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        yield event({**meta, "object": kind, **extra, "choices": [choice]})
    if include_usage:
        yield event({**meta, "object": kind, "choices": [], "usage": usage()})
    yield "data: [DONE]\n\n"


# ---- the entry point: the only place flags are read ----

def _args(argv):
    p = argparse.ArgumentParser(prog="python -m mimo_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint directory or .gguf file (default: the bundled SmolLM2)")
    p.add_argument("--config", help="a config JSON with random weights (with --random_init)")
    p.add_argument("--random_init", action="store_true")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch_size", type=int, default=8, help="slots: requests decoded together")
    p.add_argument("--max_seq_len", type=int, default=2048, help="positions per slot (prompt + new tokens)")
    p.add_argument("--prefill_chunk", type=int, default=512)
    p.add_argument("--prefill_rows", type=int, default=0, help="requests prefilled together in one call at most "
                   "(default: batch_size)")
    p.add_argument("--prefill_tokens", type=int, default=0, help="padded prompt tokens prefilled between two decode "
                   "steps (default: 8 x prefill_chunk)")
    p.add_argument("--speculative_k", type=int, default=0, help="draft k tokens per slot and step, verified in one "
                   "pass (0 = off)")
    p.add_argument("--drafter", help="with --speculative_k: the engine's drafter choice (default: the engine's; MTP "
                   "layers)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--quant_experts", default="none", choices=("none", "int4_sym", "int4_asym", "mxfp4"),
                   help="routed experts in 4 bits (as mimo-jax --quant_experts)")
    p.add_argument("--quant_group", type=int, default=128)
    from mimo_jax.config import DENSE_CHOICES

    p.add_argument("--dense", default="bf16", choices=DENSE_CHOICES,
                   help="q/k/v and the dense MLP (fp8_layers: also o_proj; fp8_all: o_proj and lm_head) in FP8 blocks "
                        "(as mimo-jax --dense)")
    p.add_argument("--served_model_name", help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--seed", type=int, default=0, help="random-init seed")
    p.add_argument("--compilation_cache", default=compile_cache.DEFAULT_DIR, help="directory of compiled programs "
                   "kept between runs (as mimo-jax --compilation_cache; empty = off)")
    def underscores(a):  # --max-seq-len=4 -> --max_seq_len=4
        name, eq, value = a.partition("=")
        return "--" + name[2:].replace("-", "_") + eq + value if a.startswith("--") else a
    return p.parse_args([underscores(a) for a in argv])


def load_engine(args):
    import jax.numpy as jnp

    from mimo_jax.engine import Engine, auto_dtype

    dtype = auto_dtype() if args.dtype == "auto" else jnp.dtype(args.dtype)
    kwargs = dict(prefill_chunk=args.prefill_chunk, speculative_k=args.speculative_k)
    quant = None if args.quant_experts == "none" else args.quant_experts
    if args.drafter:
        kwargs["drafter"] = args.drafter
    if args.random_init:
        if not args.config:
            raise InputError("--random_init needs --config")
        from mimo_jax.config import load_config

        import jax

        from mimo_jax import model

        cfg = load_config(args.config)
        params = model.init_params(cfg, jax.random.PRNGKey(args.seed), dtype)
        from mimo_jax.quantize_model import quantize_dense, quantize_experts

        if quant:  # before the Engine re-lays the layers out
            params = quantize_experts(params, quant, args.quant_group)
        engine = Engine(cfg, quantize_dense(params, args.dense), **kwargs)
    else:
        engine = Engine.from_pretrained(args.checkpoint, dtype=dtype, quant_experts=quant,
                                        quant_group=args.quant_group, dense=args.dense, **kwargs)
    engine.max_seq_len = min(args.max_seq_len, engine.cfg.max_position_embeddings)
    return engine


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = _args(sys.argv[1:] if argv is None else argv)
    compile_cache.enable_or_warn(args.compilation_cache)
    try:
        engine = load_engine(args)
        batcher = Batcher(engine, args.batch_size, engine.max_seq_len, prefill_rows=args.prefill_rows or None,
                          prefill_tokens=args.prefill_tokens or None)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    name = args.served_model_name or (args.config if args.random_init else args.checkpoint) or "SmolLM2-135M-Instruct"
    name = name.rstrip("/").rsplit("/", 1)[-1]
    t0 = time.perf_counter()
    batcher.warm_up()
    spec = f", speculative k={batcher.speculative_k}" if batcher.speculative_k else ""
    print(f"[{name}: {args.batch_size} slots x {batcher.capacity} positions{spec}, compiled in "
          f"{time.perf_counter() - t0:.1f} s; http://{args.host}:{args.port}/v1]", file=sys.stderr)
    uvicorn.run(create_app(batcher, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
