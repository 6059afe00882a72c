"""Train a block drafter (block_drafter.py) for a target model by self-distillation, in JAX with optax.

    python -m mimo_jax.train_drafter --out /tmp/drafter --steps 2000            # the bundled SmolLM2
    python -m mimo_jax.train_drafter --model PATH.gguf --out DIR --resume       # go on from DIR/last.safetensors

No labelled data: the target writes its own training set.
  prompts  code: windows of the Python standard library's source files (present wherever Python is), minus a
           fixed held-out set of files (EVAL_FILES); chat: instructions built from templates x topics, minus
           held-out topics (EVAL_TOPICS), in the model's chat template.
  targets  the target's own greedy continuation of each prompt (batched, one jitted prefill + lax.scan decode),
           plus teacher-forced windows of training source (--source_windows: the target's greedy next token at
           every position). Only token ids are stored (cached under --cache_dir, one .npz per data set and model,
           so a second run or a resume generates nothing): the features the drafter conditions on (the target's
           normed last layer and the outputs of --target_layers, what the verify pass gives it at decode time)
           and the target's next-token distributions are recomputed by one teacher-forced target pass inside
           every training step (cheaper on a GPU than moving stored hidden states: 4.6 KB a token with 3 taps).
  loss     a block at anchor P (any position of the continuation) predicts tokens P+1..P+B; slot j's loss is
           cross-entropy to the target's greedy token plus --soft_weight x cross-entropy to its distribution
           (both over the draft vocabulary), weighted exp(-j / --decay) (a draft counts only if the ones
           before it were accepted, DFlash's weighting). Many anchors of a sequence share one context pass.
  schedule AdamW, linear warm-up then cosine decay to lr/10 over the run's progress = max(step / --steps,
           elapsed / --max_minutes): a run stopped by its time budget still ends its decay.
  progress tqdm: tokens/s (label tokens), loss, running acceptance (mean accepted-prefix length of the
           blocks, the figure greedy decoding gets if the context were the training one).
  files    OUT/last.safetensors (weights + optimizer state + step: --resume), OUT/drafter.safetensors (the
           weights only, float16: what Engine(drafter=PATH) / --drafter PATH loads), OUT/eval.json.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import block_drafter as bd
from mimo_jax import model
from mimo_jax.config import ModelConfig

EVAL_FILES = ("argparse.py", "textwrap.py", "fractions.py", "heapq.py", "statistics.py", "shlex.py", "calendar.py",
              "bisect.py", "graphlib.py", "colorsys.py")
TEMPLATES = ("Explain {} in simple terms.", "Write a short poem about {}.", "Give me three tips about {}.",
             "What are the pros and cons of {}?", "Write a Python function related to {}.",
             "Summarize the history of {} in a paragraph.", "How would you teach {} to a child?",
             "List five facts about {}.", "Write a short story involving {}.", "Compare {} with something similar.")
TOPICS = ("the water cycle", "photosynthesis", "black holes", "the French revolution", "machine learning",
          "sorting algorithms", "climate change", "the stock market", "volcanoes", "healthy sleep", "gardening",
          "the moon landing", "prime numbers", "the internet", "honey bees", "electric cars", "chess",
          "the Roman empire", "recursion", "coffee", "public speaking", "time management", "rainbows", "vaccines",
          "the ocean", "jazz music", "linked lists", "budgeting", "the human heart", "earthquakes",
          "renewable energy", "databases", "friendship", "mountains", "the printing press", "video games")
STYLES = ("", " Be brief.", " Answer in detail.", " Use a numbered list.")
# training-only variety (the held-out set keeps TEMPLATES x EVAL_TOPICS x STYLES, as before)
MORE_TEMPLATES = ("Why is {} important?", "Write an email to a friend about {}.", "What is a common misconception "
                  "about {}?", "Describe {} to someone from the year 1800.", "Write a haiku about {}.",
                  "Give a step-by-step guide to getting started with {}.", "What questions should I ask about {}?",
                  "Write a dialogue between two people discussing {}.", "Create a quiz with three questions about {}.",
                  "Explain the science behind {}.", "Write a product description inspired by {}.",
                  "What would the world look like without {}?", "Tell me a fun fact about {}.",
                  "Write a short speech about {}.", "Explain {} using an analogy.")
MORE_TOPICS = ("cats", "dogs", "tea", "bicycles", "airplanes", "trains", "the pyramids", "the human brain", "DNA",
               "gravity", "magnets", "electricity", "the periodic table", "algebra", "geometry", "probability",
               "binary numbers", "operating systems", "compilers", "web browsers", "email", "smartphones",
               "robots", "artificial intelligence", "cloud computing", "encryption", "open source software",
               "git", "unit testing", "APIs", "spreadsheets", "photography", "painting", "poetry", "novels",
               "theater", "movies", "football", "basketball", "tennis", "swimming", "running", "yoga",
               "meditation", "nutrition", "vitamins", "cooking pasta", "chocolate", "pizza", "forests", "deserts",
               "glaciers", "hurricanes", "tornadoes", "the seasons", "the sun", "Mars", "comets", "telescopes",
               "microscopes", "bacteria", "the immune system", "sleep", "memory", "habits", "motivation",
               "leadership", "teamwork", "negotiation", "saving money", "taxes", "inflation", "small businesses",
               "marketing", "cities", "farming", "recycling", "plastic pollution", "solar panels", "wind power",
               "nuclear energy", "batteries", "ancient Greece", "the Renaissance", "the industrial revolution",
               "world war one", "the cold war", "democracy", "human rights", "languages", "learning to code",
               "typing", "libraries", "museums", "birds", "whales", "ants", "trees", "flowers", "mushrooms")
EVAL_TOPICS = ("dinosaurs", "hash tables", "the solar system", "bread baking", "the Olympic games", "rivers",
               "password security", "origami")


# ---- data ----

def stdlib_files(held_out: bool) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in root.glob("*.py"))
    return [root / n for n in names if (n in EVAL_FILES) == held_out]


def code_prompts(tokenizer, n: int, length: int, held_out: bool, seed: int) -> list[list[int]]:
    """n windows of `length` tokens of standard-library source, each starting at a line start."""
    rng, out = np.random.default_rng(seed), []
    files = stdlib_files(held_out)
    while len(out) < n:
        text = files[rng.integers(len(files))].read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        start = int(rng.integers(max(1, len(lines) - 40)))
        ids = tokenizer.encode("".join(lines[start:start + 200]), add_special_tokens=False)
        if len(ids) >= length:
            out.append(ids[:length])
    return out


def chat_instructions(held_out: bool) -> list[str]:
    if held_out:
        return [t.format(topic) + style for style in STYLES for topic in EVAL_TOPICS for t in TEMPLATES]
    return [t.format(topic) + style for style in STYLES for topic in TOPICS + MORE_TOPICS
            for t in TEMPLATES + MORE_TEMPLATES]


def chat_prompts(tokenizer, n: int, held_out: bool, seed: int) -> list[list[int]]:
    from mimo_jax.prompts import chat_ids

    texts = chat_instructions(held_out)
    order = np.random.default_rng(seed).permutation(len(texts))
    return [chat_ids(tokenizer, texts[i]) for i in order[:n]]  # at most len(texts): greedy repeats teach nothing


@functools.partial(jax.jit, static_argnames=("cfg", "gen_len"))
def _continue(params, tokens, lens, cfg: ModelConfig, gen_len: int):
    """Greedy continuations of a batch of prompts (tail-padded, lengths lens) -> generated tokens [B,gen_len].
    Each row at its own positions."""
    b, tp = tokens.shape
    cache = model.init_cache(cfg, b, tp + gen_len, params["embed"].dtype)
    pos = jnp.where(jnp.arange(tp)[None] < lens[:, None], jnp.arange(tp)[None], -1).astype(jnp.int32)
    hidden, cache = model.forward_hidden(params, tokens, pos, cache, cfg)
    normed = model.final_norm(params, hidden[jnp.arange(b), lens - 1], cfg)
    first = jnp.argmax(model.head(params, normed, cfg), axis=-1).astype(jnp.int32)

    def body(carry, _):
        tok, p, cache = carry
        h, cache = model.forward_hidden(params, tok[:, None], p[:, None], cache, cfg)
        n = model.final_norm(params, h, cfg)[:, 0]
        return (jnp.argmax(model.head(params, n, cfg), axis=-1).astype(jnp.int32), p + 1, cache), tok

    _, toks = jax.lax.scan(body, (first, lens.astype(jnp.int32), cache), None, length=gen_len)
    return toks.T


@dataclasses.dataclass
class Data:
    """Sequences padded to one length T: tokens [N,T] int32 (-1 past the end), gen_start [N] (where the target's
    own continuation starts; anchors lie from gen_start - 1 on), labels [N,T] (the target's greedy token after
    position t, -1 unknown; None: the continuation's next token). No hidden states: the trainer recomputes
    them (target_pass)."""
    tokens: np.ndarray
    gen_start: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        if self.labels is None:  # in a greedy continuation the next token is the greedy one
            t = np.arange(self.tokens.shape[1])[None]
            nxt = np.concatenate([self.tokens[:, 1:], np.full((len(self.tokens), 1), -1, np.int32)], axis=1)
            self.labels = np.where(t >= self.gen_start[:, None] - 1, nxt, -1).astype(np.int32)

    @property
    def generated(self) -> int:
        return int(((self.tokens >= 0).sum(1) - self.gen_start).sum())


def make_data(params, cfg, prompts: list[list[int]], gen_len: int, batch: int, eos=(), desc="data") -> Data:
    """The target's greedy continuations of the prompts, `batch` at a time (the next batch is dispatched before
    this one's tokens are read); a row ends after its first eos token."""
    from tqdm import tqdm

    tp = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), tp + gen_len), -1, np.int32)
    starts = np.array([len(p) for p in prompts], np.int32)
    bar = tqdm(total=len(prompts) * gen_len, desc=desc, unit="tok", unit_scale=True, file=sys.stderr)

    def dispatch(i):
        rows = prompts[i:i + batch]
        rows = rows + [rows[0]] * (batch - len(rows))  # a fixed batch shape: one compilation
        x = np.zeros((batch, tp), np.int32)
        for j, r in enumerate(rows):
            x[j, :len(r)] = r
        return i, _continue(params, jnp.asarray(x), jnp.asarray([len(r) for r in rows], np.int32), cfg, gen_len)

    pending = dispatch(0)
    for i in range(0, len(prompts), batch):
        i, gen = pending
        if i + batch < len(prompts):
            pending = dispatch(i + batch)
        gen = np.asarray(jax.device_get(gen))[:min(batch, len(prompts) - i)]
        is_eos = np.isin(gen, np.asarray(eos, np.int32)) if eos else np.zeros(gen.shape, bool)
        keep = np.cumsum(np.concatenate([np.zeros_like(is_eos[:, :1]), is_eos[:, :-1]], axis=1), axis=1) == 0
        for j, g in enumerate(gen):
            n = starts[i + j]
            tokens[i + j, :n] = prompts[i + j]
            tokens[i + j, n:n + gen_len] = np.where(keep[j], g, -1)
        bar.update(len(gen) * gen_len)
    bar.close()
    return Data(tokens, starts)


@functools.partial(jax.jit, static_argnames="cfg")
def _teacher_forced(params, tokens, cfg: ModelConfig):
    """tokens [B,T] -> the target's greedy next token at every position [B,T]."""
    cache = model.init_cache(cfg, tokens.shape[0], tokens.shape[1], params["embed"].dtype)
    hidden, _ = model.forward_hidden(params, tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32), cache, cfg)
    normed = model.final_norm(params, hidden, cfg)
    return jnp.argmax(model.head(params, normed, cfg), axis=-1).astype(jnp.int32)


def make_source_data(params, cfg, windows: list[list[int]], batch: int, desc="source data") -> Data:
    """Teacher-forced windows of real text (cheaper than generating: one forward per window): the target's greedy
    next token at every position. A block's slot j trains only where the text up to P+j is what the target
    would have written from P (make_batch), so every label is still the target's own greedy continuation."""
    from tqdm import tqdm

    tokens = np.asarray(windows, np.int32)
    labels = np.zeros(tokens.shape, np.int32)
    for i in tqdm(range(0, len(windows), batch), desc=desc, file=sys.stderr):
        x = tokens[i:i + batch]
        x = np.concatenate([x, np.repeat(x[:1], batch - len(x), 0)]) if len(x) < batch else x
        n = min(batch, len(windows) - i)
        labels[i:i + n] = np.asarray(jax.device_get(_teacher_forced(params, jnp.asarray(x), cfg)))[:n]
    return Data(tokens, np.ones(len(windows), np.int32), labels)


def cached(path: Path, build) -> Data:
    if path.is_file():
        z = np.load(path)
        return Data(z["tokens"], z["gen_start"], z["labels"])
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, tokens=data.tokens, gen_start=data.gen_start, labels=data.labels)
    tmp.replace(path)
    return data


def datasets(engine, a, model_tag: str) -> dict[str, Data]:
    """{"train": code + chat continuations}: built once, then read from the cache."""
    tok, cfg, eos = engine.tokenizer, engine.cfg, tuple(engine.eos_ids)
    key = hashlib.sha1(json.dumps([model_tag, a.code_prompts, a.chat_prompts, a.prompt_len, a.gen_len,
                                   EVAL_FILES, EVAL_TOPICS, 2]).encode()).hexdigest()[:12]
    base = Path(a.cache_dir)

    def build(prompts, desc):
        return make_data(engine.params, cfg, prompts, a.gen_len, a.gen_batch, eos, desc)

    code = cached(base / f"code_{key}.npz", lambda: build(code_prompts(tok, a.code_prompts, a.prompt_len, False, 0),
                                                           "code data"))
    chat = cached(base / f"chat_{key}.npz", lambda: build(chat_prompts(tok, a.chat_prompts, False, 1), "chat data"))
    t = max(code.tokens.shape[1], chat.tokens.shape[1])

    def pad(d):
        w = t - d.tokens.shape[1]
        return Data(np.pad(d.tokens, ((0, 0), (0, w)), constant_values=-1), d.gen_start,
                    np.pad(d.labels, ((0, 0), (0, w)), constant_values=-1))

    parts = [code, chat]
    if a.source_windows:
        key2 = hashlib.sha1(json.dumps([model_tag, a.source_windows, t, EVAL_FILES, 3]).encode()).hexdigest()[:12]
        parts.append(cached(base / f"source_{key2}.npz", lambda: make_source_data(
            engine.params, cfg, code_prompts(tok, a.source_windows, t, False, 7), a.gen_batch)))
    parts = [pad(p) for p in parts]
    return {"train": Data(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("tokens", "gen_start", "labels")))}


def draft_vocab(data: Data, size: int, vocab_size: int) -> np.ndarray:
    """The `size` tokens the target predicts most often (its greedy labels; sorted ids)."""
    counts = np.bincount(data.labels[data.labels >= 0], minlength=vocab_size)
    return np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)


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


def save_state(path: Path, d, w, vocab, opt_state, step: int, target: ModelConfig, extra=None):
    from safetensors.numpy import save_file

    leaves = jax.tree_util.tree_leaves(opt_state)
    bd.save(path, d, w, vocab, target, {**(extra or {}), "step": step})
    flat = {f"opt.{i}": np.asarray(x) for i, x in enumerate(leaves)}
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        meta = f.metadata()
        flat.update({k: f.get_tensor(k) for k in f.keys()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata=meta)
    tmp.replace(path)


def load_opt_state(path: Path, opt_state):
    from safetensors import safe_open

    leaves, treedef = jax.tree_util.tree_flatten(opt_state)
    with safe_open(str(path), "numpy") as f:
        new = [jnp.asarray(f.get_tensor(f"opt.{i}")) for i in range(len(leaves))]
        step = int(json.loads(f.metadata()["step"]))
    return jax.tree_util.tree_unflatten(treedef, new), step


def train(engine, data: Data, d: bd.BlockConfig, vocab: np.ndarray, out: Path, steps: int, batch: int, anchors: int,
          lr: float, soft_weight: float = 0.5, decay: float = 4.0, seed: int = 0, resume: bool = False,
          save_every: int = 500, log=True, max_minutes: float = 0.0):
    """-> (weights, history of (step, loss, acceptance)). Writes out/last.safetensors every save_every steps and
    at the end; max_minutes > 0 stops early, the learning rate following progress = max(step / steps, elapsed /
    max_minutes) (lr_at), so a run cut by time still decays (--resume goes on at the saved step)."""
    import optax
    from tqdm import tqdm

    cfg, tparams = engine.cfg, engine.params
    sub_index = np.full(cfg.vocab_size, -1, np.int32)
    sub_index[vocab] = np.arange(len(vocab))
    jvocab = jnp.asarray(vocab)
    head = bd.head_rows(tparams, cfg, jvocab).astype(jnp.float32)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.01))
    w = bd.init_weights(d, jax.random.PRNGKey(seed))
    # final_norm feeds the target's own head: start from the target's (a copy: w is donated)
    w["final_norm"] = jnp.array(tparams["final_norm"], jnp.float32, copy=True)
    opt_state, start = opt.init(w), 0
    last = out / "last.safetensors"
    if resume and last.is_file():
        _, loaded, _ = bd.load(last, jnp.float32)
        w = loaded["w"]
        opt_state, start = load_opt_state(last, opt.init(w))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step_fn(w, opt_state, batch, tparams, jvocab, head, lr):  # target arrays as arguments: no constants to fold
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(w, batch, tparams, jvocab, cfg, d,
                                                                         soft_weight, decay, head)
        opt_state[1].hyperparams["learning_rate"] = lr
        updates, opt_state = opt.update(grads, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, loss, stats

    rng = np.random.default_rng(seed + start)
    n, hist = len(data.tokens), []
    acc_sum = acc_n = 0.0
    bar = tqdm(total=steps, initial=start, desc="train", file=sys.stderr, disable=not log)
    t0 = time.perf_counter()
    for s in range(start, steps):
        progress = max((s + 0.5) / steps, (time.perf_counter() - t0) / (60 * max_minutes) if max_minutes > 0 else 0)
        rows = rng.choice(n, batch, replace=n < batch)
        b = make_batch(data, rows, rng, anchors, d, sub_index)
        w, opt_state, loss, (acc, full, labels) = step_fn(w, opt_state, jax.tree_util.tree_map(jnp.asarray, b),
                                                          tparams, jvocab, head, jnp.float32(lr_at(progress, lr)))
        if s % 10 == 0 or s == steps - 1:
            loss, acc, full, labels = float(loss), float(acc), float(full), float(labels)
            acc_sum, acc_n = 0.9 * acc_sum + acc, 0.9 * acc_n + full
            hist.append((s, loss, acc_sum / max(acc_n, 1)))
            bar.set_postfix(loss=f"{loss:.3f}", accept=f"{acc_sum / max(acc_n, 1):.2f}",
                            lr=f"{lr_at(progress, lr):.1e}",
                            tok_s=f"{(s + 1 - start) * labels / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        out_of_time = max_minutes > 0 and time.perf_counter() - t0 > 60 * max_minutes
        if (s + 1) % save_every == 0 or s == steps - 1 or out_of_time:
            save_state(last, d, w, vocab, opt_state, s + 1, cfg)
        if out_of_time:
            break
    bar.close()
    return w, hist


# ---- evaluation ----

def speculative_greedy(spec, ids: list[int], max_new: int):
    """Greedy speculative generation with `spec` (an Engine with speculative_k and a drafter) -> (tokens,
    accepted-length histogram, decode seconds after the first token). Engine's speculative stream, with the
    drafter's target layers passed to the prompt pass (target_chunk(..., taps)), which that stream does not do
    yet; one step is dispatched ahead of the host's read, as there."""
    from mimo_jax import speculative

    cfg, k, drafter, params = spec.cfg, spec.speculative_k, spec.drafter, spec.step_params
    cache = spec.new_cache(spec.capacity(len(ids), max_new), ring_slack=k + 1)
    chunks, feats = list(spec._chunks(ids)), []
    for tokens, positions, _ in chunks:
        f, logits, cache = speculative.target_chunk(spec.params, tokens, positions, cache, cfg, taps=drafter.taps)
        feats.append(f)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = [int(first[0])]
    greedy = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.PRNGKey(0)
    dstate = drafter.init(params, cfg, k, spec.cache_dtype) if drafter.init is not None else {}
    following = np.asarray(ids[1:] + out, np.int32)
    if drafter.init is not None:
        for (tokens, positions, n), f in zip(chunks, feats):
            nxt = np.zeros(tokens.shape, np.int32)
            nxt[0, :n] = following[int(positions[0]):int(positions[0]) + n]
            dstate = speculative.drafter_chunk(params, f, jnp.asarray(nxt), positions, dstate, key, *greedy, cfg=cfg,
                                               drafter=drafter, is_greedy=True)
    state = {"cache": cache, "token": first, "position": jnp.int32(len(ids)), "mtp_cache": dstate,
             "draft": jnp.zeros_like(first), "draft_logits": jnp.zeros((1, cfg.vocab_size), jnp.float32),
             "draft_hidden": jnp.zeros((1, cfg.hidden_size), spec.cache_dtype)}
    run = functools.partial(speculative.step, params, key=key, temperature=greedy[0], top_k=greedy[1],
                            top_p=greedy[2], cfg=cfg, k=k, drafter=drafter, is_greedy=True)
    hist, t1 = np.zeros(k + 1, int), time.perf_counter()
    pending = run(state=state)
    while True:
        emitted, n, state = pending
        if max_new - len(out) > 1:
            pending = run(state=state)
        emitted, n = np.asarray(emitted), int(n)
        hist[n] += 1
        out += emitted[0, :n + 1].tolist()
        if len(out) >= max_new:
            return out[:max_new], hist, time.perf_counter() - t1


def evaluate(engine_plain, drafter_path, prompts: dict[str, list[list[int]]], k: int, max_new: int) -> dict:
    """Greedy speculative decoding with the drafter vs plain decoding on held-out prompts: accepted drafts per
    step by position, the accepted-length histogram, tok/s of both (and the outputs must match)."""
    from mimo_jax.engine import Engine

    spec = Engine(engine_plain.cfg, engine_plain.params, tokenizer=engine_plain.tokenizer,
                  max_seq_len=engine_plain.max_seq_len, speculative_k=k, drafter=str(drafter_path))
    out = {}
    for name, ps in prompts.items():
        hist, plain_s, spec_s, plain_n, spec_n, same = np.zeros(k + 1, int), 0.0, 0.0, 0, 0, True
        engine_plain.warm_up(ps[0], max_new)
        speculative_greedy(spec, ps[0], max_new)
        for p in ps:
            a = engine_plain.generate(p, max_new, stop_at_eos=False)
            b, h, b_s = speculative_greedy(spec, p, max_new)
            same &= a.token_ids == b
            hist += h
            plain_s, plain_n = plain_s + a.stats.decode_s, plain_n + a.stats.new_tokens - 1
            spec_s, spec_n = spec_s + b_s, spec_n + len(b) - 1
        steps = max(hist.sum(), 1)
        out[name] = {"prompts": len(ps), "new_tokens": max_new, "k": k, "spec_steps": int(hist.sum()),
                     "mean_accepted": float((hist * np.arange(k + 1)).sum() / steps),
                     "acceptance_by_position": [float(hist[i:].sum() / steps) for i in range(1, k + 1)],
                     "accepted_hist": hist.tolist(), "plain_tok_s": plain_n / max(plain_s, 1e-9),
                     "spec_tok_s": spec_n / max(spec_s, 1e-9), "greedy_identical": bool(same)}
        out[name]["speedup"] = out[name]["spec_tok_s"] / max(out[name]["plain_tok_s"], 1e-9)
    return out


def eval_prompts(tokenizer, n: int, prompt_len: int) -> dict[str, list[list[int]]]:
    return {"code": code_prompts(tokenizer, n, prompt_len, True, 123), "chat": chat_prompts(tokenizer, n, True, 456)}


# ---- command line ----

def target_layers(spec: str, num_layers: int) -> tuple:
    if spec == "auto":
        return bd.default_layers(num_layers)
    return () if spec in ("none", "") else tuple(int(x) for x in spec.split(","))


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
    ap.add_argument("--draft_vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    ap.add_argument("--max_minutes", type=float, default=0.0, help="stop training after this long (0: no limit)")
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time by which training stops (0: none); "
                    "a one-call GPU script leaves the evaluation its time this way")
    ap.add_argument("--eval_prompts", type=int, default=8, help="held-out prompts per set (0: no evaluation)")
    ap.add_argument("--eval_tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.model is not None and not Path(a.model).exists():
        ap.error(f"--model {a.model}: no such file or directory")
    out.mkdir(parents=True, exist_ok=True)

    from mimo_jax.engine import Engine

    t_start = time.perf_counter()
    engine = Engine.from_pretrained(a.model, max_seq_len=1024)
    cfg = engine.cfg
    tag = str(Path(a.model).resolve()) if a.model else "bundled-smollm2"
    t0 = time.perf_counter()
    data = datasets(engine, a, tag)["train"]
    data_s = time.perf_counter() - t0
    d = bd.BlockConfig.for_target(cfg, num_layers=a.layers, intermediate_size=a.intermediate, window=a.window,
                                  block_size=a.block, draft_vocab=min(a.draft_vocab, cfg.vocab_size),
                                  num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                  target_layers=target_layers(a.target_layers, cfg.num_layers))
    vocab = draft_vocab(data, d.draft_vocab, cfg.vocab_size)
    if a.resume and (out / "last.safetensors").is_file():  # the vocabulary the weights were trained with
        vocab = np.asarray(bd.load(out / "last.safetensors")[1]["vocab"])
    coverage = float(np.isin(data.labels[data.labels >= 0], vocab).mean())
    print(f"[data: {len(data.tokens)} sequences, {data.generated} generated tokens in {data_s:.0f} s; draft vocab "
          f"{len(vocab)} covers {coverage:.3f} of them]", file=sys.stderr)
    max_minutes = a.max_minutes
    if a.deadline:
        left = max((a.deadline - time.time()) / 60, 0.5)
        max_minutes = min(max_minutes, left) if max_minutes > 0 else left
        print(f"[training for at most {max_minutes:.2f} min (deadline)]", file=sys.stderr)
    t0 = time.perf_counter()
    w, hist = train(engine, data, d, vocab, out, a.steps, a.batch, a.anchors, a.lr, a.soft_weight, a.decay,
                    seed=a.seed, resume=a.resume, max_minutes=max_minutes)
    train_s = time.perf_counter() - t0
    info = {"train_steps": hist[-1][0] + 1 if hist else 0, "label_tokens_per_step": a.batch * a.anchors * a.block,
            "train_s": round(train_s, 1), "data_s": round(data_s, 1), "generated_tokens": data.generated,
            "device": jax.devices()[0].device_kind, "final_loss": hist[-1][1] if hist else None,
            "train_acceptance": hist[-1][2] if hist else None, "target_layers": list(d.target_layers),
            "sequences": len(data.tokens), "lr": a.lr, "batch": a.batch, "anchors": a.anchors}
    final = out / "drafter.safetensors"
    bd.save(final, d, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float16), w), vocab, cfg, {"training": info})
    print(f"[wrote {final} ({final.stat().st_size / 1e6:.1f} MB); {info}]", file=sys.stderr)
    result = {"training": info, "block_config": dataclasses.asdict(d), "draft_vocab_coverage": coverage}
    if a.eval_prompts:
        result["eval"] = evaluate(engine, final, eval_prompts(engine.tokenizer, a.eval_prompts, a.prompt_len), a.k,
                                  a.eval_tokens)
        for name, r in result["eval"].items():
            print(f"[{name}: {r['mean_accepted']:.2f} accepted of {a.k} per step, by position "
                  f"{' '.join(f'{x:.2f}' for x in r['acceptance_by_position'])}; {r['spec_tok_s']:.1f} tok/s vs plain "
                  f"{r['plain_tok_s']:.1f} ({r['speedup']:.2f}x); greedy identical: {r['greedy_identical']}]",
                  file=sys.stderr)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
