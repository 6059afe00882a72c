"""Batched decoding over a fixed number of slots with continuous batching (JetStream's prefill / insert / generate).

The decode state is data (a pytree; B slots and capacity C fixed: `generate` compiles once per (B, C) and per
power-of-two count of leading slots it runs on):
    cache          the model cache of batch B: row b is slot b (full layers C positions, sliding layers rings)
    tokens [B]     each slot's last token, at positions[b], not yet in the cache
    positions [B]  -1 = a free slot: a step neither reads nor writes its cache rows (layers.attention)
    keys [B, 2]    each slot's PRNG key (its request's seed); token at position p draws with token_key(key, p)
    temperature [B] (0 = greedy), top_k [B], top_p [B]: each slot's sampling settings

The loop is functions over it (jitted, the state donated):
    prefill  a request's prompt, chunk by chunk, into a batch-1 cache of capacity C (Engine's own compiled
             prefill, so a slot starts exactly where Engine.generate would) -> its first token;
    insert   that cache into slot s's rows, with the slot's token, position, key and settings;
    generate one token for every active slot (one forward of [rows, 1] tokens at per-slot positions, rows the
             power of two covering the busy slots: requests take the lowest free slot);
    free     slot s (its position -1).

`Batcher` is the host side: a waiting queue, the slot table, budgets (engine.Budget: eos, max_new_tokens, the
context), and tick() = prefill chunks up to prefill_chunk tokens (admitting waiting requests into free slots) +
one step. Step t+1 (and a new slot's first token) is read only after step t+1 is dispatched, so the device does
not wait on the host; the requests a step ran for are recorded when it is dispatched, and a token is delivered
only to the request that still holds its slot. With speculative_k, the step drafts and verifies k tokens per slot
(batched_speculative.py). submit() and cancel() may be called from any thread; one thread drives tick()
(Batcher.start() or a caller's loop, as in generate_all).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mimo_jax import engine as engine_module
from mimo_jax import batched_speculative, model, sampling  # (batched_speculative imports this module back)
from mimo_jax.config import ModelConfig
from mimo_jax.engine import Budget, Engine, Generation, GenerationStats, to_host
from mimo_jax.errors import InputError


# ---- the decode state and the functions over it ----

def init_state(cfg: ModelConfig, batch: int, capacity: int, dtype, ring_slack: int = 0) -> dict:
    return {"cache": model.init_cache(cfg, batch, capacity, dtype, ring_slack),
            "tokens": jnp.zeros((batch,), jnp.int32), "positions": jnp.full((batch,), -1, jnp.int32),
            "keys": jnp.zeros((batch, 2), jnp.uint32), "temperature": jnp.zeros((batch,), jnp.float32),
            "top_k": jnp.zeros((batch,), jnp.int32), "top_p": jnp.ones((batch,), jnp.float32)}


@functools.partial(jax.jit, donate_argnames="state")
def insert(state, prefix_cache, slot, token, position, key, temperature, top_k, top_p, extra=None):
    """A prefilled batch-1 cache (same capacity) into slot `slot`; token [1] (the first new token) at `position`.
    extra: the slot's other leaves, batch-1 shaped (speculative decoding: mtp_cache, draft, draft_logits,
    draft_hidden; batched_speculative.py), for a state that has them."""
    def one(x, dtype):
        return jnp.reshape(jnp.asarray(x, dtype), (1,))

    row = {"cache": prefix_cache, "tokens": token, "positions": one(position, jnp.int32), "keys": key[None],
           "temperature": one(temperature, jnp.float32), "top_k": one(top_k, jnp.int32),
           "top_p": one(top_p, jnp.float32), **(extra or {})}
    return jax.tree_util.tree_map_with_path(
        lambda path, rows, r: jax.lax.dynamic_update_slice_in_dim(rows, r.astype(rows.dtype), slot,
                                                                  _slots_axis(path, rows)), state, row)


@functools.partial(jax.jit, donate_argnames="state")
def free(state, slot):
    return {**state, "positions": state["positions"].at[slot].set(-1)}


def next_tokens(state, logits, all_greedy: bool):
    """logits [B, V] -> one token per slot: argmax where temperature is 0, else a draw from the slot's filtered
    distribution with its own key for the position the token takes (as Engine's decode draws it, row by row)."""
    greedy = sampling.greedy(logits)
    if all_greedy:
        return greedy
    keys = jax.vmap(sampling.token_key)(state["keys"], state["positions"] + 1)
    filtered = sampling.filtered_logits(logits, state["temperature"][:, None], state["top_k"][:, None],
                                        state["top_p"][:, None])
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, filtered)
    return jnp.where(state["temperature"] > 0, drawn.astype(jnp.int32), greedy)


def _slots_axis(path, leaf) -> int:
    """Where a state leaf keeps its slots: the cache's leaves are [*stack, B, S, heads, dim]; every other leaf
    (the speculative drafter's state included: [B, *its batch-1 shape]) has them first."""
    return leaf.ndim - 4 if path[0].key == "cache" else 0


def _first_slots(state, rows: int):
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jax.lax.slice_in_dim(a, 0, rows, axis=_slots_axis(path, a)), state)


def _put_first_slots(state, part):
    return jax.tree_util.tree_map_with_path(
        lambda path, a, b: jax.lax.dynamic_update_slice_in_dim(a, b, 0, _slots_axis(path, a)), state, part)


@functools.partial(jax.jit, static_argnames=("cfg", "all_greedy", "rows"), donate_argnames="state")
def generate(params, state, *, cfg: ModelConfig, all_greedy: bool, rows: int | None = None):
    """One token for every active slot -> (state, tokens [B] (0 in free slots)).

    Static: all_greedy (no slot samples: the step compiles without the sort); rows (the step runs on slots
    [0, rows) only, every active slot being among them: a few busy slots do not pay for the whole batch).
    One compilation per (rows bucket, all_greedy)."""
    batch = state["positions"].shape[0]
    whole, rows = state, min(rows or batch, batch)
    if rows < batch:
        state = _first_slots(state, rows)
    positions = state["positions"]
    hidden, cache = model.forward_hidden(params, state["tokens"][:, None], positions[:, None], state["cache"], cfg)
    logits = model.lm_logits(params, hidden[:, 0], cfg)
    active = positions >= 0
    tokens = jnp.where(active, next_tokens(state, logits, all_greedy), 0)
    state = {**state, "cache": cache, "tokens": tokens, "positions": jnp.where(active, positions + 1, -1)}
    if rows < batch:
        state = _put_first_slots(whole, state)
        tokens = jnp.pad(tokens, (0, batch - rows))
    return state, tokens


# ---- the host side ----

@dataclasses.dataclass(eq=False)
class Request:
    """One generation. on_tokens(request, new token ids, finish reason or "") is called from the driving thread
    as tokens arrive; finish reasons: "eos", "length", "context" (engine.Budget), "cancelled" or "error" (a step failed)."""
    ids: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    on_tokens: Callable[["Request", list[int], str], None] | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str = ""
    stats: GenerationStats = dataclasses.field(default_factory=GenerationStats)
    cancelled: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    slot: int | None = None
    budget: Budget | None = None
    submitted_at: float = 0.0
    first_token_at: float = 0.0


@dataclasses.dataclass
class _Prefill:
    request: Request
    slot: int
    chunks: list
    cache: object
    started: float
    done_chunks: int = 0
    logits: object = None
    normed: list = dataclasses.field(default_factory=list)  # speculative: the target's normed hidden per chunk


class Batcher:
    def __init__(self, engine: Engine, batch_size: int = 8, capacity: int | None = None,
                 speculative_k: int | None = None, drafter=None):
        """capacity: positions per slot (prompt + new tokens), default the engine's max_seq_len.
        speculative_k, drafter: each step drafts k tokens per slot and verifies them (batched_speculative.py);
        default the engine's (Engine(speculative_k=..., drafter=...)); 0 = plain decoding."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        k = engine.speculative_k if speculative_k is None else speculative_k
        drafter = drafter or engine.drafter
        if k < 0:
            raise InputError(f"speculative_k must be >= 0, got {k}")
        if k and drafter.uses_mtp and "mtp" not in engine.params:
            raise InputError("speculative decoding with the MTP drafter needs MTP layers; this model has none")
        self.speculative_k, self.drafter = k, drafter
        # the params a step takes (a block drafter's weights under "drafter": Engine.step_params)
        self._params = getattr(engine, "step_params", engine.params) if k else engine.params
        self.engine, self.batch_size = engine, batch_size
        self.capacity = int(capacity or engine.max_seq_len)
        self.state = self._new_state()
        self.slots: list[Request | None] = [None] * batch_size
        self._decoding = [False] * batch_size  # the slot's request is inserted (the step advances it)
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefill: _Prefill | None = None
        self._firsts: list = []  # (prefill, first token on device) inserted this tick, read after its step
        self._pending = None  # (tokens on device, the requests the step ran for)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        # metrics
        self.requests_total = self.requests_finished = self.requests_cancelled = 0
        self.prompt_tokens_total = self.generated_tokens_total = self.steps_total = 0
        self.slot_steps_total = self.accepted_total = 0  # speculative: slots stepped, drafts they accepted
        self._recent = collections.deque()  # (time, tokens) for tokens_per_second

    def _new_state(self) -> dict:
        e, k = self.engine, self.speculative_k
        if k:
            state = batched_speculative.init_state(self._params, e.cfg, self.batch_size, self.capacity,
                                                   e.cache_dtype, k, self.drafter)
        else:
            state = init_state(e.cfg, self.batch_size, self.capacity, e.cache_dtype)
        return {**state, "cache": e._place(state["cache"])}  # on a mesh, split as the batch-1 caches are

    # ---- requests (any thread) ----
    def submit(self, request: Request) -> Request:
        """Queue a request (checked here: InputError for what cannot run)."""
        e = self.engine
        request.ids = e.encode(request.ids)
        if len(request.ids) >= self.capacity:
            raise InputError(f"the prompt has {len(request.ids)} tokens; a slot holds {self.capacity} "
                             f"(prompt + at least one new token)")
        if request.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if request.temperature < 0 or not 0 < request.top_p <= 1 or request.top_k < 0:
            raise InputError(f"invalid sampling settings: temperature={request.temperature} (>= 0), top_k="
                             f"{request.top_k} (>= 0), top_p={request.top_p} (in (0, 1])")
        request.budget = Budget.of(request.max_new_tokens, len(request.ids), self.capacity,
                                   e.eos_ids if request.stop_at_eos else ())
        request.stats = GenerationStats(prompt_tokens=len(request.ids), speculative_k=self.speculative_k,
                                        accepted_hist=[0] * (self.speculative_k + 1) if self.speculative_k else [])
        request.submitted_at = time.perf_counter()
        with self._wake:
            self._waiting.append(request)
            self.requests_total += 1
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: its slot is freed at the driving thread's next tick (at once if it is idle)."""
        if request.done.is_set():
            return
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def slots_in_use(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def running(self) -> bool:
        """The background thread (start()) is driving the batch."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1e-3) if len(recent) > 1 else 0.0

    def warm_up(self, sampling: bool = True) -> None:
        """Compile, before any client waits on it, what serving can run: every prefill chunk bucket and the step
        for every slot bucket, greedy and (sampling) sampled (steps over free slots change nothing). Call it before
        start()."""
        e, size = self.engine, 16
        # speculative: the drafter's prompt pass compiles per chunk bucket for greedy and sampled requests
        runs = [{}, dict(temperature=1.0)][:1 + sampling] if self.speculative_k else [{}]
        while True:
            n = min(size, e.prefill_chunk, self.capacity - 1)
            for kw in runs:
                self.submit(Request([0] * n, max_new_tokens=1, stop_at_eos=False, **kw))
            if n < size or size >= e.prefill_chunk:
                break
            size *= 2
        while self.tick():
            pass
        rows = 1
        with e._on_mesh():
            while True:
                for all_greedy in (True, False)[:1 + sampling]:
                    self.state, *_ = self._step(all_greedy, rows)
                if rows >= self.batch_size:
                    break
                rows = min(2 * rows, self.batch_size)
        jax.block_until_ready(self.state)
        self.requests_total = self.requests_finished = self.prompt_tokens_total = self.generated_tokens_total = 0
        self.steps_total = self.slot_steps_total = self.accepted_total = 0

    # ---- the driving thread ----
    def start(self) -> None:
        """Drive tick() from a background thread until stop()."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="mimo-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while self._running:
            try:
                worked = self.tick()
            except Exception:  # a failed step must not hang every client: end what is in flight, start afresh
                import traceback

                traceback.print_exc()
                self._fail_all()
                continue
            if not worked:
                with self._wake:
                    if self._running and not self._has_work():
                        self._wake.wait(timeout=0.1)

    def _fail_all(self) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        live = [r for r in self.slots if r is not None] + waiting
        self.slots, self._decoding = [None] * self.batch_size, [False] * self.batch_size
        self._prefill = self._pending = None
        self._firsts = []
        e = self.engine
        self.state = self._new_state()
        for r in live:
            if not r.done.is_set():
                r.slot = None
                self._finish(r, [], "error")

    def _has_work(self) -> bool:
        return bool(self._waiting) or self._prefill is not None or self._pending is not None or any(self._decoding)

    def tick(self) -> bool:
        """Cancellations, prefill chunks (up to engine.prefill_chunk tokens), one step (dispatched before the
        previous step is read). False when there was nothing to do."""
        with self.engine._on_mesh():
            self._reap_cancelled()
            worked, spent = False, 0
            while spent < self.engine.prefill_chunk:  # prefill up to one chunk's worth of tokens per step
                n = self._admit()
                if not n:
                    break
                worked, spent = True, spent + n
            pending, self._pending = self._pending, None
            if any(self._decoding):
                self._pending = self._dispatch()
                worked = True
            firsts, self._firsts = self._firsts, []
            for p, first in firsts:  # read after the step is dispatched: no drain of the device's queue
                self._first_token(p, int(to_host(first)[0]))
            if pending is not None:
                self._deliver(*pending)
                worked = True
        return worked

    def _reap_cancelled(self) -> None:
        for slot, r in enumerate(self.slots):
            if r is not None and r.cancelled and not r.done.is_set():
                if self._prefill is not None and self._prefill.request is r:
                    self._prefill = None
                self._finish(r, [], "cancelled")
        if any(r.cancelled for r in self._waiting):
            with self._wake:
                gone = [r for r in self._waiting if r.cancelled]
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            for r in gone:
                self._finish(r, [], "cancelled")

    def _admit(self) -> int:
        """One prefill chunk (starting the next waiting request if none is under way) -> its padded length."""
        if self._prefill is None:
            if not self._waiting or None not in self.slots:
                return 0
            with self._wake:
                r = self._waiting.popleft()
            slot = self.slots.index(None)
            self.slots[slot], r.slot = r, slot
            e = self.engine
            cache = e.new_cache(self.capacity, ring_slack=self.speculative_k + 1 if self.speculative_k else 0)
            self._prefill = _Prefill(r, slot, list(e._chunks(r.ids)), cache, time.perf_counter())
        p, e = self._prefill, self.engine
        tokens, positions, _ = p.chunks[p.done_chunks]
        if self.speculative_k:
            batched_speculative.prefill_chunk(e, p)
        else:
            p.logits, p.cache = engine_module._prefill(e.params, tokens, positions, p.cache, e.cfg)
        p.done_chunks += 1
        if p.done_chunks == len(p.chunks):
            self._prefill = None
            self._insert(p)
        return int(tokens.shape[1])

    def _insert(self, p: _Prefill) -> None:
        r, position, k = p.request, len(p.request.ids), self.speculative_k
        key = jax.random.PRNGKey(r.seed)
        settings = (jnp.float32(r.temperature), jnp.int32(r.top_k), jnp.float32(r.top_p))
        first_key = sampling.token_key(key, position)
        if k:  # as Engine's speculative stream: the first token and the prompt's draft d_1 split its key
            first_key, draft_key = jax.random.split(first_key)
        first = engine_module._first_token(p.logits, first_key, *settings, is_greedy=r.temperature == 0.0)
        extra = batched_speculative.drafter_rows(self.engine, p, self._params, first, draft_key, settings,
                                                 r.temperature == 0.0, k, self.drafter) if k else None
        # into the slot at once; the token is read once this tick's step is dispatched (tick)
        self.state = insert(self.state, p.cache, p.slot, first, position, key, *settings, extra)
        self._decoding[p.slot] = True
        self._firsts.append((p, first))

    def _first_token(self, p: _Prefill, first_id: int) -> None:
        """Emit a request's first token (max_new_tokens 1 or an eos end it: its slot is freed, and a step already
        dispatched for it is discarded on delivery)."""
        r = p.request
        r.first_token_at = time.perf_counter()
        r.stats.prefill_ms = 1e3 * (r.first_token_at - p.started)
        self.prompt_tokens_total += len(r.ids)
        kept, reason = r.budget.take(0, [first_id])
        self._emit(r, kept, reason)

    def _dispatch(self):
        ran = [r if dec else None for r, dec in zip(self.slots, self._decoding)]
        all_greedy = all(r.temperature == 0.0 for r in ran if r is not None)
        busy = max(i for i, r in enumerate(ran) if r is not None) + 1  # requests take the lowest free slot
        rows = min(1 << (busy - 1).bit_length(), self.batch_size)  # a power of two: log2(B) + 1 compilations
        self.state, *out = self._step(all_greedy, rows)
        self.steps_total += 1
        return out, ran

    def _step(self, all_greedy: bool, rows: int):
        """-> (state, tokens [B]) plain, (state, emitted [B, k+1], accepted [B]) speculative."""
        e = self.engine
        if self.speculative_k:
            return batched_speculative.generate(self._params, self.state, cfg=e.cfg, k=self.speculative_k,
                                                drafter=self.drafter, all_greedy=all_greedy, rows=rows)
        return generate(e.params, self.state, cfg=e.cfg, all_greedy=all_greedy, rows=rows)

    def _deliver(self, out, ran) -> None:
        tokens = to_host(out[0])
        accepted = to_host(out[1]) if len(out) > 1 else None
        for slot, r in enumerate(ran):
            if r is None or r.done.is_set() or self.slots[slot] is not r:
                continue  # the slot was free, or its request ended after this step was dispatched
            if accepted is None:
                step = [int(tokens[slot])]
            else:  # d_1..d_n and the bonus
                n = int(accepted[slot])
                step = tokens[slot, :n + 1].tolist()
                r.stats.accepted_hist[n] += 1
                self.slot_steps_total += 1
                self.accepted_total += n
            kept, reason = r.budget.take(len(r.token_ids), step)
            self._emit(r, kept, reason)

    def _emit(self, r: Request, tokens: list[int], reason: str) -> None:
        r.token_ids += tokens
        r.stats.new_tokens = len(r.token_ids)
        r.stats.decode_s = time.perf_counter() - r.first_token_at
        self.generated_tokens_total += len(tokens)
        self._recent.append((time.perf_counter(), len(tokens)))
        while len(self._recent) > 4096:
            self._recent.popleft()
        if reason:
            self._finish(r, tokens, reason)
        elif r.on_tokens is not None and tokens:
            r.on_tokens(r, tokens, "")

    def _finish(self, r: Request, tokens: list[int], reason: str) -> None:
        """End a request: free its slot at once (a step already dispatched for it is discarded on delivery)."""
        r.finish_reason = r.stats.finish_reason = reason
        slot = r.slot
        if slot is not None and self.slots[slot] is r:
            if self._decoding[slot]:
                self.state = free(self.state, slot)
            self.slots[slot], self._decoding[slot] = None, False
        self.requests_finished += 1
        self.requests_cancelled += reason == "cancelled"
        r.done.set()
        if r.on_tokens is not None:
            r.on_tokens(r, tokens, reason)


def generate_all(engine: Engine, prompts: Sequence[Sequence[int]], batch_size: int = 8, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_at_eos: bool = True, capacity: int | None = None, warm_up: bool = False,
                 on_done: Callable[[int, Generation], None] | None = None) -> list[Generation]:
    """Every prompt (token ids) through `batch_size` slots, the calling thread driving the batch; results in
    input order (each sampled with `seed`, as one-at-a-time generation would). capacity: positions per slot
    (default: the longest prompt + max_new_tokens, bucketed as Engine.capacity). warm_up: compile everything
    first (Batcher.warm_up), so that no request's stats include compilation. on_done(index, generation) is
    called as each finishes (in completion order: a progress bar)."""
    if capacity is None:
        longest = max((len(p) for p in prompts), default=1)
        capacity = engine.capacity(longest, max_new_tokens)
    batcher = Batcher(engine, batch_size, capacity)
    if warm_up:
        batcher.warm_up()
    results: list[Generation | None] = [None] * len(prompts)

    def finished(index):
        def callback(r: Request, tokens, reason):
            if reason:
                ids = r.token_ids
                results[index] = Generation(ids, engine.tokenizer.decode(ids) if engine.tokenizer else None, r.stats)
                if on_done is not None:
                    on_done(index, results[index])
        return callback

    for i, ids in enumerate(prompts):
        batcher.submit(Request(list(ids), max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                               on_tokens=finished(i)))
    while batcher.tick():
        pass
    return results
