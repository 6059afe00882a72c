"""How far each small-dense-weight layout's logits are from f32, on a real model, on this device:

    python benchmarks/fold_precision.py [--model SmolLM2.gguf] [--prompts 3]

Rows: bf16 weights as loaded ("kn"), out-in (ops.OutInWeight), fused, folded norms, fused + folded, and f32
fused + folded; for each held-out prompt (40 tokens: a 24-token prefill, one 9-token chunk with the cache (a
k = 8 verify's shape), then 7 one-token decode steps), the mean relative error of the logits against the f32
model (max |difference| / max |f32 logit| per position) and how often the argmax agrees, per part. Session 11
used it to rule out a precision loss from folded norms (prefill and decode; the verify column came after)."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import model, ops, train_drafter
from mimo_jax.engine import Engine

PREFILL, VERIFY, TOTAL = 24, 9, 40


def load_plain(path):
    """The checkpoint's params as loaded (the Engine converts its own on a GPU: no out-in, no fusing for this
    load)."""
    keep = ops.OUT_IN_ELEMENTS, ops.OUT_IN_FUSE
    ops.OUT_IN_ELEMENTS, ops.OUT_IN_FUSE = 0, False
    try:
        e = Engine.from_pretrained(path, dtype=jnp.float32, layout="scan")
    finally:
        ops.OUT_IN_ELEMENTS, ops.OUT_IN_FUSE = keep
    return e.cfg, e.params, e.tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=".gguf or checkpoint dir (default: the bundled SmolLM2)")
    ap.add_argument("--prompts", type=int, default=3, help="held-out prompts per set")
    a = ap.parse_args()
    cfg, p32, tokenizer = load_plain(a.model)
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, p32)
    fwd = jax.jit(model.forward, static_argnums=(4,))

    def logits(params, ids, dtype):
        cache = model.init_cache(cfg, 1, 256, dtype)
        lg, cache = fwd(params, jnp.asarray([ids[:PREFILL]]), jnp.arange(PREFILL, dtype=jnp.int32), cache, cfg)
        out = [np.asarray(lg[0], np.float32)]
        chunk = jnp.arange(PREFILL, PREFILL + VERIFY, dtype=jnp.int32)
        lg, cache = fwd(params, jnp.asarray([ids[PREFILL:PREFILL + VERIFY]]), chunk, cache, cfg)
        out.append(np.asarray(lg[0], np.float32))
        for t in range(PREFILL + VERIFY, len(ids)):
            lg, cache = fwd(params, jnp.asarray([[ids[t]]]), jnp.asarray([t], jnp.int32), cache, cfg)
            out.append(np.asarray(lg[0], np.float32))
        return np.concatenate(out)

    variants = (("bf16 kn", p16, jnp.bfloat16), ("bf16 out-in", ops.out_in_layout(p16), jnp.bfloat16),
                ("bf16 fuse", ops.out_in_layout(p16, fuse=True), jnp.bfloat16),
                ("bf16 fold", ops.out_in_layout(p16, fold_norms=True), jnp.bfloat16),
                ("bf16 fuse+fold", ops.out_in_layout(p16, fuse=True, fold_norms=True), jnp.bfloat16),
                ("f32 fuse+fold", ops.out_in_layout(p32, fuse=True, fold_norms=True), jnp.float32))
    print(f"device {jax.devices()[0].device_kind}")
    for name, prompts in train_drafter.eval_prompts(tokenizer, a.prompts, 64).items():
        for ids in prompts:
            ids = list(ids[:TOTAL])
            ref = logits(p32, ids, jnp.float32)
            for tag, params, dtype in variants:
                lg = logits(params, ids, dtype)
                err = np.abs(lg - ref).max(-1) / np.abs(ref).max(-1)
                agree = lg.argmax(-1) == ref.argmax(-1)
                parts = {"prefill": slice(0, PREFILL), "verify": slice(PREFILL, PREFILL + VERIFY),
                         "decode": slice(PREFILL + VERIFY, None)}
                print(f"{name} {tag:15s} rel err " + " ".join(f"{k} {err[v].mean():.4f}" for k, v in parts.items())
                      + f" (max {err.max():.4f}) | argmax agree "
                      + " ".join(f"{k} {agree[v].mean():.3f}" for k, v in parts.items()), flush=True)


if __name__ == "__main__":
    main()
