"""The MiMo-V2-Flash decoder (and, by configuration, Llama) as pure functions over parameter pytrees.

    params = {"embed": [V,H], "final_norm": [H], "lm_head": [H,V] (absent when tied),
              "layers": stacked per plan (see plan.py), each layer
                  {"attn_norm", "mlp_norm", "attn": {"wq","wk","wv","wo","sink"?},
                   "mlp": dense {"w_gate","w_up","w_down"} | moe {"router","router_bias","w_gate","w_up","w_down"}},
              "mtp": stacked [n_mtp] (when present) {"enorm","hnorm","eh_proj", "attn_norm","attn","mlp_norm",
                  "mlp" (dense), "final_norm"}}
    cache  = {"layers": stacked per plan, each layer {"k": [B,S,Hkv,D], "v": [B,S,Hkv,Dv]}}
             S = capacity on full layers, S = window on sliding layers (a ring buffer).

forward_hidden(params, tokens [B,T], positions [T] or [B,T], cache, cfg) -> (hidden [B,T,H], cache): positions
are consecutive from the cache length with -1 marking tail padding, shared by the batch ([T]) or per row ([B,T]:
batched decoding, see layers.py). `cfg` is static.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import fp8, ops, sharding
from mimo_jax.config import DENSE, FULL, SLIDING, ModelConfig
from mimo_jax.layers import attention, rms_norm, swiglu, with_rope_tables
from mimo_jax.moe import EXPERT_KEYS, moe
from mimo_jax.plan import Loop, Run, layer_slots, make_plan, stacked

F32_LEAVES = ("router", "router_bias", "sink")  # kept in float32 whatever the model dtype


def plan_of(cfg: ModelConfig):
    return make_plan(cfg.layer_kinds)


def _layer_shapes(cfg: ModelConfig, kind) -> dict:
    attn_kind, mlp_kind = kind
    s = cfg.attention(attn_kind)
    h = cfg.hidden_size
    attn = {"wq": (h, s.num_heads * s.head_dim), "wk": (h, s.num_kv_heads * s.head_dim),
            "wv": (h, s.num_kv_heads * s.v_head_dim), "wo": (s.num_heads * s.v_head_dim, h)}
    if s.sink:
        attn["sink"] = (s.num_heads,)
    if mlp_kind == DENSE:
        i = cfg.intermediate_size
        mlp = {"w_gate": (h, i), "w_up": (h, i), "w_down": (i, h)}
    else:
        e, i = cfg.num_experts, cfg.moe_intermediate_size
        mlp = {"router": (h, e), "router_bias": (e,), "w_gate": (e, h, i), "w_up": (e, h, i), "w_down": (e, i, h)}
    return {"attn_norm": (h,), "mlp_norm": (h,), "attn": attn, "mlp": mlp}


def _mtp_shapes(cfg: ModelConfig) -> dict:
    h = cfg.hidden_size
    block = _layer_shapes(cfg, (SLIDING, DENSE))
    return {"enorm": (h,), "hnorm": (h,), "eh_proj": (2 * h, h), **block, "final_norm": (h,)}


def _to_structs(shapes: dict, lead: tuple, dtype) -> dict:
    def leaf(path, shape):
        name = path[-1].key
        return jax.ShapeDtypeStruct(lead + shape, jnp.float32 if name in F32_LEAVES else dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))


def param_shapes(cfg: ModelConfig, dtype=jnp.bfloat16) -> dict:
    """The parameter pytree as jax.ShapeDtypeStruct leaves (no memory)."""
    v, h = cfg.vocab_size, cfg.hidden_size
    out = {"embed": jax.ShapeDtypeStruct((v, h), dtype), "final_norm": jax.ShapeDtypeStruct((h,), dtype),
           "layers": stacked(plan_of(cfg), lambda kind, lead: _to_structs(_layer_shapes(cfg, kind), lead, dtype))}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = jax.ShapeDtypeStruct((h, v), dtype)
    if cfg.num_mtp_layers:
        out["mtp"] = _to_structs(_mtp_shapes(cfg), (cfg.num_mtp_layers,), dtype)
    return out


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: ModelConfig, key, dtype=jnp.bfloat16) -> dict:
    """Random weights (for tests and benchmarks): matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2),
    sinks and router biases random too (zeros would hide bugs)."""
    structs = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(structs)
    keys = jax.random.split(key, len(leaves))

    def make(path, s, k):
        name = path[-1].key
        if name.endswith("norm"):
            return (1.0 + 0.1 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)
        if name in ("sink", "router_bias"):
            return (0.5 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)
        scale = 1.0 if name == "embed" else s.shape[-2] ** -0.5
        return (scale * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)

    return jax.tree_util.tree_unflatten(treedef, [make(p, s, k) for (p, s), k in zip(leaves, keys)])


def ring_length(window: int, ring_slack: int = 0) -> int:
    """Slots of a sliding layer's ring: more than the window (a decode step writes its position before it
    attends, so the slot it overwrites must be out of the window), plus the slack, rounded up to 16 (the
    fused attention kernel reads keys in blocks of 16 or more)."""
    return -(-(window + 1 + ring_slack) // 16) * 16


def cache_shapes(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16, ring_slack: int = 0) -> dict:
    """Full layers hold `capacity` positions; sliding layers a ring of ring_length(window, ring_slack) slots. Speculative
    decoding sets ring_slack = k + 1, so the k+1 positions a verify pass writes never overwrite an entry that a
    later query still sees in its window: rejected drafts need no rollback (layers.attention)."""
    def make(kind, lead):
        s = cfg.attention(kind[0])
        length = capacity if kind[0] == FULL else ring_length(s.window, ring_slack)
        return {"k": jax.ShapeDtypeStruct(lead + (batch, length, s.num_kv_heads, s.head_dim), dtype),
                "v": jax.ShapeDtypeStruct(lead + (batch, length, s.num_kv_heads, s.v_head_dim), dtype)}
    return {"layers": stacked(plan_of(cfg), make)}


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "capacity", "dtype", "ring_slack"))
def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16, ring_slack: int = 0) -> dict:
    """Zeroed caches (cache_shapes): one compiled dispatch per shape, not one per layer buffer (every request
    allocates them)."""
    shapes = cache_shapes(cfg, batch, capacity, dtype, ring_slack)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _pre_norm(x, scale, eps):
    """RMSNorm, or (ops.FoldedNorm: its scale lives in the weights that read it) the pending form ops.Normed."""
    if isinstance(scale, ops.FoldedNorm):
        return ops.Normed(x, ops.rms_scale(x, eps))
    return rms_norm(x, scale, eps)


def decoder_layer(p, x, positions, cache, index, kind, cfg: ModelConfig, experts=None):
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). For a MoE layer, `experts` is the run's
    whole expert stack and `index` this layer's place in it (moe.experts reads only the experts it needs)."""
    attn_kind, mlp_kind = kind
    with jax.named_scope("norm"):
        h = _pre_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    with jax.named_scope("attention"):
        a, cache = attention(p["attn"], h, positions, cache, index, cfg.attention(attn_kind))
    with jax.named_scope("residual"):
        x = x + a
    with jax.named_scope("norm"):
        h = _pre_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    if mlp_kind == DENSE:
        with jax.named_scope("mlp"):
            y = swiglu(p["mlp"], h)
    else:
        y = moe(p["mlp"], experts, index, h, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    with jax.named_scope("residual"):
        return x + y, cache


def _split_experts(params, kind):
    """(params without the expert weights, the expert stack or None): the stack stays out of the layer scan."""
    if kind[1] == DENSE:
        return params, None
    mlp = {k: v for k, v in params["mlp"].items() if k not in EXPERT_KEYS}
    return {**params, "mlp": mlp}, {k: params["mlp"][k] for k in EXPERT_KEYS}


def _tap(got, x, layer, taps):
    """The outputs of the layers named in taps (static) so far: x joins where `layer` (traced) is one of them."""
    return tuple(jnp.where(layer == t, x, g) for g, t in zip(got, taps))


# Layers per iteration of the scan over a run (jax.lax.scan's unroll). Each iteration costs the GPU step a
# counter kernel (SmolLM2, one H200: ~0.9 us of ~24 us per layer), but unrolling never paid: plain decode 0.720
# ms/token at 1, 0.728 / 0.742 / 0.762 at 2 / 3 / 5, 0.749 with the whole scan unrolled (session 13).
SCAN_UNROLL = 1


def _scan_run(x, params, experts, cache, positions, kind, cfg, outer=(), got=(), first=0, taps=()):
    length = jax.tree_util.tree_leaves(params)[0].shape[0]

    def body(carry, xs):
        x, cache, got = carry
        p, i = xs
        x, cache = decoder_layer(p, x, positions, cache, (*outer, i), kind, cfg, experts)
        return (x, cache, _tap(got, x, first + i, taps)), None

    (x, cache, got), _ = jax.lax.scan(body, (x, cache, got), (params, jnp.arange(length)),
                                      unroll=min(SCAN_UNROLL, length))
    return x, cache, got


def _scan_loop(x, params, experts, caches, positions, loop: Loop, cfg, got=(), first=0, taps=()):
    period = sum(run.length for run in loop.runs)

    def body(carry, xs):
        x, caches, got = carry
        ps, rep = xs
        new, layer = [], first + rep * period
        for run, p, ex, c in zip(loop.runs, ps, experts, caches):
            x, c, got = _scan_run(x, p, ex, c, positions, run.kind, cfg, (rep,), got, layer, taps)
            new.append(c)
            layer = layer + run.length
        return (x, new, got), None

    (x, caches, got), _ = jax.lax.scan(body, (x, list(caches), got), (list(params), jnp.arange(loop.repeats)))
    return x, caches, got


def run_layers(layer_params, layer_caches, x, positions, cfg: ModelConfig, taps=()):
    """-> (x, caches, the outputs of the layers named in taps)."""
    new_caches, got, first = [], tuple(jnp.zeros_like(x) for _ in taps), 0
    for item, p, c in zip(plan_of(cfg), layer_params, layer_caches):
        if isinstance(item, Run):
            p, experts = _split_experts(p, item.kind)
            x, c, got = _scan_run(x, p, experts, c, positions, item.kind, cfg, (), got, first, taps)
            first += item.length
        else:
            split = [_split_experts(pr, run.kind) for pr, run in zip(p, item.runs)]
            x, c, got = _scan_loop(x, [s[0] for s in split], [s[1] for s in split], c, positions, item, cfg, got,
                                   first, taps)
            first += item.repeats * sum(run.length for run in item.runs)
        new_caches.append(c)
    return x, new_caches, got


def _run_of(plan, slot):
    item = plan[slot.item]
    return item if isinstance(item, Run) else item.runs[slot.run]


def _at(tree_list, slot):
    """The plan-shaped list's entry for a layer slot: a Run's stack, or the run's stack inside a Loop."""
    entry = tree_list[slot.item]
    return entry if slot.run is None else entry[slot.run]


def _with(tree_list, slot, value):
    out = list(tree_list)
    if slot.run is None:
        out[slot.item] = value
    else:
        inner = list(out[slot.item])
        inner[slot.run] = value
        out[slot.item] = inner
    return out


def _fusable(*weights) -> bool:
    """Plain arrays, each on one device (a head- or column-split weight is not concatenated); or FP8 weights
    (fp8.Fp8Weight) on one device whose widths are whole scale blocks."""
    if all(isinstance(w, fp8.Fp8Weight) for w in weights):
        return (all(len(w.w.sharding.device_set) == 1 and w.shape[-1] % w.block == 0 for w in weights)
                and len({w.block for w in weights}) == 1)
    return all(isinstance(w, jax.Array) and len(w.sharding.device_set) == 1 for w in weights)


def _concat_out(ws):
    return fp8.concat_out(ws) if isinstance(ws[0], fp8.Fp8Weight) else jnp.concatenate(ws, axis=-1)


def _fuse_projections(layer: dict) -> dict:
    """q/k/v into one [H, Nq+Nk+Nv] matrix, gate/up into one [H, 2I]: one GEMM each instead of three / two."""
    attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
    if "wq" in attn and _fusable(attn["wq"], attn["wk"], attn["wv"]):  # (no "wq": fused already)
        attn["wqkv"] = _concat_out([attn.pop("wq"), attn.pop("wk"), attn.pop("wv")])
    if "w_gate" in mlp and mlp["w_gate"].ndim == 2 and _fusable(mlp["w_gate"], mlp["w_up"]):
        mlp["w_gate_up"] = _concat_out([mlp.pop("w_gate"), mlp.pop("w_up")])
    return {**layer, "attn": attn, "mlp": mlp}


def unroll_layers(params: dict, cfg: ModelConfig, fuse: bool = True) -> dict:
    """The decode layout: params["unrolled"] = one dict per layer (its own buffers, in layer order), and
    params["layers"] keeps only the routed-expert stacks (which moe.experts reads in place). forward_hidden then
    runs the layers as straight-line code: no scan, so no loop overhead per layer and no dynamic slice of a
    stacked weight (XLA materialised those before the GEMM: 17% of mid_mimo's step, BENCHMARKS.md). fuse:
    concatenate q/k/v and gate/up (unsharded plain weights only). The result holds new buffers for every
    non-expert layer weight: the stacked ones are freed once the caller drops `params` (Engine does)."""
    if "unrolled" in params:  # already in this layout (an Engine built from another Engine's params)
        return params
    plan, stacks = plan_of(cfg), list(params["layers"])
    per_layer = [None] * cfg.num_layers
    for i, slot in enumerate(layer_slots(plan)):
        kind = _run_of(plan, slot).kind
        rest, _ = _split_experts(_at(stacks, slot), kind)
        per_layer[i] = jax.tree_util.tree_map(lambda a: a[slot.index], rest)
    experts_only = []
    for item, p in zip(plan, stacks):
        if isinstance(item, Run):
            experts_only.append(_split_experts(p, item.kind)[1] or {})
        else:
            experts_only.append([_split_experts(pr, run.kind)[1] or {} for pr, run in zip(p, item.runs)])
    if fuse:
        per_layer = [_fuse_projections(p) for p in per_layer]
    return {**{k: v for k, v in params.items() if k != "layers"}, "layers": experts_only,
            "unrolled": tuple(per_layer)}


def preferred_layout(cfg: ModelConfig, platform: str = "gpu") -> str:
    """"unrolled" when a layer holds a matrix XLA runs as a GEMM (>= 2^23 elements; smaller ones it runs as
    reductions, which read a scanned stack in place): the scan copies such a slice before the GEMM. Measured on
    an H200 (BENCHMARKS.md): mid_mimo 2.885 -> 2.012 ms/token unrolled; SmolLM2 shapes 1.395 (scan) vs
    1.99 ms (unrolled: 33% of the step is CUDA-graph overhead between its 670 small kernels). On CPU always
    "unrolled": no launch overhead to save, and the scan's per-layer weight slices cost (SmolLM2 f32, 2 cores,
    BENCHMARKS.md session 6)."""
    if platform == "cpu":
        return "unrolled"
    shapes = [s for kind in set(cfg.layer_kinds) for s in jax.tree_util.tree_leaves(
        _split_experts(_layer_shapes(cfg, kind), kind)[0], is_leaf=lambda x: isinstance(x, tuple))]
    return "unrolled" if max(int(np.prod(s)) for s in shapes) >= 1 << 23 else "scan"


def _run_unrolled(per_layer, expert_stacks, layer_caches, x, positions, cfg: ModelConfig, taps=()):
    plan, caches, got = plan_of(cfg), list(layer_caches), {}
    for i, (p, slot) in enumerate(zip(per_layer, layer_slots(plan))):
        kind = _run_of(plan, slot).kind
        experts = _at(expert_stacks, slot) if kind[1] != DENSE else None
        x, c = decoder_layer(p, x, positions, _at(caches, slot), slot.index, kind, cfg, experts)
        caches = _with(caches, slot, c)
        got[i] = x
    return x, caches, tuple(got[t] for t in taps)


def embed(params, tokens):
    """Embedding rows for tokens [...] -> [..., H]; on a mesh whose size divides the vocabulary (the sharding
    table splits the table by rows then) through sharding.vocab_embed: one psum, not a gather of the table."""
    table = params["embed"]
    if sharding.VOCAB_EMBED_LOCAL and sharding.splits_vocab(table.shape[0], sharding.expert_axis_size()):
        return sharding.vocab_embed(table, tokens)
    return jnp.take(table, tokens, axis=0)


def forward_hidden(params, tokens, positions, cache, cfg: ModelConfig, kernels: str = "xla", taps: tuple = ()):
    """tokens [B,T] -> (last layer's hidden states [B,T,H], before the final norm; updated cache).

    kernels (static): "xla" runs the reference path (any shape, any device); "pallas" / "interpret" run a
    one-token batch-1 decode through the fused Pallas layer kernels (fused_decode.py) where they support the
    model (else this path).
    taps (static layer indices, default none): also return the outputs of those layers (the residual stream after
    layer i, [B,T,H] each): -> (hidden, cache, tuple of outputs). A drafter conditioned on intermediate layers
    (block_drafter.py) reads them from the verify pass."""
    if kernels != "xla" and tokens.shape == (1, 1) and "unrolled" not in params and not taps:
        from mimo_jax import fused_decode

        if fused_decode.unsupported(cfg, params, cache) is None:
            return fused_decode.forward_hidden(params, tokens, positions, cache, cfg, kernels == "interpret")
    x = embed(params, tokens)
    positions = with_rope_tables(positions, [cfg.attention(k) for k in sorted(set(cfg.layer_types))], x.dtype)
    if "unrolled" in params:
        x, layers, got = _run_unrolled(params["unrolled"], params["layers"], cache["layers"], x, positions, cfg, taps)
    else:
        x, layers, got = run_layers(params["layers"], cache["layers"], x, positions, cfg, taps)
    return (x, {**cache, "layers": layers}) + ((got,) if taps else ())


@jax.named_scope("norm")
def final_norm(params, hidden, cfg: ModelConfig):
    return rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps)


@jax.named_scope("lm_head")
def head(params, normed, cfg: ModelConfig):
    """The (possibly tied) lm_head: normed hidden [..., H] -> float32 logits [..., V]. An untied lm_head may be an
    fp8.Fp8Weight (dense "fp8_all")."""
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    if isinstance(w, fp8.Fp8Weight):
        return fp8.matmul(normed, w, out_dtype=jnp.float32)
    return jnp.dot(normed, w.astype(normed.dtype), preferred_element_type=jnp.float32)


def lm_logits(params, hidden, cfg: ModelConfig):
    """Final norm and lm_head: last-layer hidden [..., H] -> float32 logits [..., V]."""
    return head(params, final_norm(params, hidden, cfg), cfg)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def forward(params, tokens, positions, cache, cfg: ModelConfig):
    """tokens [B,T] -> (logits [B,T,V] f32, cache)."""
    hidden, cache = forward_hidden(params, tokens, positions, cache, cfg)
    return lm_logits(params, hidden, cfg), cache
