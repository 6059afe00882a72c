"""The drafter's training data (train_drafter.py): prompts, the target's own greedy continuations, teacher-forced
source windows, and their on-disk cache.

  prompts  code: windows of the Python standard library's source files (present wherever Python is), minus a
           fixed held-out set of files (EVAL_FILES); chat: instructions built from templates x topics, minus
           held-out topics (EVAL_TOPICS), in the model's chat template (data_seed != 0: other styles and
           two-topic templates, sampled). Tokenized in batches (the tokenizer's
           encode_batch: its threads; the same ids as one text at a time).
  targets  the target's own greedy continuation of each prompt (batched, one jitted prefill + lax.scan decode),
           plus teacher-forced windows of training source (the target's greedy next token at every position).
  cache    only token ids are stored, one .npz per part (code, chat, source) under the cache directory, named by a
           hash of what decides its content (model file, counts, lengths, held-out sets): never by training flags
           (steps, deadlines, plans, batch sizes), so every call of a multi-call run reads what the first one wrote.
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
# data_seed != 0 only: instructions outside seed 0's set (new styles, and templates over two topics), sampled
STYLES_MORE = (" Keep it under 100 words.", " Explain it like I am five.", " Use an example.", " Write it formally.",
               " Make it funny.", " End with a one-line summary.", " Use bullet points.", " Answer in two sentences.")
PAIR_TEMPLATES = ("How are {} and {} related?", "Write a short story that involves {} and {}.", "Compare {} and {}.",
                  "What can {} teach us about {}?", "Write a poem about {} and {}.",
                  "Explain {} to someone who loves {}.", "Plan a lesson that connects {} with {}.",
                  "Write a news headline and a short article about {} and {}.")
EVAL_TOPICS = ("dinosaurs", "hash tables", "the solar system", "bread baking", "the Olympic games", "rivers",
               "password security", "origami")


class DataNotCached(FileNotFoundError):
    """require_cache and a part of the data set is not in the cache (a fresh machine, other flags)."""


def stdlib_files(held_out: bool) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in root.glob("*.py"))
    return [root / n for n in names if (n in EVAL_FILES) == held_out]


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """tokenizer.encode(t, add_special_tokens=False) for each text; in one batch where the tokenizer has one."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch(texts, add_special_tokens=False)
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def code_prompts(tokenizer, n: int, length: int, held_out: bool, seed: int) -> list[list[int]]:
    """n windows of `length` tokens of standard-library source, each the start of 200 lines from a random line
    of a random file (windows shorter than `length` skipped). Candidates are drawn in chunks and tokenized as a
    batch: the random draws, and so the windows, are those of drawing and tokenizing one at a time."""
    rng, out = np.random.default_rng(seed), []
    files = stdlib_files(held_out)

    @functools.cache
    def lines(i):
        return files[i].read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)

    while len(out) < n:
        texts = []
        for _ in range(min(4096, n - len(out) + 16)):
            ls = lines(int(rng.integers(len(files))))
            start = int(rng.integers(max(1, len(ls) - 40)))
            texts.append("".join(ls[start:start + 200]))
        out += [ids[:length] for ids in encode_many(tokenizer, texts) if len(ids) >= length]
    return out[:n]


def chat_instructions(held_out: bool, data_seed: int = 0, n: int = 0) -> list[str]:
    """Held-out: TEMPLATES x EVAL_TOPICS x STYLES. Training, data_seed 0: every training template x topic x style
    (~13.7K). data_seed != 0: n distinct instructions none of which seed 0 has (a template with one of STYLES_MORE,
    or a two-topic PAIR_TEMPLATE with any style), sampled by data_seed; never an EVAL_TOPIC."""
    if held_out:
        return [t.format(topic) + style for style in STYLES for topic in EVAL_TOPICS for t in TEMPLATES]
    topics, templates = TOPICS + MORE_TOPICS, TEMPLATES + MORE_TEMPLATES
    if data_seed == 0:
        return [t.format(topic) + style for style in STYLES for topic in topics for t in templates]
    rng, out, seen, styles = np.random.default_rng([data_seed, 11]), [], set(), STYLES + STYLES_MORE
    while len(out) < n:
        if rng.random() < 0.5:
            text = (templates[rng.integers(len(templates))].format(topics[rng.integers(len(topics))])
                    + STYLES_MORE[rng.integers(len(STYLES_MORE))])
        else:
            a, b = rng.choice(len(topics), 2, replace=False)
            text = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))].format(topics[a], topics[b]) + styles[
                rng.integers(len(styles))]
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def chat_prompts(tokenizer, n: int, held_out: bool, seed: int, data_seed: int = 0) -> list[list[int]]:
    """n prompts (data_seed 0: at most len(chat_instructions), greedy repeats teach nothing), each one user message
    in the chat template with the assistant turn opened (prompts.chat_ids, tokenized as a batch)."""
    if data_seed:
        texts = chat_instructions(held_out, data_seed, n)
    else:
        texts = chat_instructions(held_out)
        texts = [texts[i] for i in np.random.default_rng(seed).permutation(len(texts))[:n]]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
                for t in texts]
    return encode_many(tokenizer, rendered)


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
    this one's tokens are read: one host sync per batch); a row ends after its first eos token."""
    from tqdm import tqdm

    tp = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), tp + gen_len), -1, np.int32)
    starts = np.array([len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    bar = tqdm(total=len(prompts) * gen_len, desc=desc, unit="tok", unit_scale=True, file=sys.stderr)

    def dispatch(i):
        rows = np.arange(i, i + batch) % len(prompts) if i + batch > len(prompts) else np.arange(i, i + batch)
        x = np.maximum(tokens[rows, :tp], 0)  # a fixed batch shape (one compilation): the last batch wraps around
        return i, _continue(params, jnp.asarray(x), jnp.asarray(starts[rows]), cfg, gen_len)

    pending = dispatch(0)
    cols = np.arange(gen_len)
    for i in range(0, len(prompts), batch):
        i, gen = pending
        if i + batch < len(prompts):
            pending = dispatch(i + batch)
        gen = np.asarray(jax.device_get(gen))[:min(batch, len(prompts) - i)]
        is_eos = np.isin(gen, np.asarray(eos, np.int32)) if eos else np.zeros(gen.shape, bool)
        keep = np.cumsum(np.concatenate([np.zeros_like(is_eos[:, :1]), is_eos[:, :-1]], axis=1), axis=1) == 0
        rows = np.arange(i, i + len(gen))
        tokens[rows[:, None], starts[rows][:, None] + cols] = np.where(keep, gen, -1)
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


def cached(path: Path, build, name: str, require: bool = False) -> Data:
    """The data set stored at `path`, else build() and store it (atomically); says which on stderr."""
    if path.is_file():
        z = np.load(path)
        data = Data(z["tokens"], z["gen_start"], z["labels"])
        print(f"[data: {name} reused from the cache {path} ({len(data.tokens)} sequences, {data.generated} "
              f"tokens): nothing generated]", file=sys.stderr)
        return data
    if require:
        raise DataNotCached(f"{name} data is not cached at {path} (--require_cache): a fresh machine or other "
                            f"data flags")
    t0 = time.perf_counter()
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, tokens=data.tokens, gen_start=data.gen_start, labels=data.labels)
    tmp.replace(path)
    print(f"[data: {name} generated in {time.perf_counter() - t0:.0f} s ({len(data.tokens)} sequences, "
          f"{data.generated} tokens), cached at {path}]", file=sys.stderr)
    return data


def cache_key(*fields) -> str:
    return hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:12]


def datasets(engine, a, model_tag: str, require_cache: bool = False) -> dict[str, Data]:
    """{"train": code + chat continuations (+ teacher-forced source windows)}: built once, then read from the
    cache. `a` holds the data flags (code_prompts, chat_prompts, source_windows, prompt_len, gen_len, gen_batch,
    cache_dir; data_seed, if set: other code prompts, chat instructions and source windows, for a run that
    fine-tunes an earlier drafter on new data); each part's file name hashes only what decides its content (not
    gen_batch: the batch changes how fast, not what). require_cache: raise DataNotCached instead of generating."""
    tok, cfg, eos = engine.tokenizer, engine.cfg, tuple(engine.eos_ids)
    base = Path(a.cache_dir)
    ds = getattr(a, "data_seed", 0)

    def seed(s):  # data_seed 0: the seeds every earlier run used (and their cache files)
        return s if ds == 0 else [s, ds]

    def key(*fields):
        return cache_key(*fields) if ds == 0 else cache_key(*fields, ds)

    def build(prompts, desc):
        return make_data(engine.params, cfg, prompts, a.gen_len, a.gen_batch, eos, desc)

    code = cached(base / f"code_{key(model_tag, a.code_prompts, a.prompt_len, a.gen_len, EVAL_FILES, 3)}.npz",
                  lambda: build(code_prompts(tok, a.code_prompts, a.prompt_len, False, seed(0)), "code data"), "code",
                  require_cache)
    chat = cached(base / f"chat_{key(model_tag, a.chat_prompts, a.gen_len, EVAL_TOPICS, 3)}.npz",
                  lambda: build(chat_prompts(tok, a.chat_prompts, False, 1, ds), "chat data"), "chat", require_cache)
    t = max(code.tokens.shape[1], chat.tokens.shape[1])

    def pad(d):
        w = t - d.tokens.shape[1]
        return Data(np.pad(d.tokens, ((0, 0), (0, w)), constant_values=-1), d.gen_start,
                    np.pad(d.labels, ((0, 0), (0, w)), constant_values=-1))

    parts = [code, chat]
    if a.source_windows:
        parts.append(cached(base / f"source_{key(model_tag, a.source_windows, t, EVAL_FILES, 3)}.npz",
                            lambda: make_source_data(engine.params, cfg, code_prompts(tok, a.source_windows, t, False,
                                                                                      seed(7)), a.gen_batch),
                            "source", require_cache))
    parts = [pad(p) for p in parts]
    return {"train": Data(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("tokens", "gen_start", "labels")))}


def draft_vocab(data: Data, size: int, vocab_size: int) -> np.ndarray:
    """The `size` tokens the target predicts most often (its greedy labels; sorted ids)."""
    counts = np.bincount(data.labels[data.labels >= 0], minlength=vocab_size)
    return np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)


