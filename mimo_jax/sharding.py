"""Expert and tensor parallelism over a one-axis device mesh ("model"): the sharding table and the EP MoE.

The table maps a parameter leaf (its name and logical rank, stack axes excluded) to logical axes, and the
logical axes to the mesh:
    experts   routed experts split by expert                 (one psum per MoE layer, in `ep_experts`)
    q_heads / kv_heads
              attention heads split (tensor parallel) when attention="tp" and both head counts divide the
              mesh, else that attention type is replicated (no collective, every device reads all of it)
    ffn       the dense SwiGLU's intermediate dim            (one psum after w_down, inserted by XLA)
    vocab     embedding rows and lm_head columns
The model code never asks how many devices there are: `moe.moe` looks for a "model" axis in the mesh set by
`jax.set_mesh` (the Engine does that) and runs `ep_experts` under shard_map when it is larger than one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mimo_jax import fp8
from mimo_jax.config import FULL, ModelConfig
from mimo_jax.errors import ConfigError
from mimo_jax.plan import leaf_kind, path_keys, stack_axes

AXIS = "model"

# (leaf name, logical rank) -> logical axis per dim; anything not listed is replicated.
TABLE = {
    ("embed", 2): ("vocab", None),
    ("lm_head", 2): (None, "vocab"),
    ("wq", 2): (None, "q_heads"),
    ("wk", 2): (None, "kv_heads"),
    ("wv", 2): (None, "kv_heads"),
    ("wo", 2): ("q_heads", None),
    ("sink", 1): ("q_heads",),
    ("w_gate", 2): (None, "ffn"),
    ("w_up", 2): (None, "ffn"),
    ("w_down", 2): ("ffn", None),
    ("w_gate", 3): ("experts", None, None),
    ("w_up", 3): ("experts", None, None),
    ("w_down", 3): ("experts", None, None),
    ("k", 4): (None, None, "kv_heads", None),  # KV cache [B, S, Hkv, D]
    ("v", 4): (None, None, "kv_heads", None),
}


def make_mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ConfigError(f"asked for {n} devices, {len(devices)} are visible")
    return Mesh(np.array(devices[:n]), (AXIS,))


def _mesh_axes(cfg: ModelConfig, n: int, attn_kind: str, attention: str) -> dict:
    s = cfg.attention(attn_kind)
    tp = attention == "tp" and s.num_heads % n == 0 and s.num_kv_heads % n == 0
    if cfg.num_experts and cfg.num_experts % n:
        raise ConfigError(f"{cfg.num_experts} experts do not split over {n} devices")
    return {"q_heads": AXIS if tp else None, "kv_heads": AXIS if tp else None,
            "ffn": AXIS if cfg.intermediate_size % n == 0 else None,
            "vocab": AXIS if splits_vocab(cfg.vocab_size, n) else None, "experts": AXIS}


def splits_vocab(vocab_size: int, n: int) -> bool:
    """Whether the table splits the embedding rows and lm_head columns over n devices."""
    return n > 1 and vocab_size % n == 0


def specs(tree, cfg: ModelConfig, mesh: Mesh, attention: str = "tp"):
    """PartitionSpecs for a parameter or cache pytree (arrays or ShapeDtypeStructs), through TABLE."""
    from mimo_jax.model import plan_of

    plan, n = plan_of(cfg), mesh.shape[AXIS]

    def spec(path, leaf):
        if isinstance(leaf, fp8.Fp8Weight):  # w and its block scales split alike, on the axes of its stored layout
            logical = spec(path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            stored = P(*logical[:-2], logical[-1], logical[-2]) if leaf.layout == "nk" and len(logical) >= 2 \
                else logical
            # the scales split only where each device holds whole blocks; else they stay whole on every device
            whole = all(ax is None or dim % (n * leaf.block) == 0 for ax, dim in zip(stored, leaf.w.shape))
            return dataclasses.replace(leaf, w=stored, scale=stored if whole else P())
        keys = path_keys(path)
        while isinstance(keys[-1], int):  # an array inside a QuantizedWeight: packed / scales / mins
            keys = keys[:-1]
        out_in = keys[-1] == "t"  # ops.OutInWeight: the weight stored [..., N, K], its last two axes swapped
        if out_in:
            keys = keys[:-1]
        lead = stack_axes(keys)
        logical = TABLE.get((keys[-1], leaf.ndim - lead))
        if logical is None:
            return P()
        if out_in:
            logical = (*logical[:-2], logical[-1], logical[-2])
        kind = leaf_kind(plan, keys)
        axes = _mesh_axes(cfg, n, kind[0] if kind else FULL, attention)
        return P(*([None] * lead), *(axes[a] if a else None for a in logical))

    return jax.tree_util.tree_map_with_path(spec, tree, is_leaf=lambda x: isinstance(x, fp8.Fp8Weight))


def shard(tree, tree_specs, mesh: Mesh):
    """Place each leaf on the mesh, each device receiving only its own slice. An fp8.Fp8Weight also notes its
    PartitionSpec (static), which its products read to run the GEMV kernel per device (fp8.matmul)."""
    placed = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, tree_specs)

    def note(x, s):
        return dataclasses.replace(x, spec=tuple(s.w)) if isinstance(x, fp8.Fp8Weight) else x

    return jax.tree_util.tree_map(note, placed, tree_specs, is_leaf=lambda x: isinstance(x, fp8.Fp8Weight))


def expert_axis_size() -> int:
    """Size of the mesh axis the experts are split over, from the mesh set with jax.set_mesh (1 if none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape.get(AXIS, 1) if mesh is not None and not mesh.empty else 1


def ep_experts(local_experts, stack, index, x, weights, ids):
    """Expert parallel MoE: every device routes all tokens (weights/ids replicated), computes the (token, expert)
    pairs whose expert it holds, and one psum adds the partial outputs. Shapes stay static: pairs held elsewhere
    get the skip id and contribute zero rows. `stack` is the run's expert stack, split on its expert axis.
    """
    n_lead = len(index)
    expert_spec = P(*([None] * n_lead), AXIS)

    def local(stack, index, x, weights, ids):
        e_local = stack["w_gate"].shape[n_lead]
        first = jax.lax.axis_index(AXIS) * e_local
        mine = (ids >= first) & (ids < first + e_local)
        y = local_experts(stack, index, x, jnp.where(mine, weights, 0.0), jnp.where(mine, ids - first, e_local))
        return jax.lax.psum(y, AXIS)

    return jax.shard_map(local, in_specs=({k: expert_spec for k in stack}, P(), P(), P(), P()), out_specs=P(),
                         check_vma=False)(stack, tuple(index), x, weights, ids)


# model.embed on a mesh: each device's own rows + one psum (vocab_embed). Not yet timed on GPUs: it replaces the
# partitioner's per-step all-gather of the whole table (1.25 GB on MiMo-V2-Flash, 2 x H200); False = that gather
# (an A/B: benchmarks/knobs.py sharding.VOCAB_EMBED_LOCAL=0 -- ...).
VOCAB_EMBED_LOCAL = True


def vocab_embed(table, tokens):
    """Rows of a vocab-split embedding table [V, H] (the table's ("vocab", None) spec) for tokens [...]: each device
    looks up the tokens in its own rows, zeros elsewhere, and one psum of [..., H] joins them. Left to the
    partitioner, a one-token lookup all-gathered the whole table every step (MiMo-V2-Flash on 2 x H200: 1.25 GB,
    ~1.2 ms of a 12 ms step; session 12's optimized HLO). Negative ids count from the end, as jnp.take's do;
    ids out of range give zeros."""
    vocab = table.shape[0]

    def local(table, tokens):
        rows = table.shape[0]
        ids = jnp.where(tokens < 0, tokens + vocab, tokens) - jax.lax.axis_index(AXIS) * rows
        mine = (ids >= 0) & (ids < rows)
        x = jnp.take(table, jnp.where(mine, ids, 0), axis=0)
        return jax.lax.psum(jnp.where(mine[..., None], x, jnp.zeros((), x.dtype)), AXIS)

    return jax.shard_map(local, in_specs=(P(AXIS, None), P()), out_specs=P(), check_vma=False)(table, tokens)

