"""Decode of one token (batch 1) through the fused Pallas layer kernels (pallas_kernels/decode_layer.py).

The same math as model.forward_hidden for T = 1, organised for few kernels per layer:
  * layers are a Python loop over the plan (one flat program, no while loop), and each kernel reads the
    whole stacked weights / caches of its run with the layer index as an operand: no weight slice is ever
    copied, every layer of a kind runs the same compiled kernels, caches are updated in place;
  * per layer: attn_in (norm + q/k/v + RoPE + cache write), attn_out (attention + W_o + residual) and, for
    a dense MLP, mlp (norm + gate/up + SiLU + down, added atomically into the residual); MoE layers run
    moe.moe (XLA + the int4 kernels) on the normed output;
  * the residual stream is float32 between kernels (the XLA path rounds it to the model dtype per layer),
    so logits agree with the XLA path to bf16 rounding, not bit for bit.
`unsupported(cfg, params)` says why a model keeps the XLA path (model.forward_hidden falls back to it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax import fp8, quant, sharding
from mimo_jax.config import DENSE, ModelConfig
from mimo_jax.layers import rms_norm, swiglu
from mimo_jax.moe import EXPERT_KEYS, moe
from mimo_jax.plan import Run
from pallas_kernels import decode_layer as dl

F32 = jnp.float32
ATTN_KEYS = ("wq", "wk", "wv", "wo")
MAX_KEYS = 512  # longest cache (full-attention capacity or ring) the fused attention takes


def _block(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (at least 16 where n allows; supported() checks)."""
    b = cap
    while b > 16 and n % b:
        b //= 2
    return b


def geometry(cfg: ModelConfig, attn_kind: str) -> dl.Geometry:
    s = cfg.attention(attn_kind)
    inter = cfg.intermediate_size if DENSE in cfg.mlp_types else 0
    return dl.Geometry(bk=_block(cfg.hidden_size, 64), bn=_block(cfg.hidden_size, 64),
                       bi=_block(inter, max(64, min(256, inter // 128))) if inter else 32,hidden=cfg.hidden_size, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                       head_dim=s.head_dim, v_head_dim=s.v_head_dim, rope_dim=s.rope_dim, rope_theta=s.rope_theta,
                       window=s.window, sink=s.sink, value_scale=s.value_scale, eps=cfg.rms_norm_eps,
                       intermediate=inter)


def unsupported(cfg: ModelConfig, params, cache) -> str | None:
    """None if the fused decode path takes this model, params and cache; else the reason."""
    if sharding.expert_axis_size() > 1:
        return "the model is spread over several devices (the fused kernels are single-device for now)"
    for kind in {a for a, _ in cfg.layer_kinds}:
        why = dl.supported(geometry(cfg, kind))
        if why:
            return f"{kind} attention: {why}"
    for item, p, c in zip(_plan(cfg), params["layers"], cache["layers"]):
        for run, pr, cr in _runs(item, p, c):
            mats = [pr["attn"][k] for k in ATTN_KEYS]
            if run.kind[1] == DENSE:
                mats += [pr["mlp"][k] for k in EXPERT_KEYS]
            if any(isinstance(m, (quant.QuantizedWeight, fp8.Fp8Weight)) or m.dtype != jnp.bfloat16 for m in mats):
                return "the fused kernels take bfloat16 (unquantized) attention and dense MLP weights"
            if cr["k"].dtype != jnp.bfloat16:
                return "the fused kernels take a bfloat16 cache"
            if not dl.key_block(cr["k"].shape[-3], geometry(cfg, run.kind[0]).bs):
                return f"cache length {cr['k'].shape[-3]} is not a multiple of 16"
            if cr["k"].shape[-3] > MAX_KEYS:
                return (f"cache length {cr['k'].shape[-3]} > {MAX_KEYS}: attn_out recomputes attention in each "
                        f"column block, which pays only for short caches")
    return None


def _plan(cfg):
    from mimo_jax.model import plan_of

    return plan_of(cfg)


def _runs(item, p, c):
    """(run, params, cache) of a plan item: a Run, or each run of a Loop."""
    if isinstance(item, Run):
        return [(item, p, c)]
    return list(zip(item.runs, p, c))


def _flat(tree, n_lead: int):
    """Merge the n_lead stack axes into one: [R, n, ...] -> [R*n, ...] (a reshape, no copy)."""
    return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[n_lead:]), tree)


def _unflat(tree, like):
    return jax.tree_util.tree_map(lambda a, b: a.reshape(b.shape), tree, like)


def forward_hidden(params, tokens, positions, cache, cfg: ModelConfig, interpret: bool = False):
    """tokens [1,1], positions [1] -> (last layer's hidden [1,1,H] in the model dtype, cache); see module doc."""
    from mimo_jax.model import embed

    dtype = params["embed"].dtype
    x = embed(params, tokens)[0, 0].astype(F32)
    pos = positions.astype(jnp.int32)
    geoms = {kind: geometry(cfg, kind) for kind in {a for a, _ in cfg.layer_kinds}}
    q_bufs = {kind: jnp.zeros((g.num_kv_heads, g.group_pad, g.head_dim), jnp.bfloat16) for kind, g in geoms.items()}
    new_caches = []
    for item, p_item, c_item in zip(_plan(cfg), params["layers"], cache["layers"]):
        runs = _runs(item, p_item, c_item)
        repeats, n_lead = (1, 1) if isinstance(item, Run) else (item.repeats, 2)
        state = []
        for run, p, c in runs:
            attn_kind, mlp_kind = run.kind
            g = geoms[attn_kind]
            experts = {k: p["mlp"][k] for k in EXPERT_KEYS} if mlp_kind != DENSE else None
            flat = _flat({"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"], "attn": p["attn"],
                          "mlp": p["mlp"] if mlp_kind == DENSE else
                          {k: v for k, v in p["mlp"].items() if k not in EXPERT_KEYS}}, n_lead)
            sinks = dl.sink_table(flat["attn"].get("sink"), g)
            state.append({"run": run, "g": g, "p": flat, "experts": experts, "sinks": sinks,
                          "cache": _flat(c, n_lead), "like": c})
        for rep in range(repeats):
            for st in state:
                run, g, p = st["run"], st["g"], st["p"]
                for i in range(run.length):
                    flat_i = rep * run.length + i
                    lid = jnp.full((1,), flat_i, jnp.int32)
                    kind = run.kind[0]
                    ck, cv = st["cache"]["k"], st["cache"]["v"]
                    with jax.named_scope("attention"):
                        q_bufs[kind], ck, cv = dl.attn_in(lid, pos, x, p["attn_norm"], p["attn"]["wq"],
                                                          p["attn"]["wk"], p["attn"]["wv"], q_bufs[kind], ck, cv,
                                                          g=g, interpret=interpret)
                        x_mid, acc = dl.attn_out(lid, pos, x, q_bufs[kind], ck, cv, st["sinks"],
                                                 p["attn"]["wo"], g=g, interpret=interpret)
                    st["cache"] = {"k": ck, "v": cv}
                    if run.kind[1] == DENSE and g.intermediate:
                        with jax.named_scope("mlp"):
                            x = dl.mlp(lid, x_mid, acc, p["mlp_norm"], p["mlp"]["w_gate"], p["mlp"]["w_up"],
                                       p["mlp"]["w_down"], g=g, interpret=interpret)
                        continue
                    with jax.named_scope("norm"):
                        h = rms_norm(x_mid.astype(dtype), p["mlp_norm"][flat_i], cfg.rms_norm_eps)[None, None]
                    mlp_p = jax.tree_util.tree_map(lambda a: a[flat_i], p["mlp"])
                    if run.kind[1] == DENSE:
                        with jax.named_scope("mlp"):
                            y = swiglu(mlp_p, h)
                    else:
                        index = (i,) if n_lead == 1 else (rep, i)
                        y = moe(mlp_p, st["experts"], index, h, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                cfg.routed_scaling_factor)
                    with jax.named_scope("residual"):
                        x = x_mid + y[0, 0].astype(F32)
        caches = [_unflat(st["cache"], st["like"]) for st in state]
        new_caches.append(caches[0] if isinstance(item, Run) else caches)
    return x.astype(dtype)[None, None], {**cache, "layers": new_caches}
