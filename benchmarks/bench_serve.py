"""Serving throughput: the OpenAI-compatible server (mimo_jax.serve) under 1, 8, 32, 64 concurrent streams.

    python benchmarks/bench_serve.py --quick                                        # CPU, tiny, ~1-2 min
    python benchmarks/bench_serve.py --config configs/smollm2_135m.json --dtype bfloat16          # GPU
    python benchmarks/bench_serve.py --config configs/mid_mimo.json --quant_experts int4_sym --dtype bfloat16
    python benchmarks/bench_serve.py --checkpoint bundled                           # the bundled SmolLM2 weights

The server runs in this process as `python -m mimo_jax.serve` runs it (a Batcher thread + uvicorn on a free
port), built the same way (random weights from --config, or a checkpoint), with every batched prefill call a wave
of --prompt_len prompts can make (rows 1, 2, 4, ... up to the slots and --prefill_tokens) and every step bucket
compiled first (Batcher.warm_up). Each concurrency level is driven by a separate client process (standard
library only: asyncio sockets, SSE over chunked HTTP/1.1) so that its parsing does not share the server's GIL:
C streaming /v1/completions requests sent at once, a prompt of --prompt_len token ids each (distinct), greedy,
max_tokens fixed, ignore_eos. An untimed wave at the level first, then the timed one.

Prints, per level: aggregate tok/s (all completion tokens / wall time of the wave), time to first token p50 /
p99, inter-token latency p50 / p99 (the gaps between a stream's SSE events, each divided by the tokens it
carries: without a tokenizer the text is the token ids, so they are counted; with one, one token an event), the
ratio to the 1-stream aggregate (issue 15's target: >= 10x at 32). Also the batch-1 Engine.generate tok/s (no
server) for reference, and whether anything compiled during the timed waves (it should not).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- the client (its own process; standard library only) ----

async def _stream(host: str, port: int, body: dict, count_ids: bool) -> dict:
    """One streaming completion -> {start, first, end, tokens, gaps: [(seconds, tokens)]}."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP {status!r}: {(await reader.read())[:300]!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
    out = {"start": start, "first": None, "end": None, "tokens": 0, "gaps": []}
    buffer, last = b"", None
    while True:
        if chunked:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            buffer += (await reader.readexactly(size + 2))[:-2]
        else:
            piece = await reader.read(65536)
            if not piece:
                break
            buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            payload = event.decode().removeprefix("data: ")
            if payload == "[DONE]":
                continue
            obj, now = json.loads(payload), time.perf_counter()
            if obj.get("usage"):
                out["tokens"] = obj["usage"]["completion_tokens"]
            text = obj["choices"][0]["text"] if obj.get("choices") else ""
            if not text:
                continue
            n = len(text.split()) if count_ids else 1
            if out["first"] is None:
                out["first"] = now
            elif n:
                out["gaps"].append(((now - last) / n, n))
            last = now
    out["end"] = time.perf_counter()
    writer.close()
    return out


def _pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def client(args) -> None:
    """Drive one wave of --concurrency streams; print its figures as JSON."""
    host, port = args.client.split(":")
    bodies = [{"model": args.model, "prompt": [(7 + 31 * i + 13 * j) % args.vocab for j in range(args.prompt_len)],
               "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
               "stream_options": {"include_usage": True}} for i in range(args.concurrency)]

    async def wave():
        return await asyncio.gather(*(_stream(host, int(port), b, args.count_ids) for b in bodies))

    runs = asyncio.run(wave())
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    ttft = [r["first"] - r["start"] for r in runs if r["first"] is not None]
    itl = [g for r in runs for g, n in r["gaps"] for _ in range(n)]
    print(json.dumps({"concurrency": args.concurrency, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                      "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
                      "itl_p50_ms": 1e3 * _pct(itl, 50), "itl_p99_ms": 1e3 * _pct(itl, 99),
                      "short": sum(r["tokens"] != args.max_tokens for r in runs)}))


# ---- the server side ----

def build_engine(args):
    import jax.numpy as jnp

    from mimo_jax.engine import Engine, auto_dtype

    dtype = auto_dtype() if args.dtype == "auto" else jnp.dtype(args.dtype)
    kwargs = dict(prefill_chunk=args.prefill_chunk, speculative_k=args.speculative_k, max_seq_len=args.max_seq_len,
                  layout=args.layout)
    if args.drafter:
        kwargs["drafter"] = args.drafter
    quant = None if args.quant_experts == "none" else args.quant_experts
    if args.checkpoint:
        path = None if args.checkpoint == "bundled" else args.checkpoint
        return Engine.from_pretrained(path, dtype=dtype, quant_experts=quant, quant_group=args.quant_group, **kwargs)
    import jax

    from mimo_jax import model
    from mimo_jax.config import load_config

    cfg = load_config(args.config)
    params = model.init_params(cfg, jax.random.PRNGKey(0), dtype)
    if quant:  # before the Engine re-lays the layers out (layout)
        from mimo_jax.quantize_model import quantize_experts

        params = quantize_experts(params, quant, args.quant_group)
    return Engine(cfg, params, **kwargs)


def run_client(url_hostport: str, args, concurrency: int, max_tokens: int, vocab: int, count_ids: bool) -> dict:
    cmd = [sys.executable, __file__, "--client", url_hostport, "--concurrency", str(concurrency), "--prompt_len",
           str(args.prompt_len), "--max_tokens", str(max_tokens), "--vocab", str(vocab), "--model", "bench"]
    cmd += ["--count_ids"] if count_ids else []
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.client_timeout)
    if done.returncode:
        raise RuntimeError(f"client failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args) -> None:
    import jax
    import uvicorn

    from mimo_jax import batch_state, batched_speculative
    from mimo_jax.batching import Batcher
    from mimo_jax.serve import create_app

    levels = [int(c) for c in args.concurrency_levels.split(",")]
    batch = args.batch_size or max(levels)
    t0 = time.perf_counter()
    engine = build_engine(args)
    cfg = engine.cfg
    what = args.checkpoint or args.config
    spec = f"speculative k={args.speculative_k} ({engine.drafter.name})" if args.speculative_k else "plain decoding"
    print(f"[{what}: {jax.devices()[0].device_kind}, {engine.params['embed'].dtype}, {engine.layout} layers, experts "
          f"{args.quant_experts}, {batch} slots x {args.max_seq_len} positions, prompt {args.prompt_len} tok, "
          f"{args.max_tokens} new tok, {spec}; built in {time.perf_counter() - t0:.1f} s]",
          flush=True)

    # batch 1, no server: Engine.generate (compiled by a first run)
    prompt = [(7 + 13 * j) % cfg.vocab_size for j in range(args.prompt_len)]
    engine.generate(prompt, max_new_tokens=args.max_tokens, stop_at_eos=False)
    t = time.perf_counter()
    one = engine.generate(prompt, max_new_tokens=args.max_tokens, stop_at_eos=False).stats
    print(f"batch-1 Engine.generate: decode {one.decode_tok_s:.1f} tok/s, prefill {one.prefill_ms:.1f} ms, "
          f"{args.max_tokens / (time.perf_counter() - t):.1f} tok/s end to end", flush=True)

    batcher = Batcher(engine, batch, args.max_seq_len, prefill_rows=args.prefill_rows or None,
                      prefill_tokens=args.prefill_tokens or None)
    t = time.perf_counter()
    shapes = batcher.prefill_shapes([args.prompt_len])
    batcher.warm_up(sampling=False, prompt_lens=[args.prompt_len])  # the waves are greedy, all one prompt length
    print(f"[server warm-up ({len(shapes)} batched prefill calls: rows {','.join(str(r) for _, r, _ in shapes)} x "
          f"{shapes[0][2]} tokens, up to {batcher.prefill_tokens} tokens a tick; greedy steps for every slot "
          f"bucket): {time.perf_counter() - t:.1f} s]", flush=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(batcher, "bench"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    hostport = f"127.0.0.1:{sock.getsockname()[1]}"
    count_ids = engine.tokenizer is None
    compiled = lambda: (batch_state.generate._cache_size(), batched_speculative.generate._cache_size(),  # noqa: E731
                        batch_state.prefill._cache_size(), batched_speculative.prefill._cache_size(),
                        batch_state.free._cache_size())

    rows = []
    print("\n| concurrent | aggregate tok/s | x batch-1 | TTFT p50 / p99 ms | inter-token p50 / p99 ms | wall s |")
    print("|---|---|---|---|---|---|", flush=True)
    for c in levels:
        run_client(hostport, args, c, min(8, args.max_tokens), cfg.vocab_size, count_ids)  # untimed
        before = compiled()
        r = run_client(hostport, args, c, args.max_tokens, cfg.vocab_size, count_ids)
        r["compiled_during"] = compiled() != before
        rows.append(r)
        ratio = r["tok_s"] / rows[0]["tok_s"] if rows[0]["concurrency"] == 1 else float("nan")
        print(f"| {c} | {r['tok_s']:.1f} | {ratio:.2f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['wall_s']:.2f} |"
              + (" (compiled during the wave!)" if r["compiled_during"] else "")
              + (f" ({r['short']} streams short)" if r["short"] else ""), flush=True)
    if batcher.speculative_k:
        print(f"[speculative: {batcher.accepted_total / max(batcher.slot_steps_total, 1):.2f} drafts accepted per "
              f"slot step]")
    server.should_exit = True
    thread.join(timeout=30)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"what": what, "args": vars(args), "batch1_decode_tok_s":
                                               one.decode_tok_s, "levels": rows}, indent=1))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="random weights of this config (default configs/smollm2_135m.json; --quick: "
                   "configs/tiny_llama.json)")
    p.add_argument("--checkpoint", help="a checkpoint instead (\"bundled\": the bundled SmolLM2)")
    p.add_argument("--quant_experts", default="none", choices=("none", "int4_sym", "int4_asym", "mxfp4"))
    p.add_argument("--quant_group", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--layout", default="auto", help="Engine layout: auto, scan, unrolled")
    p.add_argument("--concurrency_levels", help="default 1,8,32,64 (--quick: 1,4)")
    p.add_argument("--batch_size", type=int, default=0, help="slots (default: the largest level)")
    p.add_argument("--prompt_len", type=int, help="default 128 (--quick: 16)")
    p.add_argument("--max_tokens", type=int, help="default 128 (--quick: 16)")
    p.add_argument("--max_seq_len", type=int, default=0, help="positions per slot (default prompt + max_tokens "
                   "+ speculative slack, rounded up to 64)")
    p.add_argument("--prefill_chunk", type=int, help="default 512 (--quick: 16)")
    p.add_argument("--prefill_rows", type=int, default=0, help="requests prefilled in one call at most (default: "
                   "the slots)")
    p.add_argument("--prefill_tokens", type=int, default=0, help="padded prompt tokens prefilled between two steps "
                   "(default: 8 x prefill_chunk)")
    p.add_argument("--speculative_k", type=int, default=0)
    p.add_argument("--drafter", help="with --speculative_k: Engine's drafter (default: the engine's; \"oracle\": "
                   "the target's own greedy continuation, every draft accepted: the step at full acceptance)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: levels 1,4, 16 + 16 tokens (tiny_llama "
                   "unless --config)")
    p.add_argument("--client_timeout", type=float, default=600)
    # the client process's own flags
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--model", default="bench", help=argparse.SUPPRESS)
    p.add_argument("--count_ids", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(config="configs/smollm2_135m.json", concurrency_levels="1,8,32,64", prompt_len=128,
                    max_tokens=128, prefill_chunk=512)
    if args.quick:
        defaults.update(config="configs/tiny_llama.json", concurrency_levels="1,4", prompt_len=16, max_tokens=16,
                        prefill_chunk=16)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.max_seq_len:
        slack = 2 * (args.speculative_k + 1) if args.speculative_k else 0
        args.max_seq_len = -(-(args.prompt_len + args.max_tokens + slack) // 64) * 64
    if not args.checkpoint and not Path(args.config).is_absolute():
        args.config = str(ROOT / args.config)
    return args


if __name__ == "__main__":
    _args = parse()
    if _args.client:
        client(_args)
    else:
        sys.path.insert(0, str(ROOT))  # run from anywhere without installing
        os.chdir(ROOT)
        main(_args)
