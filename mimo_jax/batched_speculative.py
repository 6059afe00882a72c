"""Batched speculative decoding: every active slot drafts k tokens, ONE target forward verifies the drafts of all
slots, and each slot accepts its own prefix, in one jitted step (speculative.step over B slots; batching.Batcher
drives it when its engine, or its speculative_k option, asks for speculation).

The state is batch_state's (cache with sliding rings of ring_slack k + 1, tokens, positions, keys, temperature, top_k,
top_p; a slot at position -1 is free) plus, per slot, the drafter's part of speculative.py's batch-1 state:
    mtp_cache        the drafter's own state (MTP: ring caches; block drafter: its context ring), each leaf
                     [B, *its batch-1 shape] ({} for a drafter without state)
    draft [B], draft_logits [B,V], draft_hidden [B,H]   slot b's first guess d_1 for P_b + 1, its logits q_1 and
                     the MTP hidden it came from

One step, slot b at position P_b, with p_bi / q_bi the target's / drafter's distributions for P_b + i:
    1. draft   the Drafter's own batch-1 propose, vmapped over the slots: each slot drafts d_b1..d_bk from its own
               position, caches, key and sampling settings (any speculative.Drafter runs batched as it is);
    2. verify  the target over tokens [B, k+1] = [token_b, d_b1, ..., d_bk] at positions P_b..P_b+k (per-row
               positions, layers.attention; a free slot's row is -1: it neither reads nor writes) -> p_b1..p_b(k+1);
    3. accept  speculative.accept row by row: a greedy slot (temperature 0) keeps d_bi while d_bi = argmax p_bi,
               a sampled one with probability min(1, p_bi(d_bi) / q_bi(d_bi)); n_b = the accepted prefix's length;
               the bonus is argmax p_b(n+1), or a draw from norm(max(0, p_b(n+1) - q_b(n+1)));
    4. emit    emitted [B, k+1] = d_b1..d_bn, bonus_b, zeros after; n [B] (the host reads both once per step);
    5. commit  nothing to roll back, row by row as in speculative.py (full-attention entries past P_b + n_b are
               masked for every later query; the rings' k + 1 spare slots keep what later windows see);
    6. refresh the Drafter's refresh, vmapped: slot b's next d_1; P_b += n_b + 1.
Each slot keys its draws as speculative.step does (token_key(key_b, P_b + 1) split three ways) and is prefilled as
Engine's speculative stream is (`prefill`: batch_state.prefill over R requests at once plus the drafter's pass over
their chunks, row by row; the first token and d_1 split token_key(key_b, prompt length)): a slot's tokens,
sampled ones included, are those its batch-1 speculative generation gives, so sampling is exactly lossless per slot
and greedy output is plain greedy output.

A free slot's draft chain may write garbage into its own drafter state (MTP positions -1 + i): harmless, a
request's first chunk replaces every drafter row of its slot (and its last chunk d_1 and its logits and hidden).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mimo_jax import batch_state, model, mtp, sampling, speculative
from mimo_jax.block_drafter import features
from mimo_jax.config import ModelConfig


def _drafter_init(drafter: speculative.Drafter):
    """The drafter's batch-1 state maker init(params, cfg, k, dtype), or None for a drafter without state."""
    init = getattr(drafter, "init", None)
    if init is None and drafter.uses_mtp:  # a Drafter without the init hook: the MTP layers' rings
        return lambda params, cfg, k, dtype: mtp.init_cache(cfg, 1, dtype, k + 1)
    return init


def init_state(params, cfg: ModelConfig, batch: int, capacity: int, dtype, k: int,
               drafter: speculative.Drafter) -> dict:
    state = batch_state.init_state(cfg, batch, capacity, dtype, ring_slack=k + 1)
    init = _drafter_init(drafter)
    one = init(params, cfg, k, dtype) if init is not None else {}
    return {**state, "mtp_cache": jax.tree_util.tree_map(lambda a: jnp.zeros((batch,) + a.shape, a.dtype), one),
            "draft": jnp.zeros((batch,), jnp.int32), "draft_logits": jnp.zeros((batch, cfg.vocab_size), jnp.float32),
            "draft_hidden": jnp.zeros((batch, cfg.hidden_size), dtype)}


# ---- each slot as a batch-1 speculative state, for the drafter's functions under vmap ----

def _as_rows(cache):
    """Cache leaves [*stack, B, S, heads, dim] -> [*stack, B, 1, S, heads, dim] and the slot axis of each: under
    vmap over that axis every slot sees a batch-1 cache (reshapes only, no copy)."""
    return (jax.tree_util.tree_map(lambda a: jnp.expand_dims(a, a.ndim - 3), cache),
            jax.tree_util.tree_map(lambda a: a.ndim - 4, cache))


def _per_slot(fn, state, *rows):
    """fn(view, *row) for every slot, view = the slot's batch-1 state as speculative.step's drafter sees it
    (cache, mtp_cache, token [1], position, draft [1], draft_logits [1,V], draft_hidden [1,H]); rows: arrays with
    the slots first. fn returns (outputs with a batch axis of 1 first..., the drafter's batch-1 state)."""
    cache, cache_axes = _as_rows(state["cache"])

    def one(cache, mtp_cache, token, position, draft, draft_logits, draft_hidden, *row):
        view = {"cache": cache, "mtp_cache": mtp_cache, "token": token[None], "position": position,
                "draft": draft[None], "draft_logits": draft_logits[None], "draft_hidden": draft_hidden[None]}
        *out, new_mtp_cache = fn(view, *row)
        return tuple(o[0] for o in out), new_mtp_cache

    out, new_mtp_cache = jax.vmap(one, in_axes=(cache_axes,) + (0,) * (6 + len(rows)))(
        cache, state["mtp_cache"], state["tokens"], state["positions"], state["draft"], state["draft_logits"],
        state["draft_hidden"], *rows)
    return (*out, new_mtp_cache)


def _accept(drafts, q_logits, p_logits, keys, settings, is_greedy: bool):
    """speculative.accept for every row -> (n [B], bonus [B])."""
    def one(d, q, p, key, temperature, top_k, top_p):
        n, bonus = speculative.accept(d[None], q[None], p[None], key, (temperature, top_k, top_p), is_greedy)
        return n, bonus[0]
    return jax.vmap(one)(drafts, q_logits, p_logits, keys, *settings)


# ---- the step ----

@functools.partial(jax.jit, static_argnames=("cfg", "k", "drafter", "all_greedy", "rows"), donate_argnames="state")
def generate(params, state, *, cfg: ModelConfig, k: int, drafter: speculative.Drafter, all_greedy: bool,
             rows: int | None = None):
    """One speculative step for every active slot -> (state, emitted [B, k+1] (first n_b + 1 valid), n [B]).

    Static: all_greedy (no slot samples: drafts drawn by argmax, no sort); rows (only slots [0, rows) run, every
    active slot among them). One compilation per (rows bucket, all_greedy)."""
    batch = state["positions"].shape[0]
    whole, rows = state, min(rows or batch, batch)
    if rows < batch:
        state = batch_state._first_slots(state, rows)
    position = state["positions"]
    active = position >= 0
    settings = (state["temperature"], state["top_k"], state["top_p"])
    keys = jax.vmap(lambda key, p: jax.random.split(sampling.token_key(key, p + 1), 3))(state["keys"], position)
    key_d, key_a, key_r = keys[:, 0], keys[:, 1], keys[:, 2]

    # 1. draft (a sampling batch draws every slot's drafts from its filtered q; a greedy slot's draws are then
    #    near-argmax, which changes how many it accepts at most, never its tokens: it accepts by argmax)
    drafts, q_logits, mtp_cache = _per_slot(
        lambda view, key, *s: drafter.propose(params, view, key, s, cfg, k, all_greedy), state, key_d, *settings)
    # 2. verify: one target forward over every slot's token and drafts
    tokens = jnp.concatenate([state["tokens"][:, None], drafts], axis=1)
    positions = jnp.where(active[:, None], position[:, None] + jnp.arange(k + 1, dtype=jnp.int32), -1)
    normed, feats, cache = speculative.verify_forward(params, tokens, positions, state["cache"], cfg, drafter.taps)
    p_logits = model.head(params, normed, cfg)
    # 3. accept, per row
    n, bonus = _accept(drafts, q_logits, p_logits, key_a, settings, True)
    if not all_greedy:
        n_sampled, bonus_sampled = _accept(drafts, q_logits, p_logits, key_a, settings, False)
        sampled = state["temperature"] > 0
        n, bonus = jnp.where(sampled, n_sampled, n), jnp.where(sampled, bonus_sampled, bonus)
    n = jnp.where(active, n, 0).astype(jnp.int32)
    # 4. emit
    slots = jnp.arange(k + 1)[None]
    emitted = jnp.where(slots < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1), 0)
    emitted = jnp.where(slots == n[:, None], bonus[:, None], emitted)
    emitted = jnp.where(active[:, None], emitted, 0).astype(jnp.int32)
    # 6. refresh, from the state after verify (as speculative.step)
    draft, draft_logits, draft_hidden, mtp_cache = _per_slot(
        lambda view, *row: drafter.refresh(params, view, row[0][None], row[1][None], row[2], row[3], row[4:], cfg,
                                           all_greedy),
        {**state, "cache": cache, "mtp_cache": mtp_cache}, feats, emitted, n, key_r, *settings)
    state = {**state, "cache": cache,
             "tokens": jnp.where(active, bonus, 0).astype(jnp.int32),
             "positions": jnp.where(active, position + n + 1, -1).astype(jnp.int32),
             "draft": draft.astype(jnp.int32), "draft_logits": draft_logits.astype(jnp.float32),
             "draft_hidden": draft_hidden.astype(state["draft_hidden"].dtype),
             "mtp_cache": jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), mtp_cache,
                                                 state["mtp_cache"])}
    if rows < batch:
        state = batch_state._put_first_slots(whole, state)
        emitted, n = jnp.pad(emitted, ((0, batch - rows), (0, 0))), jnp.pad(n, (0, batch - rows))
    return state, emitted, n


# ---- prompts: batch_state.prefill with the drafter's pass ----

@functools.partial(jax.jit, static_argnames=("cfg", "fresh", "k", "drafter"), donate_argnames="state")
def prefill(params, state, rows: dict, *, cfg: ModelConfig, fresh: bool, k: int, drafter: speculative.Drafter):
    """batch_state.prefill for this state, as Engine's speculative stream prefills a prompt, row by row: the target
    over the chunk (its normed hidden states kept), then the drafter's pass over the same positions (hidden at t,
    token at t+1: rows["following"], with the first new token after a prompt's last position; MTP:
    speculative.mtp_chain, whose output at the last position gives d_1; other drafters: their prefill hook). The
    first token and d_1 split token_key(key, prompt length). A fresh row starts from the drafter's init state, a
    later chunk from the slot's. params: the step's (a block drafter's weights under "drafter").
    -> (state, first [R])."""
    batch, (r, t) = state["positions"].shape[0], rows["tokens"].shape
    out = batch_state.prefill_target(params, state, rows, cfg, fresh, drafter.taps)
    cache, normed = out[1], model.final_norm(params, out[0], cfg)
    feats = features(normed, out[2], cfg.rms_norm_eps) if drafter.taps else normed  # what the drafter reads
    last = batch_state.last_index(rows["positions"])
    settings = (rows["temperature"], rows["top_k"], rows["top_p"])
    keys = jax.vmap(lambda key, n: jax.random.split(sampling.token_key(key, n)))(rows["keys"], rows["lengths"])
    first = batch_state.first_tokens(model.head(params, normed[jnp.arange(r), last], cfg), keys[:, 0], *settings)
    state = batch_state.write_rows(state, rows["slots"], {"cache": cache})
    extra = {"draft": jnp.zeros((r,), jnp.int32), "draft_logits": jnp.zeros((r, cfg.vocab_size), jnp.float32),
             "draft_hidden": jnp.zeros((r, cfg.hidden_size), state["draft_hidden"].dtype)}
    init = _drafter_init(drafter)
    if init is not None:
        if fresh:
            one = init(params, cfg, k, state["draft_hidden"].dtype)
            dstate = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (r,) + a.shape), one)
        else:
            dstate = jax.tree_util.tree_map(lambda a: a.at[rows["slots"]].get(mode="fill", fill_value=0),
                                            state["mtp_cache"])
        ends = (jnp.arange(t) == last[:, None]) & rows["final"][:, None]
        following = jnp.where(ends, first[:, None], rows["following"])
        if drafter.uses_mtp:  # d_1 from layer 0's output at the last position (its logits only there)
            out, dstate = jax.vmap(lambda h, nxt, pos, d: speculative.mtp_chain(params, h[None], nxt[None], pos, d,
                                                                                 cfg))(
                normed, following, rows["positions"], dstate)
            out = out[jnp.arange(r), 0, last]
            logits = mtp.draft_logits(params, out, cfg)
            extra = {"draft": batch_state.first_tokens(logits, keys[:, 1], *settings), "draft_logits": logits,
                     "draft_hidden": out}
        else:
            def hook(is_greedy):
                return jax.vmap(lambda d, h, nxt, pos, key, *s: drafter.prefill(
                    params, d, h[None], nxt[None], pos, key, s, cfg, is_greedy))(
                    dstate, feats, following, rows["positions"], keys[:, 1], *settings)
            greedy = hook(True)
            sampled = settings[0] > 0
            dstate = jax.lax.cond(jnp.any(sampled), lambda: jax.tree_util.tree_map(
                lambda a, b: jnp.where(sampled.reshape((r,) + (1,) * (a.ndim - 1)), a, b), hook(False), greedy),
                lambda: greedy)
        state = batch_state.write_rows(state, rows["slots"], {"mtp_cache": dstate})
    final = jnp.where(rows["final"], rows["slots"], batch)
    return batch_state.write_rows(batch_state.inserted(state, rows, first), final, extra), first
