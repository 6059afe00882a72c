"""Quantization as a weight transform over the parameter pytree: the routed experts in int4 or MXFP4, and
(`quantize_dense`) the dense projections the hub ships in FP8 kept in FP8.

Attention, the dense MLP, embeddings, lm_head, router and the MTP drafter keep their dtype (quantized MTP heads
lose acceptance; UltraSpeed keeps attention in higher precision too). The format and group size travel in the
pytree (quant.QuantizedWeight), not in names.

Every expert is quantized on its own by quant.quantize_jit (one [K, N] matrix, never an f32 copy of a stack): the
streaming loader (loader.py) calls the same compiled function expert by expert as it reads them, so a model
quantized while loading and one quantized after loading are bit-identical.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import fp8, quant
from mimo_jax.config import DENSE_CHOICES
from mimo_jax.errors import ConfigError
from mimo_jax.plan import path_keys, stack_axes

EXPERT_LEAVES = ("w_gate", "w_up", "w_down")
CHOICES = ("none", "int4_sym", "int4_asym", "mxfp4")
# How each format's expert bytes are stored (quant.LAYOUTS; every kernel and the XLA path read both, only speed
# differs). "nk" (bytes along K) since session 18: one H200, mid_mimo, `knob_sweep.sh ... --k 8 --drafter block`:
# int4_sym plain 1.497 -> 1.556 ms (+4%, the routed decode pairs: unexplained, see BENCHMARKS.md) but the k = 8
# speculative step 2.488 -> 2.293 ms (-8%, the grouped verify kernel); mxfp4 plain 1.553 -> 1.500 (-3%), speculative
# 2.468 -> 2.500 (+1%, within run-to-run spread). `knobs.py quantize_model.EXPERT_LAYOUT=kn -- ...` goes back.
EXPERT_LAYOUT = {"int4_sym": "nk", "int4_asym": "nk", "mxfp4": "nk"}


def expert_layout(fmt: str) -> str:
    """The stored layout of `fmt` experts (EXPERT_LAYOUT; a plain string there applies to every format)."""
    table = EXPERT_LAYOUT
    return quant.check_layout(table if isinstance(table, str) else table.get(fmt, "kn"))


def is_expert_leaf(keys: tuple, ndim: int) -> bool:
    """A routed-expert weight: [*stack, E, K, N] under a layer's mlp (a dense MLP's weights have rank 2)."""
    return keys[0] == "layers" and keys[-1] in EXPERT_LEAVES and ndim - stack_axes(keys) == 3


def _is_expert(path, leaf) -> bool:
    return is_expert_leaf(path_keys(path), leaf.ndim)


def check_format(fmt: str | None, group_size: int) -> tuple[str, int]:
    """(format, group size) of a quant_experts choice; None / "none" -> ("none", 0); mxfp4 groups are 32."""
    fmt = fmt or "none"
    if fmt not in CHOICES:
        raise ConfigError(f"unknown expert quantization {fmt!r}; choose from {', '.join(CHOICES)}")
    if fmt == "none":
        return fmt, 0
    group_size = 32 if fmt == "mxfp4" else int(group_size)
    if group_size <= 0 or group_size % quant.PACK:
        raise ConfigError(f"quant_group {group_size} must be a positive multiple of {quant.PACK}")
    return fmt, group_size


def quantized_struct(struct, fmt: str, group_size: int, where: str = "", layout: str = "kn") -> quant.QuantizedWeight:
    """The QuantizedWeight (of jax.ShapeDtypeStruct arrays) that quantizing a weight struct [..., K, N] gives."""
    *lead, K, N = struct.shape
    try:
        quant._check(fmt, group_size, K, N)
    except ValueError as e:
        raise ConfigError(f"cannot quantize {where} to {fmt} g{group_size}: {e}") from None
    lead = tuple(lead)
    scale_dtype = jnp.uint8 if fmt == "mxfp4" else jnp.float16
    g = jax.ShapeDtypeStruct(lead + (K // group_size, N), scale_dtype)
    mins = jax.ShapeDtypeStruct(g.shape, jnp.float16) if fmt == "int4_asym" else None
    packed = lead + ((K // 2, N) if quant.check_layout(layout) == "kn" else (N, K // 2))
    return quant.QuantizedWeight(jax.ShapeDtypeStruct(packed, jnp.uint8), g, mins, fmt, group_size,
                                 (K, N), jnp.dtype(struct.dtype).name, layout)


def quantize_structs(structs, fmt: str, group_size: int, layout: str | None = None):
    """param_shapes(...) with every routed-expert leaf replaced by its quantized_struct (layout None: the
    format's expert_layout)."""
    if fmt == "none":
        return structs
    layout = layout or expert_layout(fmt)

    def q(path, s):
        return quantized_struct(s, fmt, group_size, jax.tree_util.keystr(path), layout) if _is_expert(path, s) else s

    return jax.tree_util.tree_map_with_path(q, structs)


def quantize_experts(params, fmt: str = "int4_sym", group_size: int = 128, layout: str | None = None):
    """params with every routed-expert weight [..., E, K, N] replaced by a QuantizedWeight (each expert quantized
    by quant.quantize_jit; a stack's quantized arrays are gathered on the host, then put back where it was), stored
    in `layout` (None: the format's expert_layout)."""
    fmt, group_size = check_format(fmt, group_size)
    if fmt == "none":
        return params
    layout = layout or expert_layout(fmt)

    def q(path, leaf):
        if not _is_expert(path, leaf):
            return leaf
        target = quantized_struct(leaf, fmt, group_size, jax.tree_util.keystr(path), layout)
        arrays = {name: np.zeros(s.shape, s.dtype) for name, s in
                  (("packed", target.packed), ("scales", target.scales), ("mins", target.mins)) if s is not None}
        for idx in itertools.product(*(range(n) for n in leaf.shape[:-2])):
            qw = quant.quantize_jit(leaf[idx], fmt=fmt, group_size=group_size, layout=layout)
            for name, buf in arrays.items():
                buf[idx] = np.asarray(getattr(qw, name))
        place = (lambda a: jax.device_put(a, leaf.sharding)) if isinstance(leaf, jax.Array) else jnp.asarray
        return dataclasses.replace(target, packed=place(arrays["packed"]), scales=place(arrays["scales"]),
                                   mins=place(arrays["mins"]) if "mins" in arrays else None)

    return jax.tree_util.tree_map_with_path(q, params)


# The dense weights MiMo-V2-Flash's hub checkpoint stores as FP8 e4m3 with 128 x 128 block scales: q/k/v and the dense
# MLP (o_proj, embeddings, lm_head and the router are bf16 / fp32 there; ../shared/MIMO_FACTS.md).
DENSE_FP8_LEAVES = ("wq", "wk", "wv", "w_gate", "w_up", "w_down")
# "fp8_all" adds the products the hub keeps in bf16 (an FP8 rounding of our own, as int4 experts are): o_proj and an
# untied lm_head, ~25% of mid_mimo's plain decode step on an H100 (BENCHMARKS.md, session 20). A tied lm_head stays
# the embedding (one table); the embeddings, router and MTP layers stay as they are.
# "fp8_layers": o_proj only (every projection of the layers in FP8, lm_head kept): on SmolLM2 most of fp8_all's
# change to the predictions came from its lm_head (KL 3.7e-2 for the lm_head alone, o_proj +0.2e-2 over fp8:
# BENCHMARKS.md, session 20).
DENSE_FP8_ALL_LEAVES = DENSE_FP8_LEAVES + ("wo",)


def _dense_format(fmt: str) -> str:
    if fmt not in DENSE_CHOICES:
        raise ConfigError(f"unknown dense weight format {fmt!r}; choose from {', '.join(DENSE_CHOICES)}")
    return fmt


def is_dense_fp8_leaf(keys: tuple, ndim: int, fmt: str = "fp8") -> bool:
    """Whether format `fmt` keeps this leaf in FP8: "fp8", a target layer's q/k/v or dense-MLP weight [*stack, K, N]
    (not a routed-expert stack, not the MTP layers); "fp8_layers", those and o_proj; "fp8_all", those, o_proj and
    the (untied) lm_head."""
    if fmt == "bf16":
        return False
    if fmt == "fp8_all" and keys == ("lm_head",):
        return ndim == 2
    names = DENSE_FP8_ALL_LEAVES if fmt in ("fp8_layers", "fp8_all") else DENSE_FP8_LEAVES
    return keys[0] == "layers" and keys[-1] in names and ndim - stack_axes(keys) == 2


def dense_structs(structs, fmt: str = "fp8", layout: str | None = None, block: int = fp8.BLOCK):
    """param_shapes(...) with the leaves quantize_dense converts as the Fp8Weight of jax.ShapeDtypeStructs it gives
    (the loader's targets: block = the checkpoint's scale blocks); fmt "bf16" returns structs."""
    if _dense_format(fmt) == "bf16":
        return structs
    quantized = functools.partial(fp8.quantize, block=block, layout=layout or fp8.LAYOUT)

    def q(path, s):
        return jax.eval_shape(quantized, s) if is_dense_fp8_leaf(path_keys(path), len(s.shape), fmt) else s

    return jax.tree_util.tree_map_with_path(q, structs)


def quantize_dense(params, fmt: str = "fp8"):
    """params with the weights the hub keeps in FP8 (DENSE_FP8_LEAVES; "fp8_layers": also o_proj; "fp8_all": also
    o_proj and lm_head) as fp8.Fp8Weight, quantized per 128 x 128 block as the hub's checkpoints were (fp8.quantize,
    one layer's matrix at a time); fmt "bf16" returns params.
    For a checkpoint that is FP8 already, the loader keeps its values instead (no second rounding)."""
    if _dense_format(fmt) == "bf16":
        return params

    def q(path, leaf):
        if isinstance(leaf, fp8.Fp8Weight) or not is_dense_fp8_leaf(path_keys(path), leaf.ndim, fmt):
            return leaf
        lead = leaf.shape[:-2]
        parts = [fp8.quantize_jit(leaf[idx]) for idx in itertools.product(*(range(n) for n in lead))]
        if not lead:
            return parts[0]
        stack = lambda name: jnp.stack([getattr(p, name) for p in parts]).reshape(  # noqa: E731
            *lead, *getattr(parts[0], name).shape)
        # back where the leaf was when the stored shapes match it ("kn"); an "nk" stack stays where quantize_jit put
        # it (a mesh's Engine places it by the sharding table)
        same = isinstance(leaf, jax.Array) and parts[0].layout == "kn"
        place = (lambda a: jax.device_put(a, leaf.sharding)) if same else (lambda a: a)
        return fp8.Fp8Weight(place(stack("w")), place(stack("scale")), parts[0].block, parts[0].layout)

    return jax.tree_util.tree_map_with_path(q, params, is_leaf=lambda x: isinstance(x, fp8.Fp8Weight))


def dequantize_experts(params, dtype=jnp.float32):
    """The same model with the quantized weights expanded back (the reference for equivalence tests)."""
    return jax.tree_util.tree_map(lambda w: quant.dequantize(w, dtype) if isinstance(w, quant.QuantizedWeight)
                                  else w, params, is_leaf=lambda w: isinstance(w, quant.QuantizedWeight))
