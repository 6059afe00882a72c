"""What FP8 block rounding of the dense weights does to a real model's predictions (CPU, the bundled SmolLM2-135M).

    python benchmarks/fp8_quality.py [--seqs 8] [--length 256] [--gen 96] [--out DIR]

`--dense fp8` / `fp8_all` round weights to FP8 e4m3 with one scale per 128 x 128 block (mimo_jax/fp8.py). For
MiMo's q/k/v and dense MLP that is the hub's own format (nothing changes); fp8_all also rounds o_proj and lm_head,
which the hub keeps in bf16: a rounding of our own, like int4 experts. The only real model here is the bundled
SmolLM2-135M, so this measures the rounding there:
  - reference: the GGUF's weights dequantized to float32 (its Q4_1 is the model we ship), the tied lm_head untied
    (a copy of the embedding: the same model, with an lm_head for fp8_all to round);
  - variants: quantize_model.quantize_dense(params, "fp8" | "fp8_layers" | "fp8_all"); for scale, the layers' q/k/v/o and MLP
    rounded to int4 (symmetric, groups of 64 along K: the format of our int4 experts) and dequantized, lm_head left
    as it is;
  - code: held-out standard-library windows (files the drafter trainer never sees), teacher-forced;
  - chat: held-out chat prompts, each followed by the reference's own greedy reply, teacher-forced over the reply;
  - per variant: top-1 agreement with the reference's argmax, mean KL(reference || variant) in nats, the text's
    mean NLL against the reference's, and greedy decoding from each chat prompt: tokens identical to the
    reference's before the first difference.
Float32 activations throughout, so the figures are the weights' rounding alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import drafter_data, model, quant
from mimo_jax.engine import Engine
from mimo_jax.gguf_loading import load_gguf
from mimo_jax.gguf_reader import default_gguf_path, read_gguf
from mimo_jax.plan import path_keys
from mimo_jax.quantize_model import is_dense_fp8_leaf, quantize_dense
from mimo_jax.tokenizer import Tokenizer


def untied(cfg, params):
    """The same model with lm_head = embedding^T as its own leaf."""
    if not cfg.tie_word_embeddings:
        return cfg, params
    return cfg.replace(tie_word_embeddings=False), {**params, "lm_head": params["embed"].T}


def int4_rounded(params, group: int = 64):
    """The layers' q/k/v/o and MLP weights rounded to int4_sym (groups along K) and dequantized, matrix by matrix."""
    def r(path, w):
        keys = path_keys(path)
        if not is_dense_fp8_leaf(keys, w.ndim, "fp8_all") or keys == ("lm_head",):
            return w
        mats = [quant.dequantize(quant.quantize(w[i], fmt="int4_sym", group_size=group), w.dtype) for i in range(len(w))]
        return jnp.stack(mats)

    return jax.tree_util.tree_map_with_path(r, params)


def log_probs(params, cfg, seqs: np.ndarray) -> np.ndarray:
    """Teacher-forced log-softmax [B, T, V] over token rows seqs [B, T]."""
    b, t = seqs.shape
    cache = model.init_cache(cfg, b, t, jnp.float32)
    logits, _ = model.forward(params, jnp.asarray(seqs, jnp.int32), jnp.arange(t, dtype=jnp.int32), cache, cfg)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def compare(ref_lp, lp, seqs, mask):
    """mask [B, T-1]: the positions scored (predicting token t+1 from the prefix through t)."""
    r, q = ref_lp[:, :-1], lp[:, :-1]
    nxt = seqs[:, 1:]
    agree = (r.argmax(-1) == q.argmax(-1))[mask].mean()
    kl = (np.exp(r) * (r - q)).sum(-1)[mask].mean()
    nll = lambda a: -np.take_along_axis(a, nxt[..., None], -1)[..., 0][mask].mean()  # noqa: E731
    return {"top1_agree": float(agree), "kl": float(kl), "nll": float(nll(q)), "nll_ref": float(nll(r))}


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=8, help="sequences per set")
    ap.add_argument("--length", type=int, default=256, help="tokens per code window")
    ap.add_argument("--gen", type=int, default=96, help="reference reply tokens per chat prompt")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    t0 = time.time()
    gg = read_gguf(default_gguf_path())
    cfg, params = untied(*load_gguf(gg, jnp.float32, keep_int4=False))
    tok = Tokenizer.from_gguf(gg)
    variants = {"fp8": quantize_dense(params, "fp8"), "fp8_layers": quantize_dense(params, "fp8_layers"),
                "fp8_all": quantize_dense(params, "fp8_all"),
                "int4 g64 (layers' q/k/v/o + MLP)": int4_rounded(params)}

    code = np.asarray(drafter_data.code_prompts(tok, a.seqs, a.length, held_out=True, seed=0))
    chat = drafter_data.chat_prompts(tok, a.seqs, held_out=True, seed=0)
    ref_engine = Engine(cfg, params, max_seq_len=512)
    replies = [ref_engine.generate(p, a.gen, stop_at_eos=False).token_ids for p in chat]
    width = max(len(p) + len(r) for p, r in zip(chat, replies))
    chat_rows = np.zeros((len(chat), width), np.int64)
    chat_mask = np.zeros((len(chat), width - 1), bool)
    for i, (p, r) in enumerate(zip(chat, replies)):
        chat_rows[i, :len(p) + len(r)] = p + r
        chat_mask[i, len(p) - 1:len(p) + len(r) - 1] = True  # the reply's tokens, each from its prefix
    sets = {"code": (code, np.ones((len(code), code.shape[1] - 1), bool)), "chat": (chat_rows, chat_mask)}
    refs = {name: log_probs(params, cfg, rows) for name, (rows, _) in sets.items()}

    out = {"model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized to f32, lm_head untied)", "seqs": a.seqs,
           "length": a.length, "gen": a.gen, "rows": []}
    print(f"SmolLM2-135M, f32 on {jax.devices()[0].platform}; {a.seqs} code windows x {a.length} tokens, "
          f"{a.seqs} chat prompts x {a.gen}-token reference replies", flush=True)
    print("| dense | set | top-1 agreement | mean KL (nats) | NLL (reference) | greedy tokens equal before the first "
          "difference (of %d) |" % a.gen)
    print("|---|---|---|---|---|---|")
    for vname, vparams in variants.items():
        engine = Engine(cfg, vparams, max_seq_len=512)
        same = [first_difference(engine.generate(p, a.gen, stop_at_eos=False).token_ids, r)
                for p, r in zip(chat, replies)]
        for sname, (rows, mask) in sets.items():
            row = {"dense": vname, "set": sname, **compare(refs[sname], log_probs(vparams, cfg, rows), rows, mask)}
            if sname == "chat":
                row["greedy_equal_prefix"] = same
            out["rows"].append(row)
            greedy = f"mean {np.mean(same):.1f}, min {min(same)}" if sname == "chat" else ""
            print(f"| {vname} | {sname} | {100 * row['top1_agree']:.2f}% | {row['kl']:.2e} | {row['nll']:.4f} "
                  f"({row['nll_ref']:.4f}) | {greedy} |", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "fp8_quality.json", "w") as f:
        json.dump(out, f, indent=1)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
