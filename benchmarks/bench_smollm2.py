"""SmolLM2-135M-Instruct (GGUF Q4_1) batch-1 greedy decode: mimo_jax vs transformers on the same device.

    python benchmarks/bench_smollm2.py                 # CPU here, GPU where jax and torch see one
Both load the same GGUF file (transformers dequantizes it through `gguf_file=`); both decode greedily from the
same prompt. Prints tok/s for each, the ratio, and whether the first tokens agree.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax
import jax.numpy as jnp


def ours(path, prompt_ids, n, dtype):
    from mimo_jax.engine import Engine

    e = Engine.from_gguf(path, dtype=dtype, max_seq_len=1024)
    e.generate(prompt_ids, max_new_tokens=8, stop_at_eos=False)  # compile
    out = e.generate(prompt_ids, max_new_tokens=n, stop_at_eos=False)
    return out.token_ids, out.stats.decode_tok_s, out.stats.prefill_ms


def theirs(path, prompt_ids, n, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM

    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=tdtype).to(device).eval()
    ids = torch.tensor([prompt_ids], device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        m.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        first = m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t
    del first
    return out[0, len(prompt_ids):].tolist(), (n - 1) / max(total - t_first, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    import torch

    from mimo_jax.gguf_reader import default_gguf_path
    from mimo_jax.tokenizer import Tokenizer

    path = default_gguf_path()
    on_gpu = jax.default_backend() == "gpu"
    dtype = {"auto": jnp.bfloat16 if on_gpu else jnp.float32, "bfloat16": jnp.bfloat16,
             "float32": jnp.float32}[args.dtype]
    tok = Tokenizer.from_gguf(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    ids = tok.encode(prompt)
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    a, ours_tps, prefill_ms = ours(path, ids, args.new_tokens, dtype)
    b, theirs_tps = theirs(path, ids, args.new_tokens, dtype, device)
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"device: jax {jax.devices()[0].device_kind} / torch {device}; dtype {jnp.dtype(dtype).name}; "
          f"prompt {len(ids)} tok; {args.new_tokens} new tokens, greedy")
    print(f"mimo_jax     : {ours_tps:8.1f} tok/s (prefill {prefill_ms:.1f} ms)")
    print(f"transformers : {theirs_tps:8.1f} tok/s")
    print(f"ratio {ours_tps / theirs_tps:.2f}x; greedy tokens identical for the first {agree} of {len(a)}")
    print("text:", tok.decode(a)[:200].replace("\n", " "))


if __name__ == "__main__":
    main()
