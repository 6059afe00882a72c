"""Batched decoding over a fixed number of slots with continuous batching (JetStream's prefill / insert / generate).

The decode state is data (a pytree; B slots and capacity C fixed: `generate` compiles once per (B, C) and per
power-of-two count of leading slots it runs on):
    cache          the model cache of batch B: row b is slot b (full layers C positions, sliding layers rings)
    tokens [B]     each slot's last token, at positions[b], not yet in the cache
    positions [B]  -1 = a free slot: a step neither reads nor writes its cache rows (layers.attention)
    keys [B, 2]    each slot's PRNG key (its request's seed); token at position p draws with token_key(key, p)
    temperature [B] (0 = greedy), top_k [B], top_p [B]: each slot's sampling settings

The loop is functions over it (jitted, the state donated):
    prefill  the next prompt chunk of up to R requests in ONE forward of [R, T] tokens (R a row bucket, T the
             chunk's length bucket; rows padded with positions -1, which layers.attention never writes, so
             padding cannot reach a sliding ring), each row written straight into its slot's cache rows; a row
             whose chunk ends its prompt is inserted too (its first token drawn as Engine draws it, its slot's
             token, position, key and settings set), the others stay free (position -1) until their last chunk;
    generate one token for every active slot (one forward of [rows, 1] tokens at per-slot positions, rows the
             power of two covering the busy slots: requests take the lowest free slot);
    free     slot s (its position -1).
A first chunk runs on a fresh cache whose full layers are only T long (it reads nothing older) and fills the
slot's first T positions; a later chunk of a long prompt reads the slot's rows as the earlier chunks left them.
Entries a slot's earlier request left behind are never read: full layers mask every key past the query's
position, and a ring starts a prompt with no visible slot.

The host side that drives these functions (queue, slots, budgets) is batching.Batcher.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mimo_jax import model, sampling
from mimo_jax.config import ModelConfig


def init_state(cfg: ModelConfig, batch: int, capacity: int, dtype, ring_slack: int = 0) -> dict:
    return {"cache": model.init_cache(cfg, batch, capacity, dtype, ring_slack),
            "tokens": jnp.zeros((batch,), jnp.int32), "positions": jnp.full((batch,), -1, jnp.int32),
            "keys": jnp.zeros((batch, 2), jnp.uint32), "temperature": jnp.zeros((batch,), jnp.float32),
            "top_k": jnp.zeros((batch,), jnp.int32), "top_p": jnp.ones((batch,), jnp.float32)}


@functools.partial(jax.jit, donate_argnames="state")
def free(state, slot):
    return {**state, "positions": state["positions"].at[slot].set(-1)}


def draw_rows(logits, keys, temperature, top_k, top_p):
    """logits [R, V] -> argmax where temperature is 0, else a draw from the row's filtered distribution with its own
    key (keys [R, 2]: each its token's, sampling.token_key), as Engine draws a batch-1 token."""
    filtered = sampling.filtered_logits(logits, temperature[:, None], top_k[:, None], top_p[:, None])
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, filtered)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), sampling.greedy(logits))


def first_tokens(logits, keys, temperature, top_k, top_p):
    """draw_rows, with the sort skipped on the device (lax.cond) when no row samples: one compilation for both."""
    return jax.lax.cond(jnp.any(temperature > 0), lambda: draw_rows(logits, keys, temperature, top_k, top_p),
                        lambda: sampling.greedy(logits))


def next_tokens(state, logits, all_greedy: bool):
    """logits [B, V] -> one token per slot: argmax where temperature is 0, else a draw from the slot's filtered
    distribution with its own key for the position the token takes (as Engine's decode draws it, row by row)."""
    if all_greedy:
        return sampling.greedy(logits)
    keys = jax.vmap(sampling.token_key)(state["keys"], state["positions"] + 1)
    return draw_rows(logits, keys, state["temperature"], state["top_k"], state["top_p"])


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


def _full_layers(cfg: ModelConfig):
    """True for the cache leaves of full-attention layers (as long as the capacity), False for sliding rings."""
    short, long = model.cache_shapes(cfg, 1, 16), model.cache_shapes(cfg, 1, 32)
    return jax.tree_util.tree_map(lambda a, b: a.shape != b.shape, short, long)


def _at_slots(leaf, axis: int, slots, length: int | None = None):
    """The index of rows `slots` on `axis` (and of positions [0, length) on the next axis)."""
    index = (slice(None),) * axis
    return index + (slots,) if length is None else index + (slots[:, None], jnp.arange(length)[None])


def last_index(positions):
    """positions [R, T] (-1 = padding) -> each row's last real position in the chunk [R]."""
    return jnp.maximum(jnp.sum(positions >= 0, axis=1) - 1, 0)


def write_rows(state, slots, rows: dict):
    """rows (some of the state's leaves, R rows each) into slots [R]; slot B (out of range) drops its row (padding).
    A cache row fills its slot's first positions (all of a ring; a fresh chunk's full layers are only T long)."""
    def put(path, leaf, row):
        axis = _slots_axis(path, leaf)
        length = row.shape[axis + 1] if path[0].key == "cache" else None
        return leaf.at[_at_slots(leaf, axis, slots, length)].set(row.astype(leaf.dtype), mode="drop")
    return {**state, **jax.tree_util.tree_map_with_path(put, {name: state[name] for name in rows}, rows)}


def prefill_target(params, state, rows: dict, cfg: ModelConfig, fresh: bool, taps: tuple = ()):
    """The rows' chunks (rows["tokens"] [R, T] at rows["positions"] [R, T], -1 = padding) through the target ->
    (hidden [R, T, H], the rows' caches). fresh: first chunks, on an empty cache whose full layers are T long (a
    query reads only this chunk); else the slots' rows (rows["slots"]) as their earlier chunks left them. taps: also
    those layers' outputs (model.forward_hidden), a third output."""
    r, t = rows["tokens"].shape
    if fresh:
        cache = jax.tree_util.tree_map(
            lambda leaf, full: jnp.zeros(leaf.shape[:-4] + (r, min(t, leaf.shape[-3]) if full else leaf.shape[-3])
                                         + leaf.shape[-2:], leaf.dtype), state["cache"], _full_layers(cfg))
    else:
        cache = jax.tree_util.tree_map(
            lambda leaf: leaf.at[_at_slots(leaf, leaf.ndim - 4, rows["slots"])].get(mode="fill", fill_value=0),
            state["cache"])
    return model.forward_hidden(params, rows["tokens"], rows["positions"], cache, cfg, taps=taps)


def inserted(state, rows: dict, first) -> dict:
    """The slot leaves of the rows whose chunk ends their prompt (rows["final"]): first token [R] at the prompt's
    length, key and settings; other rows are dropped (slot B)."""
    slots = jnp.where(rows["final"], rows["slots"], state["positions"].shape[0])
    return write_rows(state, slots, {"tokens": first, "positions": rows["lengths"], "keys": rows["keys"],
                                     "temperature": rows["temperature"], "top_k": rows["top_k"],
                                     "top_p": rows["top_p"]})


@functools.partial(jax.jit, static_argnames=("cfg", "fresh"), donate_argnames="state")
def prefill(params, state, rows: dict, *, cfg: ModelConfig, fresh: bool):
    """One prompt chunk for each of R requests in one forward, written into their slots; the rows that end their
    prompt are inserted (first token keyed token_key(key, prompt length), as Engine's). -> (state, first [R]).

    rows (Batcher._rows): slots [R] (B = a padding row), tokens, positions [R, T], final [R], lengths [R],
    keys [R, 2], temperature, top_k, top_p [R]. One compilation per (R, T, fresh)."""
    hidden, cache = prefill_target(params, state, rows, cfg, fresh)
    last = hidden[jnp.arange(hidden.shape[0]), last_index(rows["positions"])]
    keys = jax.vmap(sampling.token_key)(rows["keys"], rows["lengths"])
    first = first_tokens(model.lm_logits(params, last, cfg), keys, rows["temperature"], rows["top_k"], rows["top_p"])
    state = write_rows(state, rows["slots"], {"cache": cache})
    return inserted(state, rows, first), first


@functools.partial(jax.jit, static_argnames=("cfg", "all_greedy", "rows"), donate_argnames="state")
def generate(params, state, *, cfg: ModelConfig, all_greedy: bool, rows: int | None = None):
    """One token for every active slot -> (state, tokens [B] (0 in free slots)).

    Static: all_greedy (no slot samples: the step compiles without the sort); rows (the step runs on slots
    [0, rows) only, every active slot being among them: a few busy slots do not pay for the whole batch).
    One compilation per (rows bucket, all_greedy)."""
    batch = state["positions"].shape[0]
    rows = min(rows or batch, batch)
    # the cache stays whole: layers.attention reads and writes its first `rows` slots in place (slicing it out and
    # back copied every layer's cache twice per step: 41% of a 32-of-64-slot mid_mimo step on an H200)
    whole = {name: leaf for name, leaf in state.items() if name != "cache"}
    part = _first_slots(whole, rows) if rows < batch else whole
    positions = part["positions"]
    hidden, cache = model.forward_hidden(params, part["tokens"][:, None], positions[:, None], state["cache"], cfg)
    logits = model.lm_logits(params, hidden[:, 0], cfg)
    active = positions >= 0
    tokens = jnp.where(active, next_tokens(part, logits, all_greedy), 0)
    part = {**part, "tokens": tokens, "positions": jnp.where(active, positions + 1, -1)}
    if rows < batch:
        part = _put_first_slots(whole, part)
        tokens = jnp.pad(tokens, (0, batch - rows))
    return {**part, "cache": cache}, tokens
