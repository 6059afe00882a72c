"""Train MTP layers (MiMo's layout, mtp.py) as the drafter of a target model by self-distillation, in JAX with optax.

    python -m mimo_jax.train_mtp --out /tmp/mtp --steps 2000                   # the bundled SmolLM2 (1 new MTP layer)
    python -m mimo_jax.train_mtp --model PATH --out DIR --resume               # go on from DIR/last.safetensors
    python -m mimo_jax.train_mtp ... --eval_prompts 8                          # then measure acceptance, k = --k

The data is train_drafter's (drafter_data.py: the target's greedy continuations of stdlib code and chat prompts,
teacher-forced stdlib windows, cached under --cache_dir). A model with MTP layers starts from its own (MiMo
checkpoints); one without them gets --layers new ones, the block initialised from its last layer
(mtp_drafter.init_weights).
  loss   the chain teacher-forced over whole sequences, --depths deep: depth d (layer d mod n) at position t reads
         depth d-1's output at t-1 (depth 0: the target's normed hidden at t) and the token at t+1, and predicts
         the target's greedy token after t+1 (cross-entropy, + --soft_weight x cross-entropy to its distribution),
         weighted exp(-d / --decay); depth d counts only where the d tokens it was fed after the chain's start are
         the target's greedy ones (what it sees when its drafts were accepted). This is what decoding runs
         (speculative.mtp_chain feeds the layers the same way when it refreshes them).
  files  OUT/last.safetensors (float32 weights, optimizer state, step: --resume), OUT/drafter.safetensors
         (float16: what --drafter PATH / Engine(drafter=PATH) attaches), OUT/eval.json.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import drafter_files, model, mtp, mtp_drafter
from mimo_jax.config import ModelConfig
from mimo_jax.drafter_data import Data, DataNotCached, datasets, draft_vocab
from mimo_jax.errors import InputError
from mimo_jax.train_drafter import Schedule, lr_at, optimizer, report, target_pass, time_budget


def greedy_run(tokens, labels):
    """[B,T] -> run[b, s]: how many consecutive tokens ending at s are the target's greedy ones (token s ==
    labels[s - 1]); 0 at s = 0 and after padding."""
    ok = np.zeros(tokens.shape, np.int32)
    ok[:, 1:] = (tokens[:, 1:] == labels[:, :-1]) & (tokens[:, 1:] >= 0)
    run = np.zeros_like(ok)
    for s in range(1, tokens.shape[1]):
        run[:, s] = np.where(ok[:, s] > 0, run[:, s - 1] + 1, 0)
    return run


def make_batch(data: Data, rows) -> dict:
    """Whole sequences: tokens, label[t] = the target's greedy token after t + 1 (what position t's drafts
    predict), run[t] = greedy_run at t + 1."""
    tokens, labels = data.tokens[rows], data.labels[rows]
    shift = lambda a: np.concatenate([a[:, 1:], np.full((len(a), 1), -1, a.dtype)], axis=1)  # noqa: E731
    return {"tokens": tokens, "label": shift(labels), "run": shift(greedy_run(tokens, labels))}


def loss_fn(w, batch, tparams, mcfg: ModelConfig, depths: int, soft_weight: float, decay: float):
    """-> (loss, (accepted drafts summed over chain starts, chain starts, label tokens))."""
    tokens = batch["tokens"]
    b, t = tokens.shape
    _, normed = target_pass(tparams, tokens, mcfg, ())
    params = {**tparams, "mtp": w}
    nxt = jnp.concatenate([jnp.maximum(tokens[:, 1:], 0), jnp.zeros((b, 1), jnp.int32)], axis=1)
    positions = jnp.arange(t, dtype=jnp.int32)
    label = batch["label"]
    target = jax.nn.softmax(model.head(tparams, jnp.concatenate([normed[:, 1:], normed[:, -1:]], axis=1), mcfg), -1)
    total, weight_sum, hits, hidden = 0.0, 0.0, [], normed
    for d in range(depths):
        if d:
            hidden = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
        cache = mtp.init_cache(mcfg, b, normed.dtype, 0)
        hidden, logits, _ = mtp.mtp_layer(params, d % mcfg.num_mtp_layers, hidden, nxt, positions, cache, mcfg)
        logp = jax.nn.log_softmax(logits, axis=-1)
        valid = (label >= 0) & (batch["run"] >= d) & (positions[None] >= d)
        hard = -jnp.take_along_axis(logp, jnp.maximum(label, 0)[..., None], axis=-1)[..., 0]
        soft = -jnp.sum(target * logp, axis=-1)
        wd = np.exp(-d / decay) * valid
        total = total + jnp.sum(wd * (hard + soft_weight * soft))
        weight_sum = weight_sum + jnp.sum(wd)
        hit = (jnp.argmax(logits, axis=-1) == label) & valid
        hits.append(jnp.pad(hit[:, d:], ((0, 0), (0, d))))  # aligned at the chain's start t - d
    chain = jnp.cumprod(jnp.stack(hits).astype(jnp.int32), axis=0)  # [depths, B, T]
    starts = label >= 0
    return total / jnp.maximum(weight_sum, 1.0), (jnp.sum(chain.sum(0) * starts), jnp.sum(starts),
                                                  jnp.sum(label >= 0))


@functools.partial(jax.jit, static_argnames=("mcfg", "depths", "soft_weight", "decay"), donate_argnums=(0, 1))
def train_step(w, opt_state, batch, tparams, lr, *, mcfg: ModelConfig, depths: int, soft_weight: float,
               decay: float):
    """One AdamW step on loss_fn -> (weights, optimizer state, loss, (accepted, chain starts, labels))."""
    import optax

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(w, batch, tparams, mcfg, depths, soft_weight,
                                                                     decay)
    opt_state[1].hyperparams["learning_rate"] = lr
    updates, opt_state = optimizer().update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state, loss, stats


def save_state(path: Path, w, opt_state, step: int, mcfg, target, extra: dict):
    """float32 weights + optimizer state + step (+ extra) in one file, written atomically."""
    mtp_drafter.save(path, w, mcfg, target, {**extra, "step": step}, dtype=np.float32,
                     arrays=drafter_files.opt_arrays(opt_state))


def load_state(path: Path, target: ModelConfig, opt_state):
    _, w = mtp_drafter.load(path, target)
    meta = drafter_files.header(path)
    return w, drafter_files.read_opt(path, opt_state), int(json.loads(meta["step"])), \
        float(json.loads(meta.get("train_s", "0")))


def train(engine, data: Data, out: Path, steps: int, batch: int, lr: float, layers: int = 1, window: int = 128,
          depths: int = 4, soft_weight: float = 0.5, decay: float = 4.0, seed: int = 0, resume: bool = False,
          max_minutes: float = 0.0, save_every: int = 500, log: bool = True, log_every: int = 10, init=None):
    """-> (MTP weights, their config, history of (step, loss, acceptance, lr)). The learning rate follows
    train_drafter's schedule (warm-up, cosine to lr / 10 over --steps or max_minutes). init: MTP weights to start
    from (an earlier drafter file's, `layers` of them) instead of fresh ones; the optimizer and schedule start
    fresh (a fine-tune)."""
    from tqdm import tqdm

    cfg, tparams = engine.cfg, engine.params
    n = cfg.num_mtp_layers or layers
    mcfg = mtp_drafter.config_for(cfg, n, window if not cfg.num_mtp_layers else cfg.sliding_window)
    opt = optimizer()
    w = mtp_drafter.init_weights(tparams, mcfg, jax.random.PRNGKey(seed))
    if init is not None:
        if jax.tree_util.tree_structure(init) != jax.tree_util.tree_structure(w) or any(
                a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(w))):
            raise InputError(f"init: MTP weights of another shape than {n} layer(s) for this model")
        w = jax.tree_util.tree_map(lambda a: jnp.array(a, jnp.float32, copy=True), init)
    opt_state, start, done_s = opt.init(w), 0, 0.0
    last = out / "last.safetensors"
    if resume and last.is_file():
        w, opt_state, start, done_s = load_state(last, cfg, opt_state)
    sched = Schedule(steps, 0.0, 60 * max_minutes, 0.0)
    tparams = {k: v for k, v in tparams.items() if k != "mtp"}

    rng = np.random.default_rng([seed, start])
    hist, acc_sum, acc_n = [], 0.0, 0.0
    bar = tqdm(total=steps, initial=start, desc="train mtp", file=sys.stderr, disable=not log)
    t0, elapsed = time.perf_counter(), 0.0
    for s in range(start, steps):
        lr_s = lr_at(sched.progress(s, elapsed), lr)
        rows = rng.choice(len(data.tokens), batch, replace=len(data.tokens) < batch)
        b = jax.tree_util.tree_map(jnp.asarray, make_batch(data, rows))
        w, opt_state, loss, (acc, starts, labels) = train_step(w, opt_state, b, tparams, jnp.float32(lr_s), mcfg=mcfg,
                                                               depths=depths, soft_weight=soft_weight, decay=decay)
        elapsed = time.perf_counter() - t0
        stop = sched.stop(elapsed)
        if s % log_every == 0 or s == steps - 1 or stop:
            loss, acc, starts = float(loss), float(acc), float(starts)
            acc_sum, acc_n = 0.9 * acc_sum + acc, 0.9 * acc_n + starts
            hist.append((s, loss, acc_sum / max(acc_n, 1.0), lr_s))
            bar.set_postfix(loss=f"{loss:.3f}", accept=f"{acc_sum / max(acc_n, 1.0):.2f}", lr=f"{lr_s:.1e}")
        bar.update(1)
        if (s + 1) % save_every == 0 or s == steps - 1 or stop:
            save_state(last, w, opt_state, s + 1, mcfg, cfg, {"train_s": done_s + elapsed})
        if stop:
            break
    bar.close()
    return w, mcfg, hist


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mimo_jax.train_mtp", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="target: a .gguf or checkpoint dir (default: bundled SmolLM2)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--cache_dir", default="/tmp/mimo_drafter_data", help="where generated training data is cached "
                    "(shared with train_drafter: the same data flags reuse its files)")
    ap.add_argument("--code_prompts", type=int, default=128)
    ap.add_argument("--chat_prompts", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--gen_len", type=int, default=128)
    ap.add_argument("--gen_batch", type=int, default=32)
    ap.add_argument("--source_windows", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=1, help="MTP layers for a model without them")
    ap.add_argument("--window", type=int, default=128, help="their sliding window (a model without MTP layers)")
    ap.add_argument("--depths", type=int, default=4, help="chain depths trained (the layers are reused mod n)")
    ap.add_argument("--soft_weight", type=float, default=0.5)
    ap.add_argument("--decay", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max_minutes", type=float, default=0.0)
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time by which training stops (0: none)")
    ap.add_argument("--data_seed", type=int, default=0, help="other training prompts and source windows than seed "
                    "0's (train_drafter's flag: the same value reuses its cached data)")
    ap.add_argument("--require_cache", action="store_true")
    ap.add_argument("--eval_prompts", type=int, default=8)
    ap.add_argument("--eval_tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--draft_vocab", type=int, default=0, help="tokens the drafter may propose (the target's most "
                    "frequent labels in the data; each draft position then reads only their lm_head rows: for a "
                    "152K-token head; on SmolLM2 8192 cost chat acceptance, BENCHMARKS.md). 0 = every token; an "
                    "--init file's own vocabulary wins")
    ap.add_argument("--init", default=None, help="start from this MTP drafter file's weights (fine-tuning; its layer "
                    "count replaces --layers; optimizer and schedule start fresh)")
    a = ap.parse_args(argv)
    if a.model is not None and not Path(a.model).exists():
        ap.error(f"--model {a.model}: no such file or directory")
    for name in ("steps", "batch", "layers", "window", "depths", "k"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.draft_vocab < 0:
        ap.error(f"--draft_vocab must be >= 0, got {a.draft_vocab}")
    if a.init is not None and not Path(a.init).is_file():
        ap.error(f"--init {a.init}: no such file")
    if a.init is not None and not mtp_drafter.is_mtp_file(a.init):
        ap.error(f"--init {a.init}: not an MTP drafter file (python -m mimo_jax.train_mtp writes them)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from mimo_jax.engine import Engine

    t_start = time.perf_counter()
    # scan: init copies the stacked last layer; unfolded: the numerics the speculative step verifies with
    engine = Engine.from_pretrained(a.model, max_seq_len=1024, layout="scan", fold_norms=False)
    tag = "bundled-smollm2"
    if a.model:
        m = Path(a.model).resolve()
        tag = f"{m}:{m.stat().st_size}" if m.is_file() else str(m)
    try:
        data = datasets(engine, a, tag, require_cache=a.require_cache)["train"]
    except DataNotCached as e:
        print(f"NO CACHED DATA: {e}", file=sys.stderr)
        sys.exit(3)
    init, layers, window = None, a.layers, a.window
    vocab = None
    if 0 < a.draft_vocab < engine.cfg.vocab_size:
        vocab = draft_vocab(data, a.draft_vocab, engine.cfg.vocab_size)
    if a.init:
        try:
            icfg, init = mtp_drafter.load(a.init, engine.cfg)
            own = mtp_drafter.draft_vocab(a.init, engine.cfg)
            vocab = vocab if own is None else own
        except InputError as e:
            ap.error(f"--init: {e}")
        layers, window = icfg.num_mtp_layers, icfg.attention("sliding").window
        print(f"[--init {a.init}: {layers} MTP layer(s), window {window}]", file=sys.stderr)
    t0 = time.perf_counter()
    w, mcfg, hist = train(engine, data, out, a.steps, a.batch, a.lr, layers, window, a.depths, a.soft_weight,
                          a.decay, a.seed, a.resume, time_budget(a.max_minutes, a.deadline), init=init)
    info = {"train_steps": hist[-1][0] + 1 if hist else 0, "train_s": round(time.perf_counter() - t0, 1),
            "label_tokens_per_step": a.batch * data.tokens.shape[1] * a.depths, "generated_tokens": data.generated,
            "device": jax.devices()[0].device_kind, "final_loss": hist[-1][1] if hist else None,
            "train_acceptance": hist[-1][2] if hist else None, "layers": mcfg.num_mtp_layers, "depths": a.depths}
    final = out / "drafter.safetensors"
    if vocab is not None:
        info["draft_vocab"] = len(vocab)
        info["draft_vocab_coverage"] = round(float(np.isin(data.labels[data.labels >= 0], np.asarray(vocab)).mean()), 4)
    mtp_drafter.save(final, w, mcfg, engine.cfg, {"training": info}, vocab=vocab)
    print(f"[wrote {final} ({final.stat().st_size / 1e6:.1f} MB); {info}]", file=sys.stderr)
    report(engine, final, out, {"training": info}, a, t_start)


if __name__ == "__main__":
    main()
