"""Speculative decoding: draft k tokens, verify them with ONE target forward, all inside one jitted step.

State (a pytree; batch 1 because positions are shared by the batch):
    cache        target KV cache, holding positions < P           (SWA rings sized window + k + 1)
    mtp_cache    the drafter's own state: MTP {"kv": ring caches, "carry": [n_mtp,1,H]}; block drafter: the
                 ring of context hidden states (block_drafter.py)
    token [1]    the last emitted token, at position P, not yet in the target cache
    position     P (int32 scalar)
    draft [1], draft_logits [1,V], draft_hidden [1,H]
                 the drafter's first guess d_1 for position P+1, the logits it was drawn from (q_1), and the MTP
                 hidden it came from (at position P-1)

One step, with p_i the target's distribution for position P+i and q_i the drafter's (both after temperature,
top-k, top-p):
    1. draft    MTP: d_1 from the state, d_2..d_k by chaining MTP layers (depth i uses layer i mod n_mtp);
                block: d_1..d_k from one forward of the block drafter;
    2. verify   target([token, d_1, ..., d_k]) at positions P..P+k  -> p_1..p_{k+1}   (one forward);
    3. accept   greedy: d_i is accepted while d_i == argmax p_i.
                sampled: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (u_i q_i(d_i) < p_i(d_i));
                n = length of the accepted prefix = sum(cumprod(accepted)), no host round trip;
                bonus  = argmax p_{n+1} (greedy), or a draw from norm(max(0, p_{n+1} - q_{n+1})) after a rejection,
                         from p_{k+1} when all k were accepted (q_{k+1} = 0). This keeps the output distribution
                         exactly the target's (Leviathan et al. 2023; Chen et al. 2023).
    4. emit     d_1..d_n, bonus (n + 1 tokens; the host reads them and n once per step);
    5. commit   the verify pass already wrote positions P..P+k; full-attention entries past P+n are stale but
                masked (a query never sees slots beyond its position), and the SWA rings have k+1 spare slots,
                so the rejected positions overwrote nothing still in any later window: nothing to roll back.
    6. refresh  (the verify pass hands the drafter the normed last-layer hidden states, or, for a drafter that
                names target layers in Drafter.taps, block_drafter.features of those layers' outputs and them)
                MTP: layer 0 re-reads positions P..P+n with the target's hidden states and the emitted tokens
                (filling its cache with true inputs) and its output at P+n gives the next step's d_1; each deeper
                layer j re-reads them too, fed layer j-1's true outputs one position back (the inputs it sees at
                its depth of the chain), so no cache keeps the inputs of rejected drafts.
                block: the hidden states of P..P+n join its context ring.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mimo_jax import model, mtp, sampling
from mimo_jax.config import ModelConfig


def _draw(key, logits, settings, is_greedy):
    return sampling.next_token(key, logits, *settings, is_greedy)


# ---- drafters: propose(params, state, key, settings, cfg, k, is_greedy) -> (drafts [1,k], q logits [1,k,V],
#      mtp_cache); refresh(...) -> (draft, draft_logits, draft_hidden, mtp_cache) for the next step ----

def _mtp_propose(params, state, key, settings, cfg, k, is_greedy):
    drafts, qs = [state["draft"]], [state["draft_logits"]]
    hidden, cache = state["draft_hidden"][:, None], state["mtp_cache"]["kv"]
    for i in range(1, k):
        position = state["position"] - 1 + i
        hidden, logits, cache = mtp.mtp_layer(params, i % cfg.num_mtp_layers, hidden, drafts[-1][:, None],
                                              position[None], cache, cfg)
        qs.append(logits[:, 0])
        drafts.append(_draw(jax.random.fold_in(key, i), logits[:, 0], settings, is_greedy))
    return jnp.stack(drafts, axis=1), jnp.stack(qs, axis=1), {**state["mtp_cache"], "kv": cache}


def mtp_chain(params, normed, tokens, positions, mtp_state, cfg):
    """Every MTP layer over the same positions t with true inputs: layer 0 reads the target's h_t, layer j > 0
    reads layer j-1's output at t-1 (what it reads at depth j of a chain), with carry[j-1] (layer j-1's output
    just before this chunk) for the first position; tokens are the ones at t+1. -> (layer 0's outputs
    [B,T,H], the state with every cache written and carry[j] = layer j's output at the last real position).
    No logits: the callers need layer 0's at one position only (mtp.draft_logits of that row)."""
    last = jnp.sum(positions >= 0) - 1
    kv, carry, outs = mtp_state["kv"], mtp_state["carry"], []
    hidden = normed
    for j in range(cfg.num_mtp_layers):
        if j:
            hidden = jnp.concatenate([carry[j - 1][:, None].astype(outs[-1].dtype), outs[-1][:, :-1]], axis=1)
        h, kv = mtp.mtp_block(params, j, hidden, tokens, positions, kv, cfg)
        outs.append(h)
    carry = jnp.stack([o[:, last] for o in outs]).astype(carry.dtype)
    return outs[0], {"kv": kv, "carry": carry}


def _mtp_refresh(params, state, normed, emitted, n_acc, key, settings, cfg, is_greedy):
    k1 = emitted.shape[1]
    positions = jnp.where(jnp.arange(k1) <= n_acc, state["position"] + jnp.arange(k1), -1).astype(jnp.int32)
    hidden, mtp_state = mtp_chain(params, normed, emitted, positions, state["mtp_cache"], cfg)
    hidden = hidden[:, n_acc]
    logits = mtp.draft_logits(params, hidden, cfg)
    return _draw(key, logits, settings, is_greedy), logits, hidden, mtp_state


def mtp_init(params, cfg, k, dtype):
    return {"kv": mtp.init_cache(cfg, 1, dtype, k + 1), "carry": jnp.zeros((cfg.num_mtp_layers, 1, cfg.hidden_size),
                                                                            dtype)}


def _oracle_propose(params, state, key, settings, cfg, k, is_greedy):
    """The target's own greedy continuation (computed on a throwaway copy of the cache): always right under
    greedy, so a step accepts all k; benchmarks use it to time a step at full acceptance. q is one-hot."""
    cache, token, drafts = state["cache"], state["token"], []
    for i in range(k):
        hidden, cache = model.forward_hidden(params, token[:, None], (state["position"] + i)[None], cache, cfg)
        token = jnp.argmax(model.lm_logits(params, hidden[:, 0], cfg), axis=-1).astype(jnp.int32)
        drafts.append(token)
    drafts = jnp.stack(drafts, axis=1)
    return drafts, one_hot_logits(drafts, cfg.vocab_size), state["mtp_cache"]


def one_hot_logits(drafts, vocab_size):
    """q for a deterministic drafter: log of a one-hot distribution on each draft."""
    return jnp.where(jax.nn.one_hot(drafts, vocab_size) > 0, 0.0, -jnp.inf)


def _keep_refresh(params, state, normed, emitted, n_acc, key, settings, cfg, is_greedy):
    return state["draft"], state["draft_logits"], state["draft_hidden"], state["mtp_cache"]


@dataclasses.dataclass(frozen=True)
class Drafter:
    """A static argument of the step (hashed by its functions): Engine(drafter=...) takes one of DRAFTERS by
    name, "block" / a block drafter file (block_drafter.py), or any Drafter (tests build theirs in
    tests/drafters.py).

    init(params, cfg, k, dtype) -> the drafter's state (state["mtp_cache"]) before the prompt; prefill(params,
    dstate, normed [1,T,H], next_tokens [1,T], positions [T], key, settings, cfg, is_greedy) -> dstate after a
    prompt chunk. None: no state (the MTP drafter's own prefill is mtp_chunk: it also makes d_1).

    taps: target layers whose outputs the drafter conditions on besides the last one (model.forward_hidden's
    taps): refresh and prefill then get block_drafter.features(normed, outputs) [.., F*H] where `normed` stands."""
    name: str
    propose: Callable
    refresh: Callable
    uses_mtp: bool
    init: Callable | None = None
    prefill: Callable | None = None
    taps: tuple = ()


def verify_forward(params, tokens, positions, cache, cfg: ModelConfig, taps: tuple = ()):
    """The target over tokens -> (normed last-layer hidden [B,T,H], the drafter's features (normed itself without
    taps, else block_drafter.features with the tapped layers' outputs), cache)."""
    from mimo_jax.block_drafter import features

    out = model.forward_hidden(params, tokens, positions, cache, cfg, taps=taps)
    normed = model.final_norm(params, out[0], cfg)
    return normed, (features(normed, out[2], cfg.rms_norm_eps) if taps else normed), out[1]


MTP = Drafter("mtp", _mtp_propose, _mtp_refresh, True, init=mtp_init)
ORACLE = Drafter("oracle", _oracle_propose, _keep_refresh, False)
DRAFTERS = {d.name: d for d in (MTP, ORACLE)}


def resolve_drafter(drafter, cfg: ModelConfig, params, dtype):
    """Engine(drafter=...) -> (Drafter, block drafter weights or None); InputError for a bad choice."""
    from pathlib import Path

    from mimo_jax import block_drafter
    from mimo_jax.errors import InputError

    if isinstance(drafter, Drafter):
        return drafter, None
    drafter = str(drafter)
    if drafter == "auto":
        if "mtp" in params:
            return MTP, None
        if not block_drafter.SHIPPED.is_file() or not block_drafter.fits(block_drafter.SHIPPED, cfg):
            raise InputError("speculative decoding needs a drafter: this model has no MTP layers and the shipped "
                             "block drafter was trained for another model (train one: python -m "
                             "mimo_jax.train_drafter, then drafter=PATH / --drafter PATH)")
        drafter = "block"
    if drafter == "mtp" or (drafter in DRAFTERS and drafter != "block"):
        if DRAFTERS[drafter].uses_mtp and "mtp" not in params:
            raise InputError("speculative decoding with the MTP drafter needs MTP layers; this model has none "
                             "(use a block drafter: --drafter block or a file from mimo_jax.train_drafter)")
        return DRAFTERS[drafter], None
    path = block_drafter.SHIPPED if drafter == "block" else Path(drafter)
    if drafter != "block" and path.suffix != ".safetensors" and not path.exists():
        raise InputError(f"unknown drafter {drafter!r} (choose mtp, block, or a block drafter .safetensors file; "
                         f"also: {', '.join(DRAFTERS)})")
    d, weights, _ = block_drafter.load(path, dtype, target=cfg)
    # the draft vocabulary's lm_head rows, gathered once here rather than in every step (for a 152K x 4096 head
    # and 32K draft tokens the per-step gather copied 268 MB)
    weights["head"] = block_drafter.head_rows(params, cfg, weights["vocab"]).astype(weights["w"]["fc"].dtype)
    weights["w"] = block_drafter.unstack_layers(weights["w"])  # one buffer per layer weight: no per-step slices
    return block_drafter.drafter_for(d), weights


# ---- the step ----

def accept(drafts, q_logits, p_logits, key, settings, is_greedy: bool):
    """drafts [1,k], q_logits [1,k,V], p_logits [1,k+1,V] -> (n accepted, bonus token [1])."""
    k = drafts.shape[1]
    if is_greedy:
        target = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)  # [1, k+1]
        ok = drafts[0] == target[0, :k]
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        return n, target[:, n]
    p = jax.nn.softmax(sampling.filtered_logits(p_logits, *settings), axis=-1)[0]  # [k+1, V]
    q = jax.nn.softmax(sampling.filtered_logits(q_logits, *settings), axis=-1)[0]  # [k, V]
    p_d = jnp.take_along_axis(p[:k], drafts[0][:, None], axis=-1)[:, 0]
    q_d = jnp.take_along_axis(q, drafts[0][:, None], axis=-1)[:, 0]
    key_u, key_b = jax.random.split(key)
    ok = jax.random.uniform(key_u, (k,)) * q_d < p_d
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    residual = jnp.maximum(p - jnp.concatenate([q, jnp.zeros_like(q[:1])]), 0.0)[n]
    residual = jnp.where(jnp.sum(residual) > 0, residual, p[n])
    bonus = jax.random.categorical(key_b, jnp.log(residual)).astype(jnp.int32)
    return n, bonus[None]


def _step(params, state, key, temperature, top_k, top_p, *, cfg: ModelConfig, k: int, drafter: Drafter,
          is_greedy: bool):
    """One speculative step -> (emitted [1, k+1] (first n+1 valid), n accepted drafts, new state)."""
    settings = (temperature, top_k, top_p)
    position = state["position"]
    key_d, key_a, key_r = jax.random.split(sampling.token_key(key, position + 1), 3)  # its first token: P + 1
    with jax.named_scope("drafter"):  # the profiles' groups (benchmarks/profile_step.py)
        drafts, q_logits, mtp_cache = drafter.propose(params, state, key_d, settings, cfg, k, is_greedy)
    tokens = jnp.concatenate([state["token"][:, None], drafts], axis=1)
    normed, feats, cache = verify_forward(params, tokens, position + jnp.arange(k + 1, dtype=jnp.int32),
                                          state["cache"], cfg, drafter.taps)
    logits = model.head(params, normed, cfg)
    with jax.named_scope("sampling"):
        n, bonus = accept(drafts, q_logits, logits, key_a, settings, is_greedy)
    slots = jnp.arange(k + 1)
    emitted = jnp.where(slots < n, jnp.concatenate([drafts, drafts[:, :1]], axis=1), 0)
    emitted = jnp.where(slots == n, bonus[:, None], emitted).astype(jnp.int32)
    state = {**state, "cache": cache, "mtp_cache": mtp_cache}
    with jax.named_scope("drafter"):
        draft, draft_logits, draft_hidden, mtp_cache = drafter.refresh(params, state, feats, emitted, n, key_r,
                                                                       settings, cfg, is_greedy)
    new_state = {**state, "cache": cache, "mtp_cache": mtp_cache, "token": bonus, "position": position + n + 1,
                 "draft": draft, "draft_logits": draft_logits, "draft_hidden": draft_hidden}
    return emitted, n, new_state


def _steps(params, state, key, temperature, top_k, top_p, *, cfg: ModelConfig, k: int, drafter: Drafter,
           is_greedy: bool, steps: int):
    """`steps` speculative steps in one dispatch (a scan over `step`) -> (emitted [steps, 1, k+1], n [steps],
    new state): the host reads a chunk of steps at once."""
    def one(state, _):
        emitted, n, state = _step(params, state, key, temperature, top_k, top_p, cfg=cfg, k=k, drafter=drafter,
                                  is_greedy=is_greedy)
        return state, (emitted, n)

    state, (emitted, n) = jax.lax.scan(one, state, None, length=steps)
    return emitted, n, state


def _jitted(**options):
    """(step, steps) jitted with the given jax.jit options (the state donated)."""
    statics = ("cfg", "k", "drafter", "is_greedy")
    return (jax.jit(_step, static_argnames=statics, donate_argnames="state", **options),
            jax.jit(_steps, static_argnames=statics + ("steps",), donate_argnames="state", **options))


step, steps = _jitted()

# XLA:CPU sends every dot of more than one row to YNNPACK, which at 2-9 rows reads the weights ~2-3x slower than
# the one-row pass; with it off, Eigen runs a dot of 8+ rows at ~2.1x a one-row pass (this 2-core CPU, 30 layers
# of SmolLM2's f32 weights). So on a CPU, when k >= CPU_EIGEN_MIN_K (every dot of the step then has >= 8 rows: the
# verify's k + 1, the block drafter's k slots), the step is compiled with YNNPACK off. Measured end to end
# (BENCHMARKS.md, sessions 15-16; block drafter k = 8, 12 prompts x 256, through the Engine): code 1.36x -> 1.66x
# plain, chat 0.85x -> 1.03x. Below 8 rows Eigen is slower than YNNPACK, so smaller k keep the default.
CPU_EIGEN_MIN_K = 8
CPU_EIGEN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_step_eigen, _steps_eigen = _jitted(compiler_options=CPU_EIGEN_OPTIONS)


@functools.cache
def _cpu_takes_eigen_options() -> bool:
    """Whether this jaxlib's XLA:CPU knows the option (an unknown one fails the compile)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_EIGEN_OPTIONS).lower(jnp.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an older/newer XLA without the option: keep the default step
        return False
    return True


def step_functions(k: int, backend: str | None = None):
    """(step, steps) for a k-draft step on `backend` (default: jax's default backend): the Eigen-dot compile on a
    CPU when k >= CPU_EIGEN_MIN_K and XLA:CPU has the option, else the default compile."""
    backend = backend or jax.default_backend()
    if backend == "cpu" and k >= CPU_EIGEN_MIN_K and _cpu_takes_eigen_options():
        return _step_eigen, _steps_eigen
    return step, steps


# ---- the state after the prompt ----

@functools.partial(jax.jit, static_argnames=("cfg", "taps"), donate_argnames="cache")
def target_chunk(params, tokens, positions, cache, cfg: ModelConfig, taps: tuple = ()):
    """A prompt chunk through the target -> (normed hidden [1,T,H], logits of the last real token, cache). taps:
    the drafter's (Drafter.taps): the first output is then its features (verify_forward)."""
    normed, feats, cache = verify_forward(params, tokens, positions, cache, cfg, taps)
    last = jnp.sum(positions >= 0) - 1
    return feats, model.head(params, normed[:, last], cfg), cache


@functools.partial(jax.jit, static_argnames=("cfg", "is_greedy"), donate_argnames="mtp_cache")
def mtp_chunk(params, normed, next_tokens, positions, mtp_cache, key, temperature, top_k, top_p, *,
              cfg: ModelConfig, is_greedy: bool):
    """The MTP layers over a prompt chunk (hidden at t, token at t+1; mtp_chain) -> (d_1, its logits, its
    hidden, the MTP state). key: d_1's own (only the last chunk's draw is kept)."""
    hidden, mtp_cache = mtp_chain(params, normed, next_tokens, positions, mtp_cache, cfg)
    hidden = hidden[:, jnp.sum(positions >= 0) - 1]
    logits = mtp.draft_logits(params, hidden, cfg)
    draft = _draw(key, logits, (temperature, top_k, top_p), is_greedy)
    return draft, logits, hidden, mtp_cache


@functools.partial(jax.jit, static_argnames=("cfg", "drafter", "is_greedy"), donate_argnames="dstate")
def drafter_chunk(params, normed, next_tokens, positions, dstate, key, temperature, top_k, top_p, *,
                  cfg: ModelConfig, drafter: Drafter, is_greedy: bool):
    """A drafter's own prefill hook over a prompt chunk -> its state."""
    return drafter.prefill(params, dstate, normed, next_tokens, positions, key, (temperature, top_k, top_p), cfg,
                           is_greedy)
