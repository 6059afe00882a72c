"""Train a block drafter (block_drafter.py) for a target model by self-distillation, in JAX with optax.

    python -m mimo_jax.train_drafter --out /tmp/drafter --steps 2000            # the bundled SmolLM2
    python -m mimo_jax.train_drafter --model PATH.gguf --out DIR --resume       # go on from DIR/last.safetensors
    python -m mimo_jax.train_drafter ... --plan_minutes 18 --deadline T [--resume] [--finish]   # one of several calls

No labelled data: the target writes its own training set (drafter_data.py: stdlib code and chat prompts, the
target's greedy continuations, teacher-forced source windows; token ids only, cached under --cache_dir, so a
second run or a resume generates nothing, and --require_cache makes a missing cache an error).
  features the drafter conditions on (the target's normed last layer and the outputs of --target_layers, what the
           verify pass gives it at decode time) and the target's next-token distributions are recomputed by one
           teacher-forced target pass inside every training step (cheaper on a GPU than moving stored hidden
           states: 4.6 KB a token with 3 taps).
  loss     a block at anchor P (any position of the continuation) predicts tokens P+1..P+B; slot j's loss is
           cross-entropy to the target's greedy token plus --soft_weight x cross-entropy to its distribution
           (both over the draft vocabulary), weighted exp(-j / --decay) (a draft counts only if the ones
           before it were accepted, DFlash's weighting). Many anchors of a sequence share one context pass.
  schedule AdamW, linear warm-up then cosine decay to lr/10 over the run's progress (Schedule): max(step /
           --steps, training seconds / planned seconds). The plan is --plan_minutes over all calls of a run
           (the seconds done are saved in last.safetensors and restored by --resume, so warm-up happens once and
           the decay goes on where it stopped; --finish: this call ends the decay at its own time limit), else
           this call's --max_minutes / --deadline (a run stopped by its time budget still ends its decay).
  resume   last.safetensors holds weights, optimizer state, step, training seconds and the batch sampler's rng
           state: a resumed run draws the batches an uninterrupted one would have.
  progress tqdm: tokens/s (label tokens), loss, running acceptance (mean accepted-prefix length of the
           blocks, the figure greedy decoding gets if the context were the training one).
  files    OUT/last.safetensors (weights + optimizer state + step: --resume), OUT/drafter.safetensors (the
           weights only, float16: what Engine(drafter=PATH) / --drafter PATH loads), OUT/eval.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import block_drafter as bd
from mimo_jax import drafter_files
from mimo_jax import model
from mimo_jax.config import ModelConfig
from mimo_jax.drafter_data import Data, DataNotCached, chat_prompts, code_prompts, datasets, draft_vocab
from mimo_jax.errors import InputError


# ---- training ----

def target_pass(tparams, tokens, cfg: ModelConfig, taps: tuple):
    """The target over whole sequences (teacher-forced; -1 padding read as token 0 after the end, which no earlier
    position sees) -> (the drafter's features [B,T,F*H], normed last layer [B,T,H]); no gradient."""
    b, t = tokens.shape
    cache = model.init_cache(cfg, b, t, tparams["embed"].dtype)
    out = model.forward_hidden(tparams, jnp.maximum(tokens, 0), jnp.arange(t, dtype=jnp.int32), cache, cfg,
                               taps=taps)
    normed = model.final_norm(tparams, out[0], cfg)
    feats = bd.features(normed, out[2], cfg.rms_norm_eps) if taps else normed
    return jax.lax.stop_gradient(feats), jax.lax.stop_gradient(normed)


def loss_fn(w, batch, tparams, vocab, cfg, d: bd.BlockConfig, soft_weight: float, decay: float, head=None):
    """Cross-entropy of each block slot to the target's greedy token (+ soft_weight x to its distribution), the
    target's features and distributions from one pass over the batch's sequences. tparams: the target's
    params; head: its lm_head rows for the draft vocabulary (bd.head_rows, default gathered here)."""
    feats, normed = target_pass(tparams, batch["tokens"], cfg, d.target_layers)
    rows = (head if head is not None else bd.head_rows(tparams, cfg, vocab)).astype(jnp.float32)
    logits = bd.block_logits(w, vocab, tparams, cfg, d, feats, batch["ctx_pos"], batch["token"],
                             batch["position"], d.block_size, rows)  # [B,A,blk,Vd]
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = batch["label_sub"] >= 0
    hard = -jnp.take_along_axis(logp, jnp.maximum(batch["label_sub"], 0)[..., None], axis=-1)[..., 0]
    at = normed[jnp.arange(normed.shape[0])[:, None, None], batch["at"]].astype(jnp.float32)  # [B,A,blk,H]
    target = jax.nn.softmax(jnp.einsum("bajh,vh->bajv", at, rows, preferred_element_type=jnp.float32), axis=-1)
    soft = -jnp.sum(target * logp, axis=-1)
    weight = jnp.exp(-jnp.arange(d.block_size) / decay) * batch["label_ok"]
    loss = jnp.sum(weight * (jnp.where(valid, hard, 0.0) + soft_weight * soft)) / jnp.maximum(jnp.sum(weight), 1)
    hit = (jnp.argmax(logits, axis=-1) == batch["label_sub"]) & (batch["label_ok"] > 0)
    accepted = jnp.sum(jnp.cumprod(hit.astype(jnp.int32), axis=-1), axis=-1)  # [B,A]
    full = batch["label_ok"][..., -1] > 0
    return loss, (jnp.sum(accepted * full), jnp.sum(full), jnp.sum(batch["label_ok"]))


@functools.lru_cache(maxsize=None)
def optimizer():
    """AdamW (its learning rate set per step: lr_at) after clipping the global norm to 1; one object, so that
    train_step compiles once per shape in a process (several train() calls: a resumed run, tests, a notebook)."""
    import optax

    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.01))


@functools.partial(jax.jit, static_argnames=("cfg", "d", "soft_weight", "decay"), donate_argnums=(0, 1))
def train_step(w, opt_state, batch, tparams, vocab, head, lr, *, cfg: ModelConfig, d: bd.BlockConfig,
               soft_weight: float, decay: float):
    """One AdamW step on loss_fn -> (weights, optimizer state, loss, (accepted, full blocks, labels)). The target's
    arrays are arguments, not constants to fold."""
    import optax

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(w, batch, tparams, vocab, cfg, d, soft_weight,
                                                                     decay, head)
    opt_state[1].hyperparams["learning_rate"] = lr
    updates, opt_state = optimizer().update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state, loss, stats


def make_batch(data: Data, rows, rng, anchors: int, d: bd.BlockConfig, sub_index: np.ndarray) -> dict:
    """Rows of the data set with `anchors` random anchors P each (from gen_start - 1 on); the context is the whole
    row (each block masks it to its own window). Slot j's label is the target's greedy token after P+j, used
    only while the row's tokens P+1..P+j are the target's greedy ones too (always so in a continuation)."""
    tokens, labels = data.tokens[rows], data.labels[rows]
    b, t = tokens.shape
    length = (tokens >= 0).sum(1)
    lo = np.maximum(data.gen_start[rows] - 1, 1)
    hi = np.maximum(length - 2, lo)
    pos = (lo[:, None] + (rng.random((b, anchors)) * (hi - lo + 1)[:, None]).astype(np.int32)).astype(np.int32)
    at = np.minimum(pos[..., None] + np.arange(d.block_size), t - 1)  # [B,A,blk]: slot j's label follows P+j
    ridx = np.arange(b)[:, None, None]
    lab = np.where(pos[..., None] + np.arange(d.block_size) < t, labels[ridx, at], -1)
    greedy = tokens[ridx, np.minimum(at + 1, t - 1)] == labels[ridx, at]  # token P+j+1 is the greedy one
    chain = np.concatenate([np.ones_like(greedy[..., :1]), np.cumprod(greedy[..., :-1], axis=-1)], axis=-1)
    ok = chain.astype(bool) & (lab >= 0)
    return {"tokens": tokens, "ctx_pos": np.where(tokens >= 0, np.arange(t)[None], -1).astype(np.int32),
            "token": tokens[np.arange(b)[:, None], pos], "position": pos, "at": at.astype(np.int32),
            "label_sub": np.where(ok, sub_index[np.maximum(lab, 0)], -1).astype(np.int32),
            "label_ok": ok.astype(np.float32)}


def lr_at(progress: float, lr: float, warmup: float = 0.03) -> float:
    """Linear warm-up over the first `warmup` of the run, then cosine decay to lr / 10."""
    if progress < warmup:
        return lr * progress / warmup
    x = min((progress - warmup) / (1 - warmup), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * x)))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A run's progress in [0, 1] (lr_at's argument) and when a call stops. plan_s > 0: the run's training
    seconds over all its calls, of which done_s are done (restored on resume); else this call's budget call_s
    is the plan (0: steps alone). A call stops after call_s of its own seconds or once the plan is spent."""
    steps: int
    plan_s: float = 0.0
    call_s: float = 0.0
    done_s: float = 0.0

    def progress(self, step: int, elapsed: float) -> float:
        plan, done = (self.plan_s, self.done_s) if self.plan_s > 0 else (self.call_s, 0.0)
        return max((step + 0.5) / self.steps, (done + elapsed) / plan if plan > 0 else 0.0)

    def stop(self, elapsed: float) -> bool:
        return (self.call_s > 0 and elapsed >= self.call_s) or (self.plan_s > 0 and self.done_s + elapsed >=
                                                                self.plan_s)

    def finishing(self) -> "Schedule":
        """This call ends the plan: the plan becomes the seconds done + this call's budget."""
        if not self.call_s > 0:
            raise ValueError("finishing needs this call's time limit (max_minutes / --deadline)")
        return dataclasses.replace(self, plan_s=self.done_s + self.call_s)


def save_state(path: Path, d, w, vocab, opt_state, step: int, target: ModelConfig, extra=None):
    """The run's state in one file, atomically: the drafter (weights as given), the optimizer state, the step."""
    bd.save(path, d, w, vocab, target, {**(extra or {}), "step": step}, arrays=drafter_files.opt_arrays(opt_state))


def load_opt_state(path: Path, opt_state):
    """-> (the optimizer state saved by save_state, in opt_state's structure; its step)."""
    return drafter_files.read_opt(path, opt_state), int(json.loads(drafter_files.header(path)["step"]))


def run_state(path: Path) -> dict:
    """What last.safetensors says of its run: step, train_s (training seconds over all calls so far; 0 in files
    written before it was stored), rng (the batch sampler's bit-generator state; None in older files)."""
    meta = drafter_files.header(path)
    return {"step": int(json.loads(meta.get("step", "0"))), "train_s": float(json.loads(meta.get("train_s", "0"))),
            "rng": json.loads(meta["rng"]) if "rng" in meta else None}


def train(engine, data: Data, d: bd.BlockConfig, vocab: np.ndarray, out: Path, steps: int, batch: int, anchors: int,
          lr: float, soft_weight: float = 0.5, decay: float = 4.0, seed: int = 0, resume: bool = False,
          save_every: int = 500, log=True, max_minutes: float = 0.0, plan_minutes: float = 0.0, finish: bool = False,
          log_every: int = 10, clock=time.perf_counter, init=None):
    """-> (weights, history of (step, loss, acceptance, lr) every log_every steps and at the last one). Writes
    out/last.safetensors every save_every steps and when it stops. The learning rate follows Schedule's progress
    (lr_at): over plan_minutes of training across calls (resume restores the seconds done), else over this
    call's max_minutes (or steps alone). max_minutes > 0 stops this call after that long; finish ends the plan
    there. Time is clock() after each step (the progress of step s is where the run stood after step s - 1).
    init: weights to start from (an earlier drafter's, same BlockConfig) instead of fresh ones; the optimizer and
    the schedule start afresh (a resumed run's own weights take precedence)."""
    from tqdm import tqdm

    cfg, tparams = engine.cfg, engine.params
    sub_index = np.full(cfg.vocab_size, -1, np.int32)
    sub_index[vocab] = np.arange(len(vocab))
    jvocab = jnp.asarray(vocab)
    head = bd.head_rows(tparams, cfg, jvocab).astype(jnp.float32)
    opt = optimizer()
    w = bd.init_weights(d, jax.random.PRNGKey(seed))
    # final_norm feeds the target's own head: start from the target's (a copy: w is donated)
    w["final_norm"] = jnp.array(tparams["final_norm"], jnp.float32, copy=True)
    if init is not None:
        w = jax.tree_util.tree_map(lambda a: jnp.array(a, jnp.float32, copy=True), init)
    opt_state, start, state = opt.init(w), 0, {"train_s": 0.0, "rng": None}
    last = out / "last.safetensors"
    if resume and last.is_file():
        _, loaded, _ = bd.load(last, jnp.float32)
        w = loaded["w"]
        opt_state, start = load_opt_state(last, opt.init(w))
        state = run_state(last)
    elif resume and log:
        print(f"[--resume: no {last}; training from scratch]", file=sys.stderr)
    sched = Schedule(steps, 60 * plan_minutes, 60 * max_minutes, state["train_s"])
    if finish:
        sched = sched.finishing()
    if log:
        planned = f" of {sched.plan_s / 60:.2f} planned" if sched.plan_s > 0 else ""
        print(f"[schedule: step {start}, {sched.done_s / 60:.2f}{planned} training minutes done (progress "
              f"{sched.progress(start, 0.0):.3f}); this call: up to {max_minutes:.2f} min"
              f"{', ends the plan' if finish else ''}]", file=sys.stderr)
    if sched.plan_s > 0 and sched.done_s >= sched.plan_s:
        if log:
            print("[the planned training time is spent: no steps (raise --plan_minutes or pass --finish)]",
                  file=sys.stderr)
        return w, []

    # the sampler goes on where the saved run left it (older files: a stream of its own, not the first batches')
    rng = np.random.default_rng(seed if start == 0 else [seed, start])
    if state["rng"] is not None:
        rng.bit_generator.state = state["rng"]
    n, hist = len(data.tokens), []
    acc_sum = acc_n = 0.0
    bar = tqdm(total=steps, initial=start, desc="train", file=sys.stderr, disable=not log)
    t0, wall0, elapsed = clock(), time.perf_counter(), 0.0
    for s in range(start, steps):
        lr_s = lr_at(sched.progress(s, elapsed), lr)
        rows = rng.choice(n, batch, replace=n < batch)
        b = make_batch(data, rows, rng, anchors, d, sub_index)
        w, opt_state, loss, (acc, full, labels) = train_step(w, opt_state, jax.tree_util.tree_map(jnp.asarray, b),
                                                             tparams, jvocab, head, jnp.float32(lr_s), cfg=cfg, d=d,
                                                             soft_weight=soft_weight, decay=decay)
        elapsed = clock() - t0
        stop = sched.stop(elapsed)
        if s % log_every == 0 or s == steps - 1 or stop:
            loss, acc, full, labels = float(loss), float(acc), float(full), float(labels)
            acc_sum, acc_n = 0.9 * acc_sum + acc, 0.9 * acc_n + full
            hist.append((s, loss, acc_sum / max(acc_n, 1), lr_s))
            bar.set_postfix(loss=f"{loss:.3f}", accept=f"{acc_sum / max(acc_n, 1):.2f}", lr=f"{lr_s:.1e}",
                            tok_s=f"{(s + 1 - start) * labels / (time.perf_counter() - wall0):.0f}")
        bar.update(1)
        if (s + 1) % save_every == 0 or s == steps - 1 or stop:
            save_state(last, d, w, vocab, opt_state, s + 1, cfg,
                       {"train_s": sched.done_s + elapsed, "rng": rng.bit_generator.state})
        if stop:
            break
    bar.close()
    return w, hist


# ---- evaluation ----

def evaluate(engine, drafter_path, prompts: dict[str, list[list[int]]], k: int, max_new: int, spec=None) -> dict:
    """Greedy speculative decoding with the drafter file (a block drafter or MTP layers) vs plain decoding
    (Engine.generate both) on held-out prompts: accepted drafts per step by position, the accepted-length
    histogram, tok/s of both, and whether the texts are identical. spec: the speculative Engine (k drafts of
    that drafter) if the caller built it from the checkpoint (on a GPU the plain Engine's params are already
    converted for its own step, with folded norms when ops.OUT_IN_FOLD_NORMS is on, which the speculative step's
    copy does not use); None: one built on engine.params."""
    from mimo_jax.engine import Engine

    if spec is None:
        spec = Engine(engine.cfg, engine.params, tokenizer=engine.tokenizer, max_seq_len=engine.max_seq_len,
                      speculative_k=k, drafter=str(drafter_path), layout=engine.layout)
    out = {}
    for name, ps in prompts.items():
        hist, same, plain_s, spec_s, plain_n, spec_n = np.zeros(k + 1, int), True, 0.0, 0.0, 0, 0
        engine.warm_up(ps[0], max_new)
        spec.warm_up(ps[0], max_new)
        for p in ps:
            a = engine.generate(p, max_new, stop_at_eos=False)
            g = spec.generate(p, max_new, stop_at_eos=False)
            same &= a.token_ids == g.token_ids
            hist += np.asarray(g.stats.accepted_hist, int)
            plain_s, plain_n = plain_s + a.stats.decode_s, plain_n + a.stats.new_tokens - 1
            spec_s, spec_n = spec_s + g.stats.decode_s, spec_n + g.stats.new_tokens - 1
        out[name] = eval_summary(hist, len(ps), max_new, plain_n / max(plain_s, 1e-9), spec_n / max(spec_s, 1e-9),
                                 same)
    return out


def eval_summary(hist, prompts: int, max_new: int, plain_tok_s: float, spec_tok_s: float, same: bool) -> dict:
    """One held-out set's figures from its accepted-length histogram [k + 1] and the two speeds."""
    k = len(hist) - 1
    steps = max(int(hist.sum()), 1)
    return {"prompts": prompts, "new_tokens": max_new, "k": k, "spec_steps": int(hist.sum()),
            "mean_accepted": float((hist * np.arange(k + 1)).sum() / steps),
            "acceptance_by_position": [float(hist[i:].sum() / steps) for i in range(1, k + 1)],
            "accepted_hist": hist.tolist(), "plain_tok_s": plain_tok_s, "spec_tok_s": spec_tok_s,
            "greedy_identical": bool(same), "speedup": spec_tok_s / max(plain_tok_s, 1e-9)}


def print_eval(results: dict, k: int) -> None:
    for name, r in results.items():
        print(f"[{name}: {r['mean_accepted']:.2f} accepted of {k} per step, by position "
              f"{' '.join(f'{x:.2f}' for x in r['acceptance_by_position'])}; {r['spec_tok_s']:.1f} tok/s vs plain "
              f"{r['plain_tok_s']:.1f} ({r['speedup']:.2f}x); greedy identical: {r['greedy_identical']}]",
              file=sys.stderr)


def eval_prompts(tokenizer, n: int, prompt_len: int) -> dict[str, list[list[int]]]:
    return {"code": code_prompts(tokenizer, n, prompt_len, True, 123), "chat": chat_prompts(tokenizer, n, True, 456)}


# ---- command line ----

def target_layers(spec: str, num_layers: int) -> tuple:
    if spec == "auto":
        return bd.default_layers(num_layers)
    return () if spec in ("none", "") else tuple(int(x) for x in spec.split(","))


def time_budget(max_minutes: float, deadline: float) -> float:
    """This call's training minutes: --max_minutes (0: no limit), cut to what is left before --deadline (unix time;
    at least half a minute) when one is given."""
    if not deadline:
        return max_minutes
    left = max((deadline - time.time()) / 60, 0.5)
    max_minutes = min(max_minutes, left) if max_minutes > 0 else left
    print(f"[training for at most {max_minutes:.2f} min (deadline)]", file=sys.stderr)
    return max_minutes


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mimo_jax.train_drafter", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="target: a .gguf or checkpoint dir (default: bundled SmolLM2)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--cache_dir", default="/tmp/mimo_drafter_data", help="where generated training data is cached")
    ap.add_argument("--code_prompts", type=int, default=128)
    ap.add_argument("--chat_prompts", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=64, help="tokens of source per code prompt")
    ap.add_argument("--gen_len", type=int, default=128, help="tokens the target writes per prompt")
    ap.add_argument("--gen_batch", type=int, default=32)
    ap.add_argument("--source_windows", type=int, default=0, help="teacher-forced windows of training stdlib source "
                    "(of the sequences' length) added to the data: cheaper than continuations, same labels")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--anchors", type=int, default=16, help="blocks per sequence per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--soft_weight", type=float, default=0.5)
    ap.add_argument("--decay", type=float, default=4.0, help="slot j's loss weight exp(-j / decay)")
    ap.add_argument("--target_layers", default="auto", help="target layers the drafter conditions on besides the "
                    "last: auto (a low, a middle and a high one), none, or indices 1,15,26")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--draft_vocab", type=int, default=None, help="tokens the drafter proposes: the target's N most "
                    "frequent labels in the data (default 8192; with --init, the file's list, or, given, the file's "
                    "list joined with the data's N most frequent: the weights do not depend on it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    ap.add_argument("--init", default=None, help="start from this drafter file's weights (fine-tuning; its shape "
                    "replaces --layers/--intermediate/--window/--block/--target_layers; its draft vocabulary is kept, "
                    "widened by an explicit --draft_vocab), with a fresh optimizer and schedule")
    ap.add_argument("--data_seed", type=int, default=0, help="other training code prompts, chat instructions and "
                    "source windows than seed 0's (new data for a fine-tuning run)")
    ap.add_argument("--max_minutes", type=float, default=0.0, help="stop training after this long (0: no limit)")
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time by which training stops (0: none); "
                    "a one-call GPU script leaves the evaluation its time this way")
    ap.add_argument("--plan_minutes", type=float, default=0.0, help="training minutes planned over all calls of a "
                    "resumed run: the schedule's progress is (minutes done before this call, from last.safetensors, "
                    "+ this call's) / plan (0: this call's --max_minutes / --deadline is the plan)")
    ap.add_argument("--finish", action="store_true", help="this call ends the schedule at its --max_minutes / "
                    "--deadline (the plan becomes the minutes done + this call's)")
    ap.add_argument("--require_cache", action="store_true", help="fail (exit 3) if the data is not in --cache_dir "
                    "instead of generating it: a later call of a multi-call run")
    ap.add_argument("--eval_prompts", type=int, default=8, help="held-out prompts per set (0: no evaluation)")
    ap.add_argument("--eval_tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.model is not None and not Path(a.model).exists():
        ap.error(f"--model {a.model}: no such file or directory")
    if a.init is not None and not Path(a.init).is_file():
        ap.error(f"--init {a.init}: no such file")
    if a.draft_vocab is not None and a.draft_vocab < 1:
        ap.error(f"--draft_vocab must be >= 1, got {a.draft_vocab}")
    out.mkdir(parents=True, exist_ok=True)

    from mimo_jax.engine import Engine

    t_start = time.perf_counter()
    engine = Engine.from_pretrained(a.model, max_seq_len=1024, fold_norms=False)  # the verify's numerics
    cfg = engine.cfg
    tag = "bundled-smollm2"
    if a.model:
        m = Path(a.model).resolve()
        tag = f"{m}:{m.stat().st_size}" if m.is_file() else str(m)
    t0 = time.perf_counter()
    try:
        data = datasets(engine, a, tag, require_cache=a.require_cache)["train"]
    except DataNotCached as e:
        print(f"NO CACHED DATA: {e}", file=sys.stderr)
        sys.exit(3)
    data_s = time.perf_counter() - t0
    d = bd.BlockConfig.for_target(cfg, num_layers=a.layers, intermediate_size=a.intermediate, window=a.window,
                                  block_size=a.block, draft_vocab=min(a.draft_vocab or 8192, cfg.vocab_size),
                                  num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                  target_layers=target_layers(a.target_layers, cfg.num_layers))
    vocab = draft_vocab(data, d.draft_vocab, cfg.vocab_size)
    init = None
    if a.init:
        try:
            d, loaded, _ = bd.load(a.init, jnp.float32, target=cfg)
        except InputError as e:  # not a block drafter, or one for another model
            ap.error(f"--init: {e}")
        init, own = loaded["w"], np.asarray(loaded["vocab"])
        vocab = own if a.draft_vocab is None else np.union1d(own, vocab).astype(np.int32)
        d = dataclasses.replace(d, draft_vocab=len(vocab))
        print(f"[--init {a.init}: {d.num_layers} layers, draft vocab {len(vocab)}, target layers "
              f"{d.target_layers}]", file=sys.stderr)
    if a.resume and (out / "last.safetensors").is_file():  # the vocabulary the weights were trained with
        vocab = np.asarray(bd.load(out / "last.safetensors")[1]["vocab"])
    coverage = float(np.isin(data.labels[data.labels >= 0], vocab).mean())
    print(f"[data: {len(data.tokens)} sequences, {data.generated} target tokens, ready in {data_s:.0f} s; draft vocab "
          f"{len(vocab)} covers {coverage:.3f} of them]", file=sys.stderr)
    max_minutes = time_budget(a.max_minutes, a.deadline)
    if a.finish and not max_minutes > 0:
        ap.error("--finish needs --max_minutes or --deadline (the time at which this call ends the schedule)")
    t0 = time.perf_counter()
    w, hist = train(engine, data, d, vocab, out, a.steps, a.batch, a.anchors, a.lr, a.soft_weight, a.decay,
                    seed=a.seed, resume=a.resume, max_minutes=max_minutes, plan_minutes=a.plan_minutes,
                    finish=a.finish, init=init)
    train_s = time.perf_counter() - t0
    total_s = run_state(out / "last.safetensors")["train_s"] if (out / "last.safetensors").is_file() else 0.0
    info = {"train_steps": hist[-1][0] + 1 if hist else 0, "label_tokens_per_step": a.batch * a.anchors * a.block,
            "train_s": round(train_s, 1), "train_s_all_calls": round(total_s, 1), "plan_minutes": a.plan_minutes,
            "data_s": round(data_s, 1), "generated_tokens": data.generated,
            "device": jax.devices()[0].device_kind, "final_loss": hist[-1][1] if hist else None,
            "train_acceptance": hist[-1][2] if hist else None, "target_layers": list(d.target_layers),
            "sequences": len(data.tokens), "lr": a.lr, "batch": a.batch, "anchors": a.anchors}
    final = out / "drafter.safetensors"
    bd.save(final, d, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float16), w), vocab, cfg, {"training": info})
    print(f"[wrote {final} ({final.stat().st_size / 1e6:.1f} MB); {info}]", file=sys.stderr)
    report(engine, final, out, {"training": info, "block_config": dataclasses.asdict(d),
                                "draft_vocab_coverage": coverage}, a, t_start)


def report(engine, drafter: Path, out: Path, result: dict, a, t_start: float) -> None:
    """The end of a trainer's run: the held-out evaluation of the written drafter file (a.eval_prompts per set,
    a.eval_tokens each, k = a.k; none for 0), printed, and result + it + the run's seconds as out/eval.json."""
    if a.eval_prompts:
        result["eval"] = evaluate(engine, drafter, eval_prompts(engine.tokenizer, a.eval_prompts, a.prompt_len), a.k,
                                  a.eval_tokens)
        print_eval(result["eval"], a.k)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
