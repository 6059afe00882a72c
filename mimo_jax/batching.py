"""Continuous batching, the host side: requests, the slot table and the loop that drives the jitted decode state
functions of batch_state.py (prefill / insert / generate / free over a fixed number of slots).

`Batcher` is the host side: a waiting queue, the slot table, budgets (engine.Budget: eos, max_new_tokens, the
context), and tick() = batched prefill calls up to prefill_tokens padded tokens (admitting waiting requests into
free slots; each call takes the oldest prefilling request's chunk length, and the others whose chunks fit it) +
one step. Step t+1 (and a new slot's first token) is read only after step t+1 is dispatched, so the device does
not wait on the host; the requests a step ran for are recorded when it is dispatched, and a token is delivered
only to the request that still holds its slot. With speculative_k, the step drafts and verifies k tokens per slot
(batched_speculative.py). submit() and cancel() may be called from any thread; one thread drives tick()
(Batcher.start() or a caller's loop, as in generate_all).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from mimo_jax import engine as engine_module
from mimo_jax import batched_speculative
from mimo_jax.batch_state import free, generate, init_state, prefill
from mimo_jax.engine import Budget, Engine, Generation, GenerationStats, to_host
from mimo_jax.errors import InputError


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
    key: np.ndarray | None = None  # jax.random.PRNGKey(seed)'s two words (submit)


@dataclasses.dataclass
class _Prefill:
    """A request admitted into its slot whose prompt is not yet all through the target."""
    request: Request
    slot: int
    started: float
    done: int = 0  # prompt tokens already prefilled


class Batcher:
    def __init__(self, engine: Engine, batch_size: int = 8, capacity: int | None = None,
                 speculative_k: int | None = None, drafter=None, prefill_rows: int | None = None,
                 prefill_tokens: int | None = None):
        """capacity: positions per slot (prompt + new tokens), default the engine's max_seq_len.
        speculative_k, drafter: each step drafts k tokens per slot and verifies them (batched_speculative.py);
        default the engine's (Engine(speculative_k=..., drafter=...)); 0 = plain decoding.
        prefill_rows: requests prefilled together in one call at most (default batch_size); prefill_tokens: padded
        prompt tokens (rows x chunk length) prefilled per tick, between two steps (default 8 x the engine's
        prefill_chunk; at least one row runs)."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.prefill_rows = min(batch_size, prefill_rows or batch_size)
        self.prefill_tokens = prefill_tokens or 8 * engine.prefill_chunk
        if self.prefill_rows < 1 or self.prefill_tokens < 1:
            raise InputError(f"prefill_rows and prefill_tokens must be >= 1, got {prefill_rows}, {prefill_tokens}")
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
        self._prefills: list[_Prefill] = []  # admitted, oldest first
        self._firsts: list = []  # (first tokens [R] on device, [(row, prefill)]) inserted this tick, read after its step
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
        with jax.default_device(jax.devices("cpu")[0]):  # on the host: no wait behind the accelerator's queue
            request.key = np.asarray(jax.random.PRNGKey(request.seed), np.uint32)
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

    def prefill_shapes(self, prompt_lens: Sequence[int] | None = None) -> list[tuple[bool, int, int]]:
        """(fresh, rows, chunk length) of every prefill call prompts of these lengths (default: any that fits) can
        make: first chunks at their length bucket, later chunks (prompts over prefill_chunk) at prefill_chunk; rows
        each power of two up to what prefill_rows and prefill_tokens allow at that length."""
        chunk = self.engine.prefill_chunk
        lens = list(prompt_lens) if prompt_lens is not None else list(range(1, self.capacity))
        lens = [n for n in lens if 0 < n < self.capacity]
        calls = [(True, size) for size in sorted({engine_module._bucket(min(n, chunk), chunk) for n in lens})]
        calls += [(False, chunk)] if any(n > chunk for n in lens) else []
        shapes = []
        for fresh, size in calls:
            limit, rows = self._row_limit(self.prefill_tokens, size), 1
            while True:
                shapes.append((fresh, rows, size))
                if rows >= limit:
                    break
                rows = min(2 * rows, limit)
        return shapes

    def warm_up(self, sampling: bool = True, prompt_lens: Sequence[int] | None = None) -> None:
        """Compile, before any client waits on it, what serving can run: every prefill call (prefill_shapes: for
        prompts of these lengths, default any) and the step for every slot bucket, greedy and (sampling) sampled
        (a prefill of padding rows and steps over free slots change nothing). Call it before start()."""
        e = self.engine
        with e._on_mesh():
            for fresh, rows, size in self.prefill_shapes(prompt_lens):
                self.state, _ = self._prefill_call([], fresh, rows, size)
            self.state = free(self.state, 0)
            rows = 1
            while True:
                for all_greedy in (True, False)[:1 + sampling]:
                    self.state, *_ = self._step(all_greedy, rows)
                if rows >= self.batch_size:
                    break
                rows = min(2 * rows, self.batch_size)
        jax.block_until_ready(self.state)

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
        self._prefills, self._pending, self._firsts = [], None, []
        self.state = self._new_state()
        for r in live:
            if not r.done.is_set():
                r.slot = None
                self._finish(r, [], "error")

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefills) or self._pending is not None or any(self._decoding)

    def tick(self) -> bool:
        """Cancellations, prefill calls (up to prefill_tokens padded tokens), one step (dispatched before the
        previous step is read). False when there was nothing to do."""
        with self.engine._on_mesh():
            self._reap_cancelled()
            worked = self._prefill_some()
            pending, self._pending = self._pending, None
            if any(self._decoding):
                self._pending = self._dispatch()
                worked = True
            firsts, self._firsts = self._firsts, []
            for first, rows in firsts:  # read after the step is dispatched: no drain of the device's queue
                first = to_host(first)
                for row, p in rows:
                    self._first_token(p, int(first[row]))
            if pending is not None:
                self._deliver(*pending)
                worked = True
        return worked

    def _reap_cancelled(self) -> None:
        for slot, r in enumerate(self.slots):
            if r is not None and r.cancelled and not r.done.is_set():
                self._prefills = [p for p in self._prefills if p.request is not r]
                self._finish(r, [], "cancelled")
        if any(r.cancelled for r in self._waiting):
            with self._wake:
                gone = [r for r in self._waiting if r.cancelled]
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            for r in gone:
                self._finish(r, [], "cancelled")

    # ---- batched prefill ----
    def _prefill_some(self) -> bool:
        """Admit waiting requests into free slots, then prefill calls until prefill_tokens padded tokens are spent."""
        while self._waiting and None in self.slots:
            with self._wake:
                r = self._waiting.popleft()
            slot = self.slots.index(None)
            self.slots[slot], r.slot = r, slot
            self._prefills.append(_Prefill(r, slot, time.perf_counter()))
        spent = 0
        while self._prefills and spent < self.prefill_tokens:
            spent += self._prefill_group(self.prefill_tokens - spent)
        return spent > 0

    def _chunk(self, p: _Prefill) -> tuple[int, int]:
        """p's next chunk: (its prompt tokens, its padded length: its bucket for a first chunk, else the chunk)."""
        chunk = self.engine.prefill_chunk
        n = min(chunk, len(p.request.ids) - p.done)
        return n, engine_module._bucket(n, chunk) if p.done == 0 else chunk

    def _row_limit(self, room: int, size: int) -> int:
        """The most rows of `size` tokens one call takes within `room` tokens (rows are bucketed to powers of
        two, or prefill_rows)."""
        fit = max(1, room // size)
        return self.prefill_rows if fit >= self.prefill_rows else 1 << (fit.bit_length() - 1)

    def _prefill_group(self, room: int) -> int:
        """One call: the oldest prefilling request's next chunk, with the others of the same kind (first or later
        chunk) whose chunks fit its length -> the padded tokens it ran."""
        first = self._prefills[0]
        fresh, size = first.done == 0, self._chunk(first)[1]
        group = [p for p in self._prefills if (p.done == 0) == fresh and self._chunk(p)[1] <= size]
        group = group[:self._row_limit(room, size)]
        rows = min(1 << (len(group) - 1).bit_length(), self.prefill_rows)
        self.state, first_tokens = self._prefill_call(group, fresh, rows, size)
        inserted = []
        for row, p in enumerate(group):
            p.done += self._chunk(p)[0]
            if p.done == len(p.request.ids):
                self._prefills.remove(p)
                self._decoding[p.slot] = True
                inserted.append((row, p))
        if inserted:  # their first tokens are read once this tick's step is dispatched (tick)
            self._firsts.append((first_tokens, inserted))
        return rows * size

    def _prefill_call(self, group: list[_Prefill], fresh: bool, rows: int, size: int):
        """batch_state.prefill (or the speculative one) over the group's next chunks, padded to `rows` x `size`."""
        e, k, chunk = self.engine, self.speculative_k, self.engine.prefill_chunk
        inputs = {"slots": np.full(rows, self.batch_size, np.int32), "tokens": np.zeros((rows, size), np.int32),
                  "positions": np.full((rows, size), -1, np.int32), "final": np.zeros(rows, bool),
                  "lengths": np.zeros(rows, np.int32), "keys": np.zeros((rows, 2), np.uint32),
                  "temperature": np.zeros(rows, np.float32), "top_k": np.zeros(rows, np.int32),
                  "top_p": np.ones(rows, np.float32)}
        if k:  # the token after each position (the drafter's input): the prompt's, the first new one set on device
            inputs["following"] = np.zeros((rows, size), np.int32)
        for i, p in enumerate(group):
            r, start = p.request, p.done
            n = min(chunk, len(r.ids) - start)
            inputs["slots"][i], inputs["final"][i], inputs["lengths"][i] = p.slot, start + n == len(r.ids), len(r.ids)
            inputs["tokens"][i, :n] = r.ids[start:start + n]
            inputs["positions"][i, :n] = np.arange(start, start + n)
            inputs["keys"][i] = r.key
            inputs["temperature"][i], inputs["top_k"][i], inputs["top_p"][i] = r.temperature, r.top_k, r.top_p
            if k:
                inputs["following"][i, :n] = r.ids[start + 1:start + n + 1] + [0] * (start + n == len(r.ids))
        if k:
            return batched_speculative.prefill(self._params, self.state, inputs, cfg=e.cfg, fresh=fresh, k=k,
                                               drafter=self.drafter)
        return prefill(e.params, self.state, inputs, cfg=e.cfg, fresh=fresh)

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
        batcher.warm_up(prompt_lens=[len(p) for p in prompts])
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
