"""The matrix products the model uses, in one place so weight formats can change under them.

Weights are laid out "in, out": dense [K, N], experts [E, K, N]. A weight may be a plain array, a
quant.QuantizedWeight (int4 / MXFP4 with its metadata) or an fp8.Fp8Weight (a dense weight kept in the hub's FP8
with block scales); quantized products run the Pallas kernels on GPU and the XLA dequantize+dot path elsewhere
(quant.py, fp8.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import fp8, quant

# Dense weights streamed by the Pallas GEMV kernel at batch-1 decode (pallas_kernels/gemv.py): one token, bf16,
# 2^23 <= elements < 2^26. Measured on an H200 (BENCHMARKS.md): MiMo's fused q/k/v (4096 x 13568) 43 -> 35 us, o 21 -> 20
# us in the step. Kept on XLA's dot: weights of 2^26 elements and more (the lm_head, the dense MLP: 90-98% of the
# read ceiling already; the dense w_down, exactly 2^26, was 34.7 us through the kernel vs 33.5 on XLA),
# M > 1 (verify, prefill: at parity) and small layers such as SmolLM2's, which run as a scan over stacked weights:
# there a Pallas operand is a materialised slice of the stack (a copy per layer; XLA's dot reads the stack in
# place), and the kernel (~4 us) is no faster than XLA's multiply + reduce pair (1.395 -> 1.908 ms measured).
GEMV_ELEMENTS = (1 << 23, 1 << 26)
# Of those, the wide ones (N > K: MiMo's q/k/v) run as XLA's dot (a Triton GEMM) on x padded to GEMV_PAD_ROWS
# rows (0: the kernel). One H200, session 13: `bench_gemv.py --quick --ms 1 --pads 8,16`: 4096 x 14848 33.5 / 34.4 us
# padded to 8 / 16 rows (82 / 80% of the ceiling) vs 36.9 us in the kernel (74%), while narrow ones lose padded
# (8192 x 4096: 33.4 / 26.1 vs 26.6 us); mid_mimo int4 plain decode 1.528 -> 1.496 (8) / 1.493 ms (16).
GEMV_PAD_ROWS = 16
# Or (True) the wide ones through the kernel's tensor-core form (pallas_kernels.gemv.wide_dot_config: x as 16 rows,
# the loop's loads pipelined). One H200, session 16, `bench_gemv.py --quick --ms 1 --sweep`: 4096 x 13568 29.4 us
# and 4096 x 14848 32.4 us (~3.8 TB/s) vs XLA's one-row dot 45.2 / 44.6 us. In the step (session 18, one H200,
# mid_mimo int4 experts "nk", `knob_sweep.sh ... --k 8 --drafter block`): plain 1.556 -> 1.542 ms against the padded
# dot, the speculative step unchanged (2.293 / 2.294).
GEMV_WIDE_DOT = True


# Under a mesh (GSPMD-sharded weights: the GEMV kernel does not apply) a one-token product of a weight with
# >= GEMV_ELEMENTS[0] elements as XLA's dot on x padded to MESH_PAD_ROWS rows (0: the one-row dot). Measured
# only per product so far (`bench_gemv.py --quick --ms 1 --pads 8,16`, one H200, the per-GPU shapes of
# MiMo-V2-Flash on 2 GPUs): q/k/v 4096 x 7424 25.1 -> 20.6 us, o 4096 x 4096 17.0 -> 12.6 us at 8 rows, i.e.
# ~9 us per layer and GPU; off until a 2-GPU step measures it (knob_sweep.sh ops.MESH_PAD_ROWS=8).
MESH_PAD_ROWS = 0


def _one_token_bf16_on_gpu(x, w, mesh: bool) -> int:
    """Elements of w when x @ w is one bf16 token times a plain bf16 matrix on a GPU, on a mesh (mesh=True) or
    on one device; else 0."""
    from mimo_jax import sharding

    if jax.default_backend() != "gpu" or (sharding.expert_axis_size() > 1) != mesh:
        return 0
    if not isinstance(w, jax.Array) or w.ndim != 2 or w.dtype != jnp.bfloat16 or x.dtype != jnp.bfloat16:
        return 0
    return w.shape[0] * w.shape[1] if int(np.prod(x.shape[:-1])) == 1 else 0


def _pads_on_mesh(x, w) -> bool:
    return MESH_PAD_ROWS > 1 and _one_token_bf16_on_gpu(x, w, mesh=True) >= GEMV_ELEMENTS[0]


def _padded_dot(x, w, rows: int):
    """x [..., K] with one row in all, as XLA's dot on x padded to `rows` rows (a GEMM, not a one-row dot)."""
    K, N = w.shape
    xp = jnp.pad(x.reshape(1, K), ((0, rows - 1), (0, 0)))
    y = jnp.dot(xp, w.astype(x.dtype), preferred_element_type=jnp.float32)[:1]
    return y.astype(x.dtype).reshape(*x.shape[:-1], N)


def _use_gemv(x, w) -> bool:
    from pallas_kernels.gemv import supported

    n = _one_token_bf16_on_gpu(x, w, mesh=False)  # (a GSPMD-sharded weight must stay on XLA's dot)
    return GEMV_ELEMENTS[0] <= n < GEMV_ELEMENTS[1] and supported(1, *w.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutInWeight:
    """A dense weight stored "out, in": t is [..., N, K] for the product x [..., K] -> [..., N].

    Why (measured on an H200, `benchmarks/gemv_forms.py`, session 10): XLA runs a one-token product with a small
    weight (< 2^23 elements) as a multiply that writes the f32 product [K, N] to memory plus a column reduction
    that reads it back; with the weight stored [N, K] the reduction runs over the minor axis and XLA fuses the
    multiply into it (a SmolLM2-shaped MLP layer 17.0 -> 10.5 us, 8 -> 6 kernels)."""
    t: jax.Array

    @property
    def shape(self):
        return (*self.t.shape[:-2], self.t.shape[-1], self.t.shape[-2])

    @property
    def dtype(self):
        return self.t.dtype

    @property
    def ndim(self):
        return self.t.ndim


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FoldedNorm:
    """An RMSNorm whose scale out_in_layout(fold_norms=True) folded into the OutInWeights that read its output:
    the layer hands on Normed(x, r) and each product computes (x @ (scale * W)) * r, so no kernel writes the
    normalized activations. No leaves (a scan over stacked layers carries it as structure)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Normed:
    """Activations x [..., K] whose RMSNorm is pending: x * r (r [..., 1], f32) times a scale that was folded into
    the weights (FoldedNorm). Only `matmul` with an OutInWeight consumes it."""
    x: jax.Array
    r: jax.Array

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype


def rms_scale(x, eps):
    """1 / RMS(x) over the last axis, f32 [..., 1] (what layers.rms_norm multiplies x by)."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


# Dense weights turned "out, in" by `out_in_layout` (the decode step on one GPU): the projections of attention
# and of a dense MLP, with fewer than OUT_IN_ELEMENTS elements per layer (larger ones XLA runs as GEMMs, which
# read either layout at full speed).
OUT_IN_KEYS = ("wq", "wk", "wv", "wo", "wqkv", "w_gate", "w_up", "w_down", "w_gate_up")
OUT_IN_ELEMENTS = 1 << 23


# out_in_layout(fuse=True) concatenates these first (one product for q/k/v, one for gate/up; the unrolled layout
# does it already). fold_norms=True: each pre-norm's scale folded into the out-in weights that read it (FoldedNorm),
# so the normalized activations are not written by a kernel of their own. Measured on one H200 (SmolLM2 shapes,
# scan, 8 steps per dispatch, session 11): out-in alone 0.990 ms/token, + fuse 0.872, + fold 0.922, + both 0.840.
# The Engine fuses and folds, for the plain step only: speculative generation (its prompt pass and its steps) runs
# on its own unfolded params (engine.SPEC_LAYOUT). With the prompt pass folded, the shipped drafters accepted fewer
# chat drafts on the real SmolLM2 (bf16; block 1.68 -> 1.42-1.52 per step, MTP 2.09 -> 1.72), although the folded
# logits are as close to f32 as the unfolded ones; with the prompt pass on the step's params: 1.68, unchanged
# (BENCHMARKS.md sessions 11-12). Plain step at 4 per dispatch: 0.817 -> 0.777 ms/token with the fold.
# Under a mesh (tensor-parallel attention, GSPMD) the same layout is OUT_IN_ON_MESH: off until measured. The
# MiMo-V2-Flash step on 2 x H200 (session 12's optimized HLO) runs each sliding layer's k and v products, [4096,
# 768] and [4096, 512] per GPU, as exactly the multiply that writes f32 [K, N] plus a column reduction: 27.7 of
# the 45 us of attention kernels per layer and GPU. A/B: benchmarks/knobs.py ops.OUT_IN_ON_MESH=1 -- ...
OUT_IN_ON_MESH = False
# A MoE block's router ([H, E] float32) stored out-in too (OUT_IN_ROUTER). XLA ran each router product as a
# multiply writing f32 [H, E] plus a column reduction (MiMo-V2-Flash on 2 x H200, session 12's HLO: ~12 us per layer
# and GPU). Measured on one H200 (session 13, mid_mimo int4, plain decode, 4 per dispatch): router 75 -> 26 us per
# step, 1.571 -> 1.526 ms/token. (Under a mesh only with OUT_IN_ON_MESH.)
OUT_IN_ROUTER = True
FUSE_GROUPS = (("wqkv", ("wq", "wk", "wv")), ("w_gate_up", ("w_gate", "w_up")))
OUT_IN_FUSE = True
OUT_IN_FOLD_NORMS = True
NORM_READERS = (("attn_norm", "attn", ("wq", "wk", "wv", "wqkv")), ("mlp_norm", "mlp", ("w_gate", "w_up", "w_gate_up")))


def _fuse(node: dict) -> dict:
    out = dict(node)
    for name, parts in FUSE_GROUPS:
        ws = [node.get(k) for k in parts]
        if all(isinstance(w, jax.Array) and len(w.sharding.device_set) == 1 for w in ws):
            for k in parts:
                del out[k]
            out[name] = jnp.concatenate(ws, axis=-1)
    return out


def _goes_out_in(w) -> bool:
    return isinstance(w, jax.Array) and w.ndim >= 2 and int(np.prod(w.shape[-2:])) < OUT_IN_ELEMENTS


def _fold_norms(layer: dict, fuse: bool) -> dict:
    """A layer's pre-norm scales multiplied into the rows of the weights that read the normalized activations,
    where all of them go out-in (a MoE block's router and experts read the real ones: its norm stays). fuse: the
    blocks are fused first, so the check sees the matrices that will be stored."""
    out = dict(layer)
    for norm, sub, names in NORM_READERS:
        block, scale = layer.get(sub), layer.get(norm)
        if fuse and isinstance(block, dict) and "router" not in block:
            block = _fuse(block)
        if not isinstance(block, dict) or "router" in block or not isinstance(scale, jax.Array):
            continue
        ws = {k: block[k] for k in names if k in block}
        if ws and all(_goes_out_in(w) for w in ws.values()):
            out[sub] = {**block, **{k: w * scale[..., :, None].astype(w.dtype) for k, w in ws.items()}}
            out[norm] = FoldedNorm()
    return out


def out_in_layout(params: dict, fuse: bool = False, fold_norms: bool = False) -> dict:
    """params with every plain dense weight of the target's layers (params["layers"], or ["unrolled"]) named in
    OUT_IN_KEYS and smaller than OUT_IN_ELEMENTS per layer stored as OutInWeight (stacks [L, K, N] -> [L, N, K]);
    fuse: q/k/v and gate/up concatenated first (FUSE_GROUPS); fold_norms: pre-norm scales folded into the weights
    that read them (FoldedNorm; the layer then hands on Normed activations). MoE blocks (a dict with a router:
    their expert stacks share the names), quantized weights and weights already converted are left as they are.
    Returns new containers; the products are unchanged."""
    def walk(node, key=None):
        if isinstance(node, dict):
            if "router" in node:  # a MoE block: its expert stacks share the dense names; only the router may turn
                router = node["router"]
                convert = OUT_IN_ROUTER and _goes_out_in(router)
                return {**node, "router": OutInWeight(jnp.swapaxes(router, -1, -2))} if convert else node
            node = _fold_norms(node, fuse) if fold_norms and "attn" in node else node
            return {k: walk(v, k) for k, v in (_fuse(node) if fuse else node).items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        if key in OUT_IN_KEYS and _goes_out_in(node):
            return OutInWeight(jnp.swapaxes(node, -1, -2))
        return node

    layers = "unrolled" if "unrolled" in params else "layers"  # (unrolled: "layers" keeps only expert stacks)
    return {k: walk(v) if k == layers else v for k, v in params.items()}


def matmul(x, w):
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype (f32 accumulation)."""
    if isinstance(x, Normed):  # (x.x @ (scale * W)) * r: the norm's scale is in w (FoldedNorm)
        if not isinstance(w, OutInWeight):
            raise TypeError(f"Normed activations need an OutInWeight (the norm's scale folded in), got {type(w).__name__}")
        y = jnp.einsum("...k,nk->...n", x.x, w.t.astype(x.x.dtype), preferred_element_type=jnp.float32)
        return (y * x.r).astype(x.dtype)
    if isinstance(w, quant.QuantizedWeight):
        return quant.qmatmul(x, w)
    if isinstance(w, fp8.Fp8Weight):
        return fp8.matmul(x, w)
    if isinstance(w, OutInWeight):
        return jnp.einsum("...k,nk->...n", x, w.t.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if _use_gemv(x, w):
        from pallas_kernels.gemv import gemv, wide_dot_config

        K, N = w.shape
        cfg = None
        if N > K and GEMV_WIDE_DOT:
            cfg = wide_dot_config(K, N)
        elif GEMV_PAD_ROWS > 1 and N > K:
            return _padded_dot(x, w, GEMV_PAD_ROWS)
        return gemv(x.reshape(1, -1), w, cfg=cfg).reshape(*x.shape[:-1], N)
    if _pads_on_mesh(x, w):
        return _padded_dot(x, w, MESH_PAD_ROWS)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def ragged_matmul(x, w, group_sizes):
    """Rows of x [M, K] sorted by expert; group_sizes [E] rows per expert; w [E, K, N] -> [M, N].
    Rows past sum(group_sizes) come out zero.

    With fewer rows than experts (decode, verify) each row gathers its expert's matrix: XLA's GPU ragged_dot
    reads every expert (measured on an H200: 23 ms/token for 7 MoE layers of 64 experts, BENCHMARKS.md)."""
    if isinstance(w, quant.QuantizedWeight):
        return quant.ragged_qmatmul(x, w, group_sizes)
    m, e = x.shape[0], w.shape[0]
    if m < e:
        expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")  # e past the groups
        rows_w = jnp.take(w, jnp.minimum(expert, e - 1), axis=0).astype(x.dtype)
        y = jnp.einsum("mk,mkn->mn", x, rows_w, preferred_element_type=jnp.float32)
        return jnp.where((expert < e)[:, None], y, 0.0).astype(x.dtype)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes,
                              preferred_element_type=jnp.float32).astype(x.dtype)


def ragged_swiglu_in(x, w_gate, w_up, group_sizes):
    """SiLU(x @ w_gate) * (x @ w_up) per expert group (one fused kernel when both are quantized)."""
    if isinstance(w_gate, quant.QuantizedWeight):
        return quant.ragged_qmatmul_gate_up(x, w_gate, w_up, group_sizes)
    return jax.nn.silu(ragged_matmul(x, w_gate, group_sizes)) * ragged_matmul(x, w_up, group_sizes)


def pair_matmul(x, w, experts, busy_rows: int | None = None):
    """Row r of x [M, K] times expert experts[r] of w [E, K, N] -> [M, N] (an id >= E: a zero row); rows in
    any order, no sort. For rows whose experts are distinct (one token's top-k), each expert is read once.
    busy_rows: rows expected not to skip (quant.pair_qmatmul)."""
    return quant.pair_qmatmul(x, w, experts, busy_rows=busy_rows)


def pair_swiglu_in(x, w_gate, w_up, experts, busy_rows: int | None = None):
    """SiLU(x @ w_gate[e]) * (x @ w_up[e]) per row (see pair_matmul); one kernel when both are quantized, or both
    unquantized and the pair GEMV kernel takes them (quant.float_pairs_take_kernel)."""
    if isinstance(w_gate, quant.QuantizedWeight) or quant.float_pairs_take_kernel(w_gate, w_up):
        return quant.pair_qmatmul_gate_up(x, w_gate, w_up, experts, busy_rows=busy_rows)
    return jax.nn.silu(pair_matmul(x, w_gate, experts)) * pair_matmul(x, w_up, experts)
