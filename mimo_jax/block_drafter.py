"""A block drafter (DFlash-style): all k draft tokens from ONE small forward pass.

At a speculative step the target has verified every position < P and the token at P is known (not yet in the
target cache). The drafter reads a block of B >= k slots at positions P .. P+B-1:

    slot 0      = embed(token_P)            (the target's own embedding table, frozen)
    slots 1..   = a learned [MASK] vector
    context     = c_t = norm(fc(f_t)) for the last `window` positions t < P, f_t the target's features at t:
                  the outputs of the layers named in `target_layers` (each RMS-normalised, no weight) joined with
                  the normed last-layer hidden state (EAGLE-3 / DFlash fuse a low, a middle and a high layer;
                  target_layers = () is the last layer alone); the verify pass computes them anyway

and runs `num_layers` pre-norm blocks whose attention keys/values are [context ; block] (the context features
enter every layer's K/V, as DFlash injects them), bidirectional within the block, RoPE at absolute positions.
Slot j's output, through the target's lm_head restricted to a draft vocabulary of the most frequent target
tokens (EAGLE-3's reduced draft vocab: the head is most of a small drafter's cost), predicts the token at
P+j+1: d_1 .. d_k in one pass. q (for lossless sampling) is that distribution over the full vocabulary with
-inf outside the draft vocabulary.

The intermediate layers come from `model.forward_hidden(..., taps=target_layers)` in the verify pass and the
prompt pass (speculative.step / target_chunk); the drafter's Drafter carries the layer list (Drafter.taps).

State (the speculative state's "mtp_cache" slot, the drafter's own): a ring of the last `window` target feature
vectors [F*H] (F = len(target_layers) + 1) and their positions (-1 = empty). The weights travel in the target params under "drafter"
(params = {**target_params, "drafter": {"w": ..., "vocab": ...}}), so the jitted step takes them as data.

Files: safetensors, the tensors flattened by path ("w.layers.wq", "vocab"), the BlockConfig and the target's
shape (hidden size, vocab, layers) in its metadata; `load` checks them against the model it is used with.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import drafter_files, fp8, model, sampling
from mimo_jax.config import ModelConfig
from mimo_jax.errors import InputError
from mimo_jax.layers import attend, rms_norm, rope, swiglu

SHIPPED = Path(__file__).resolve().parent / "drafters" / "smollm2_135m_block.safetensors"


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    hidden_size: int  # the target's (the drafter reuses its embedding and lm_head)
    target_vocab: int
    num_layers: int = 1
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1536
    block_size: int = 8  # slots trained; a step with k > block_size runs k slots
    window: int = 128  # context positions attended
    draft_vocab: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    target_layers: tuple = ()  # target layers whose outputs join the last layer's as features (files before: ())

    def __post_init__(self):
        object.__setattr__(self, "target_layers", tuple(int(i) for i in self.target_layers))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2 or min(self.num_layers, self.block_size, self.window, self.draft_vocab) < 1:
            raise ValueError(f"bad block drafter config {self}")
        if any(i < 0 for i in self.target_layers) or len(set(self.target_layers)) != len(self.target_layers):
            raise ValueError(f"target_layers {self.target_layers}: distinct layer indices >= 0")
        if self.draft_vocab > self.target_vocab:
            raise ValueError(f"draft_vocab {self.draft_vocab} > the target's vocab {self.target_vocab}")

    @classmethod
    def for_target(cls, cfg: ModelConfig, **kw) -> "BlockConfig":
        kw.setdefault("draft_vocab", min(8192, cfg.vocab_size))
        return cls(hidden_size=cfg.hidden_size, target_vocab=cfg.vocab_size, **kw)

    @property
    def feature_size(self) -> int:
        return (len(self.target_layers) + 1) * self.hidden_size


def default_layers(num_layers: int) -> tuple:
    """A low, a middle and a high layer (EAGLE-3's choice; the last layer's output is always a feature)."""
    return tuple(sorted({1, num_layers // 2, max(num_layers - 4, 0)} - {num_layers - 1}))


def features(normed, tapped, eps: float):
    """The drafter's context features: each tapped layer output [..., H] RMS-normalised (no weight: the residual
    stream's scale grows with depth), then the normed last layer -> [..., F*H]. No taps: `normed` itself."""
    if not tapped:
        return normed
    return jnp.concatenate([rms_norm(t, jnp.ones((), t.dtype), eps) for t in tapped] + [normed], axis=-1)


def param_shapes(d: BlockConfig) -> dict:
    h, nh, nkv, hd, i = d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, d.intermediate_size
    layer = {"attn_norm": (h,), "wq": (h, nh * hd), "wk": (h, nkv * hd), "wv": (h, nkv * hd), "wo": (nh * hd, h),
             "mlp_norm": (h,), "w_gate": (h, i), "w_up": (h, i), "w_down": (i, h)}
    return {"fc": (d.feature_size, h), "ctx_norm": (h,), "mask": (h,), "final_norm": (h,),
            "layers": {k: (d.num_layers,) + s for k, s in layer.items()}}


def init_weights(d: BlockConfig, key, dtype=jnp.float32) -> dict:
    """Trainable weights: norms 1, [MASK] ~ N(0, 0.02^2), fc = identity, other matrices ~ N(0, 1/fan_in), the
    output projections small (each block starts near the identity). The trainer copies the target's final
    norm into final_norm (the head it feeds is the target's)."""
    shapes = param_shapes(d)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))

    def make(path, shape, k):
        name = path[-1].key
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        if name == "mask":
            return (0.02 * jax.random.normal(k, shape)).astype(dtype)
        scale = shape[-2] ** -0.5 * (0.1 if name in ("wo", "w_down") else 1.0)
        return (scale * jax.random.normal(k, shape)).astype(dtype)

    w = jax.tree_util.tree_unflatten(treedef, [make(p, s, k) for (p, s), k in zip(leaves, keys)])
    # the context features start as the target's last hidden states (the tapped layers' rows zero)
    w["fc"] = jnp.zeros((d.feature_size, d.hidden_size), dtype).at[-d.hidden_size:].set(jnp.eye(d.hidden_size))
    return w


def head_rows(tparams, cfg: ModelConfig, vocab):
    """The target lm_head's rows for the draft vocabulary: [Vd, H]."""
    if cfg.tie_word_embeddings:
        return jnp.take(tparams["embed"], vocab, axis=0)
    if isinstance(tparams["lm_head"], fp8.Fp8Weight):  # dense "fp8_all"
        return fp8.columns(tparams["lm_head"], vocab, tparams["embed"].dtype)
    return jnp.take(tparams["lm_head"], vocab, axis=1).T


def full_vocab(sub, vocab, vocab_size: int):
    """Logits over a draft vocabulary [..., Vd] -> over the target's [..., V], -inf on the tokens outside it (q = 0:
    never drafted, which keeps speculative sampling lossless)."""
    return jnp.full(sub.shape[:-1] + (vocab_size,), -jnp.inf, jnp.float32).at[..., vocab].set(sub)


def context_kv(w, d: BlockConfig, ctx, ctx_pos):
    """The context's keys (RoPE'd at their positions) and values for every drafter layer: ctx [B,C,F*H] features
    at ctx_pos [B,C] (-1: none) -> (k, v), each [L,B,C,nkv,hd] (stacked or per-layer weights alike). They depend on the context alone, so a decode keeps them in its ring
    (`write`) instead of projecting all `window` positions again every step."""
    b, nkv, hd, dtype = ctx.shape[0], d.num_kv_heads, d.head_dim, w["fc"].dtype
    c = rms_norm(jnp.dot(ctx.astype(dtype), w["fc"]), w["ctx_norm"], d.rms_norm_eps)  # [B,C,H]
    cpos = jnp.maximum(ctx_pos, 0)

    def one(p):
        return (rope((c @ p["wk"]).reshape(b, -1, nkv, hd), cpos, d.rope_theta, hd),
                (c @ p["wv"]).reshape(b, -1, nkv, hd))

    if isinstance(w["layers"], (tuple, list)):
        pairs = [one(p) for p in w["layers"]]
        return jnp.stack([k for k, _ in pairs]), jnp.stack([v for _, v in pairs])
    return jax.vmap(one)(w["layers"])


def block_logits(w, vocab, tparams, cfg: ModelConfig, d: BlockConfig, ctx, ctx_pos, token, position, block: int,
                 head=None, ctx_kv=None, slots: int | None = None):
    """The drafter's forward for A blocks sharing one context (training packs many blocks of a sequence; a
    decode step has A = 1). ctx [B,C,H] target normed hidden states at positions ctx_pos [B,C] (-1: none),
    token [B,A] at position [B,A] -> logits [B,A,block,Vd] f32 over the draft vocabulary; slot j predicts the
    token at position+j+1. Block a sees the context positions in [position_a - window, position_a). ctx holds
    the features ([B,C,F*H], `features`); ctx_kv: their `context_kv` if already computed (ctx is then unused).
    slots: the logits of the first `slots` slots only ([B,A,slots,Vd]; all `block` slots still run, as the block
    attends to itself both ways): a decode step with k < block drafts k tokens, and the draft head is most of a
    small drafter's work."""
    (b, a), h, eps = token.shape, d.hidden_size, d.rms_norm_eps
    nh, nkv, hd, dtype = d.num_heads, d.num_kv_heads, d.head_dim, w["fc"].dtype
    ck, cv = ctx_kv if ctx_kv is not None else context_kv(w, d, ctx, ctx_pos)
    x = jnp.broadcast_to(w["mask"], (b, a, block, h))
    x = x.at[:, :, 0].set(model.embed(tparams, token).astype(dtype)).reshape(b * a, block, h)
    qpos = (position[..., None] + jnp.arange(block, dtype=jnp.int32)).reshape(b * a, block)
    anchor = position[..., None]  # [B,A,1]
    seen = (ctx_pos[:, None] >= 0) & (ctx_pos[:, None] < anchor) & (ctx_pos[:, None] >= anchor - d.window)
    mask = jnp.concatenate([jnp.broadcast_to(seen[:, :, None], (b, a, block, ctx_pos.shape[1])),
                            jnp.ones((b, a, block, block), bool)], axis=-1).reshape(b * a, block, -1)

    def per_block(t):  # [B, C, ...] -> [B*A, C, ...]: the context's keys/values, shared by the blocks
        return jnp.broadcast_to(t[:, None], (b, a) + t.shape[1:]).reshape((b * a,) + t.shape[1:])

    def layer(x, p_kv):
        p, kc, vc = p_kv
        y = rms_norm(x, p["attn_norm"], eps)
        # the context's keys and values join every layer's own (computed once per context position)
        k = jnp.concatenate([per_block(kc.astype(dtype)),
                             rope((y @ p["wk"]).reshape(b * a, block, nkv, hd), qpos, d.rope_theta, hd)], axis=1)
        v = jnp.concatenate([per_block(vc.astype(dtype)), (y @ p["wv"]).reshape(b * a, block, nkv, hd)], axis=1)
        q = rope((y @ p["wq"]).reshape(b * a, block, nh, hd), qpos, d.rope_theta, hd)
        out = attend(q.reshape(b * a, block, nkv, nh // nkv, hd), k, v, mask, None, hd ** -0.5)
        x = x + out.reshape(b * a, block, nh * hd) @ p["wo"]
        return x + swiglu(p, rms_norm(x, p["mlp_norm"], eps)), None

    if isinstance(w["layers"], (tuple, list)):  # per-layer buffers (`unstack_layers`, inference): straight-line
        for i, p in enumerate(w["layers"]):
            x, _ = layer(x, (p, ck[i], cv[i]))
    else:
        x, _ = jax.lax.scan(layer, x, (w["layers"], ck, cv))
    out = rms_norm(x, w["final_norm"], eps).reshape(b, a, block, h)[:, :, :slots]
    rows = (head if head is not None else head_rows(tparams, cfg, vocab)).astype(dtype)
    return jnp.einsum("bath,vh->batv", out, rows, preferred_element_type=jnp.float32)


def unstack_layers(w: dict) -> dict:
    """The weights with "layers" as a tuple of per-layer dicts, each array its own buffer. For inference: a scan
    over the stacked layers copies each layer's weight slices before its GEMMs, every step (measured on an H200,
    mid_mimo spec k=8 with a 2-layer drafter: 14 copies, 0.29 ms of a 2.8 ms step)."""
    n = jax.tree_util.tree_leaves(w["layers"])[0].shape[0]
    return {**w, "layers": tuple(jax.tree_util.tree_map(lambda a: jnp.array(a[i]), w["layers"]) for i in range(n))}


# ---- the Drafter (speculative.py's protocol) ----

def init_state(d: BlockConfig, batch: int, dtype) -> dict:
    """The decode's context ring: each slot's keys and values per drafter layer ([L,B,window,nkv,hd]) and its
    position (-1: empty)."""
    kv = (d.num_layers, batch, d.window, d.num_kv_heads, d.head_dim)
    return {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype), "pos": jnp.full((batch, d.window), -1, jnp.int32)}


def write(state: dict, w, d: BlockConfig, hidden, positions) -> dict:
    """Project features [1,T,F*H] at positions [T] (-1 = skip) into context keys/values (`context_kv`) and put
    them in the ring (slot = position % window); of a chunk longer than the ring only the last `window` positions
    are kept."""
    size = state["pos"].shape[1]
    if hidden.shape[-1] != d.feature_size:
        raise ValueError(f"the block drafter conditions on {len(d.target_layers) + 1} target layers "
                         f"({d.feature_size} features) but was given {hidden.shape[-1]}: "
                         "the caller must run the target with taps=drafter.taps and pass "
                         "block_drafter.features(...) (speculative.target_chunk(..., taps=...))")
    keep = (positions >= 0) & (positions > jnp.max(positions) - size)
    slots = jnp.where(keep, positions % size, size)  # size: out of range, dropped
    k, v = context_kv(w, d, hidden, positions[None])
    return {"k": state["k"].at[:, 0, slots].set(k[:, 0].astype(state["k"].dtype), mode="drop"),
            "v": state["v"].at[:, 0, slots].set(v[:, 0].astype(state["v"].dtype), mode="drop"),
            "pos": state["pos"].at[0, slots].set(positions.astype(jnp.int32), mode="drop")}


def _propose(params, state, key, settings, cfg, k, is_greedy, d: BlockConfig):
    ring, dw = state["mtp_cache"], params["drafter"]
    sub = block_logits(dw["w"], dw["vocab"], params, cfg, d, None, ring["pos"], state["token"][:, None],
                       state["position"][None, None], max(k, d.block_size), dw.get("head"),
                       ctx_kv=(ring["k"], ring["v"]), slots=k)[:, 0]  # [1, k, Vd]
    q = full_vocab(sub, dw["vocab"], cfg.vocab_size)
    if is_greedy:
        drafts = dw["vocab"][jnp.argmax(sub, axis=-1)].astype(jnp.int32)
    else:  # one key, k independent rows
        drafts = sampling.sample(key, q[0], *settings)[None]
    return drafts, q, ring


def _refresh(params, state, normed, emitted, n_acc, key, settings, cfg, is_greedy, d: BlockConfig):
    """The verify pass's hidden states of the accepted positions P..P+n join the context ring."""
    k1 = normed.shape[1]
    positions = jnp.where(jnp.arange(k1) <= n_acc, state["position"] + jnp.arange(k1), -1)
    return (state["draft"], state["draft_logits"], state["draft_hidden"],
            write(state["mtp_cache"], params["drafter"]["w"], d, normed, positions))


def _init(params, cfg, k, dtype, d: BlockConfig):
    return init_state(d, 1, dtype)


def _prefill(params, dstate, normed, next_tokens, positions, key, settings, cfg, is_greedy, d: BlockConfig):
    return write(dstate, params["drafter"]["w"], d, normed, positions)


@functools.lru_cache(maxsize=None)
def drafter_for(d: BlockConfig):
    """The speculative.Drafter of a block config (one per config, so the step compiles once for it)."""
    from mimo_jax import speculative

    part = lambda f: functools.partial(f, d=d)  # noqa: E731
    return speculative.Drafter("block", part(_propose), part(_refresh), False, init=part(_init),
                               prefill=part(_prefill), taps=d.target_layers)


# ---- files ----

def save(path, d: BlockConfig, weights: dict, vocab, target: ModelConfig | None = None, extra: dict | None = None,
         arrays: dict | None = None):
    """Write a drafter (weights as stored, float16 by default for the shipped file) atomically; arrays: more
    tensors for the same file (a trainer's optimizer state)."""
    arrays = {**drafter_files.flatten("w.", weights), "vocab": np.asarray(vocab, np.int32), **(arrays or {})}
    meta = {"block_config": dataclasses.asdict(d), **(extra or {})}
    if target is not None:
        meta["target"] = drafter_files.target_meta(target)
    drafter_files.save(path, arrays, "block", meta)


def load(path, dtype=None, target: ModelConfig | None = None):
    """-> (BlockConfig, {"w": weights, "vocab": ids}, metadata). Raises InputError for a file that is not a block
    drafter or was trained for a target of another shape."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"drafter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"drafter file {str(path)!r} is not a safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("kind") != "block" or "block_config" not in meta:
        raise InputError(f"{str(path)!r} is not a block drafter (no block_config in its metadata)")
    d = BlockConfig(**json.loads(meta["block_config"]))
    if target is not None:
        check_target(d, meta, target, path)
    weights = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype or a.dtype), drafter_files.unflatten("w.", flat))
    return d, {"w": weights, "vocab": jnp.asarray(flat["vocab"], jnp.int32)}, meta


def is_drafter_file(path) -> bool:
    """Whether `path` is a block drafter file (reads only the safetensors header)."""
    return drafter_files.kind(path) == "block"


def fits(path, cfg: ModelConfig) -> bool:
    """Whether the drafter file was trained for a model of this shape (reads only the header)."""
    try:
        meta = drafter_files.header(path)
        check_target(BlockConfig(**json.loads(meta["block_config"])), meta, cfg, path)
        return True
    except Exception:  # noqa: BLE001
        return False


def check_target(d: BlockConfig, meta: dict, target: ModelConfig, path) -> None:
    bad = drafter_files.target_mismatch(meta, target)
    if any(i >= target.num_layers - 1 for i in d.target_layers):
        bad.append(f"target_layers {d.target_layers} (the target's intermediate layers are 0..{target.num_layers - 2})")
    if d.hidden_size != target.hidden_size or d.target_vocab != target.vocab_size:
        bad.append(f"hidden/vocab {d.hidden_size}/{d.target_vocab} vs {target.hidden_size}/{target.vocab_size}")
    if bad:
        raise InputError(f"drafter {str(path)!r} was trained for another model ({'; '.join(bad)})")
