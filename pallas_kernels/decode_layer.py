"""A decode step's layer (one token, batch 1) in three Pallas kernels instead of ~28 XLA kernels.

Batch-1 decode of a small layer is bound by the number of kernels, not by bytes (benchmarks/profile_step.py:
SmolLM2-135M shapes ran 28 kernels per layer of ~2 us each for ~2 us worth of weights). Here a layer is:

  attn_in    RMSNorm(x) -> q, k, v for one head per program -> partial RoPE (rotate-half on the first
             rope_dim dims) -> value scale; q to a small buffer, k and v written into the cache slot
             (full cache: slot = position; sliding ring: slot = position % R, R > window).
  attn_out   one program per block of output columns: attention of every head over its cache (online
             softmax over key blocks, sink logit in the denominator, window mask from the slot positions),
             then those heads' rows of W_o for this block of columns, plus the residual.
  mlp        one program per block of the intermediate dim: RMSNorm(x) -> gate/up -> SiLU(gate) * up ->
             that block's rows of W_down, added atomically into the residual accumulator that attn_out
             filled with x (float atomics: the summation order, and so the last bits, vary run to run).

The residual stream between kernels is one float32 vector [H].
Why this shape: the first version (a residual of summed partials, per-chunk reductions, tensor-core dots
for W_o) ran ~25 us per kernel on an H200: a program's time went to serialised block-wide reductions and
dependent loads, not bytes. Reductions are now once per output (accumulate elementwise, reduce at the end).
Weights and caches are the model's whole stacks ([L, ...], flattened over the plan's leading axes) and the
layer index is an operand, so no per-layer slice is ever copied and every layer runs the same kernels.
The caches are updated in place (input_output_aliases).

Shapes the kernels need (else the model keeps the XLA path): H, rope_dim / 2, D - rope_dim (or 0), Dv and
the intermediate block powers of two or multiples of the K block; see `supported`.
`reference_*` are the same functions in jnp (the CPU path's oracle in tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32, BF16 = jnp.float32, jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of one kind of attention layer plus the MLP, and the kernels' block sizes."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    rope_dim: int
    rope_theta: float
    window: int | None          # None = full attention
    sink: bool
    value_scale: float
    eps: float
    intermediate: int = 0       # dense MLP width (0: no fused MLP)
    bk: int = 64                # K block of the GEMVs over the hidden dim
    bn: int = 64                # output columns per attn_out program
    bi: int = 32                # intermediate columns per mlp program
    bs: int = 64                # keys per attention block

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def group_pad(self) -> int:  # q rows per kv head, padded for the tensor-core dot (>= 16)
        return max(16, 1 << (self.group - 1).bit_length())


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(g: Geometry) -> str | None:
    """None if the kernels take this geometry, else why not."""
    half, rest = g.rope_dim // 2, g.head_dim - g.rope_dim
    checks = [(g.hidden % g.bk == 0 and _pow2(g.bk), f"hidden {g.hidden} not a multiple of bk {g.bk}"),
              (g.hidden % g.bn == 0 and _pow2(g.bn), f"hidden {g.hidden} not a multiple of bn {g.bn}"),
              (_pow2(half) and half >= 16, f"rope_dim/2 = {half} not a power of two >= 16"),
              (rest == 0 or (_pow2(rest) and rest >= 16), f"head_dim - rope_dim = {rest} not 0 or a power of two"),
              (_pow2(g.v_head_dim) and g.v_head_dim >= 16, f"v_head_dim {g.v_head_dim} not a power of two"),
              (g.num_heads % g.num_kv_heads == 0, "heads not a multiple of kv heads"),
              (not g.intermediate or g.intermediate % g.bi == 0, f"intermediate not a multiple of bi {g.bi}")]
    for ok, why in checks:
        if not ok:
            return why
    return None


def _inv_freq(g: Geometry):
    half = g.rope_dim // 2
    return jnp.exp(jnp.arange(half, dtype=F32) * (-2.0 * math.log(g.rope_theta) / g.rope_dim))


def _rope(y1, y2, pos, g: Geometry):
    """Rotate-half on a head's first rope_dim dims: y1 = dims [0, half), y2 = [half, rope_dim); f32."""
    ang = pos.astype(F32) * _inv_freq(g)
    c, s = jnp.cos(ang), jnp.sin(ang)
    return y1 * c - y2 * s, y2 * c + y1 * s


def key_block(size: int, bs: int) -> int:
    """The largest power of two <= bs dividing the cache length (>= 16: the dot's minimum), else 0."""
    while bs >= 16 and size % bs:
        bs //= 2
    return bs if bs >= 16 else 0


def _slot(pos, g: Geometry, size: int):
    return pos if g.window is None else pos % size


def _key_positions(slots, pos, g: Geometry, size: int):
    """Position held by each cache slot after `pos` was written (-1: none) and whether the query sees it."""
    if g.window is None:
        return slots, slots <= pos
    kpos = pos - jnp.mod(pos - slots, size)
    return kpos, (kpos >= 0) & (kpos >= pos - g.window)


# --------------------------------------------------------------------------- kernel bodies

def _load_x(x_ref, k0, size):
    return x_ref[pl.ds(k0, size)]


UNROLL = 16  # loops of up to this many K blocks are unrolled: their loads are independent and issue together


def _aligned(v, m: int):
    """An offset known to be a multiple of m (a Python int when the loop is unrolled)."""
    return v if isinstance(v, int) else pl.multiple_of(v, m)


def _loop(n: int, body, init):
    """fori_loop(0, n, body, init), unrolled in Python when short (a latency-bound loop of dependent loads
    costs ~1 us per iteration on one SM; unrolled, the loads of all iterations are in flight at once)."""
    if n <= UNROLL:
        carry = init
        for i in range(n):
            carry = body(i, carry)
        return carry
    return jax.lax.fori_loop(0, n, body, init)


def _normed_input(x_ref, nw_ref, layer, hidden, bk, eps, traced: bool = False):
    """k-block i -> rmsnorm(x)[block i] as f32 [bk, 1] (bf16-rounded as the model rounds it). The sum of
    squares accumulates elementwise and reduces once (each reduction is a block-wide barrier). traced: i may be
    a loop index (x's blocks are loaded again then, not kept in registers)."""
    n = hidden // bk
    if n <= UNROLL and not traced:  # x read once, kept in registers
        xs = [_load_x(x_ref, i * bk, bk) for i in range(n)]
        sq = xs[0] * xs[0]
        for x in xs[1:]:
            sq = sq + x * x
        get = lambda i: xs[i]
    else:
        get = lambda i: _load_x(x_ref, pl.multiple_of(i * bk, bk), bk)
        sq = jax.lax.fori_loop(0, n, lambda i, acc: acc + get(i) * get(i), jnp.zeros((bk,), F32))
    rstd = jax.lax.rsqrt(jnp.sum(sq) / hidden + eps)

    def block(i):
        k0 = _aligned(i * bk, bk)
        xn = (get(i) * rstd).astype(BF16)
        return (nw_ref[layer, pl.ds(k0, bk)] * xn).astype(F32)[:, None]
    return block


def _normed_gemv(block, layer, cols, hidden, bk):
    """sum_k xn[k] * w[layer, k, c0 + c] for each (w_ref, c0, width) in cols -> one f32 vector each.
    FMAs into a [bk, width] accumulator in the weight tile's own layout, one reduction over K at the end."""
    def body(i, accs):
        k0 = _aligned(i * bk, bk)
        xn = block(i)
        return tuple(a + xn * w_ref[layer, pl.ds(k0, bk), pl.ds(c0, width)].astype(F32)
                     for a, (w_ref, c0, width) in zip(accs, cols))
    init = tuple(jnp.zeros((bk, width), F32) for _, _, width in cols)
    return [jnp.sum(a, axis=0) for a in _loop(hidden // bk, body, init)]


def _attn_in_kernel(layer_ref, pos_ref, x_ref, nw_ref, wq_ref, wk_ref, wv_ref, q_in, k_in, v_in,
                    q_ref, k_ref, v_ref, *, g: Geometry):
    del q_in, k_in, v_in  # aliased to q_ref / k_ref / v_ref
    j = pl.program_id(0)
    layer, pos = layer_ref[0], pos_ref[0]
    block = _normed_input(x_ref, nw_ref, layer, g.hidden, g.bk, g.eps, traced=DOTS)
    gemv = lambda cols: (_normed_gemv_dot if DOTS else _normed_gemv)(block, layer, cols, g.hidden, g.bk)  # noqa: E731
    half, d, dv = g.rope_dim // 2, g.head_dim, g.v_head_dim
    slot = _slot(pos, g, k_ref.shape[2])

    def rope_head(w_ref, head):
        c0 = head * d
        cols = [(w_ref, c0, half), (w_ref, c0 + half, half)] + (
            [(w_ref, c0 + g.rope_dim, d - g.rope_dim)] if d > g.rope_dim else [])
        ys = gemv(cols)
        # the model rounds the projection to bf16 before RoPE
        ys = [y.astype(BF16).astype(F32) for y in ys]
        o1, o2 = _rope(ys[0], ys[1], pos, g)
        return [o1, o2] + ys[2:]

    def store_parts(ref, idx, parts):
        off = 0
        for p in parts:
            ref[(*idx, pl.ds(off, p.shape[0]))] = p.astype(ref.dtype)
            off += p.shape[0]

    @pl.when(j < g.num_heads)
    def _q():
        store_parts(q_ref, (j // g.group, j % g.group), rope_head(wq_ref, j))

    @pl.when((j >= g.num_heads) & (j < g.num_heads + g.num_kv_heads))
    def _k():
        h = j - g.num_heads
        store_parts(k_ref, (layer, 0, slot, h), rope_head(wk_ref, h))

    @pl.when(j >= g.num_heads + g.num_kv_heads)
    def _v():
        h = j - g.num_heads - g.num_kv_heads
        (y,) = gemv([(wv_ref, h * dv, dv)])
        y = y.astype(BF16)
        if g.value_scale != 1.0:
            y = y * jnp.asarray(g.value_scale, BF16)
        v_ref[layer, 0, slot, h, :] = y.astype(v_ref.dtype)


def _qk_parts(g: Geometry):
    half = g.rope_dim // 2
    parts = [(0, half), (half, half)]
    if g.head_dim > g.rope_dim:
        parts.append((g.rope_dim, g.head_dim - g.rope_dim))
    return parts


def _attend_head(q_ref, k_ref, v_ref, sink_ref, layer, pos, h, g: Geometry):
    """Attention of kv head h's q rows [GP, Dv] (normalised, bf16-rounded as the model does)."""
    size = k_ref.shape[2]
    gp, dv, bs = g.group_pad, g.v_head_dim, key_block(size, g.bs)
    qs = [q_ref[h, :, pl.ds(o, w)] for o, w in _qk_parts(g)]
    scale = g.head_dim ** -0.5

    def body(b, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(b * bs, bs)
        s = jnp.zeros((gp, bs), F32)
        for q, (o, w) in zip(qs, _qk_parts(g)):
            kb = k_ref[layer, 0, pl.ds(s0, bs), h, pl.ds(o, w)]
            s = s + jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        _, visible = _key_positions(s0 + jnp.arange(bs), pos, g, size)
        s = jnp.where(visible[None, :], s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m - m_safe)
        vb = v_ref[layer, 0, pl.ds(s0, bs), h, :]
        acc = acc * corr[:, None] + jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=F32)
        return m_new, l * corr + jnp.sum(p, axis=1), acc

    n_blocks = size // bs if g.window is not None else jnp.minimum(size // bs, pos // bs + 1)
    init = (jnp.full((gp,), -jnp.inf, F32), jnp.zeros((gp,), F32), jnp.zeros((gp, dv), F32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    if g.sink:
        sk = sink_ref[layer, h, :].astype(F32)  # [GP]
        m_all = jnp.maximum(m, sk)
        w = jnp.exp(m - m_all)
        l = l * w + jnp.exp(sk - m_all)
        acc = acc * w[:, None]
    return (acc / jnp.maximum(l, jnp.finfo(F32).tiny)[:, None]).astype(BF16)


def _attn_out_kernel(layer_ref, pos_ref, x_ref, q_ref, k_ref, v_ref, sink_ref, wo_ref, out_ref, acc_ref, o_ref,
                     *, g: Geometry, interpret: bool):
    """Attention of every head (tensor-core dots per kv head) into a per-program scratch, one barrier, then
    this block of W_o columns as FMAs into a [Dv, bn] accumulator reduced once; + the residual."""
    pid = pl.program_id(0)
    n0 = pl.multiple_of(pid * g.bn, g.bn)
    layer, pos = layer_ref[0], pos_ref[0]
    dv = g.v_head_dim

    def head(h, carry):
        o_ref[pid, h, :, :] = _attend_head(q_ref, k_ref, v_ref, sink_ref, layer, pos, h, g)
        return carry
    _loop(g.num_kv_heads, head, 0)
    if not interpret:
        plgpu.debug_barrier()  # the rows written above, read below by other threads of this program

    def member(j, acc):
        h, i = (j // g.group, j % g.group) if isinstance(j, int) else (jax.lax.div(j, g.group), jax.lax.rem(j, g.group))
        o = o_ref[pid, h, i, :].astype(F32)[:, None]                          # [Dv, 1]
        return acc + o * wo_ref[layer, pl.ds(_aligned(j * dv, dv), dv), pl.ds(n0, g.bn)].astype(F32)

    def member_dot(j, acc):  # DOTS: head j's row of o (as row 0 of 16) times its rows of W_o
        o = _as_rows(o_ref[pid, jax.lax.div(j, g.group), jax.lax.rem(j, g.group), :])
        return acc + jnp.dot(o, wo_ref[layer, pl.ds(pl.multiple_of(j * dv, dv), dv), pl.ds(n0, g.bn)],
                             preferred_element_type=F32)
    if DOTS:
        y = _row0(jax.lax.fori_loop(0, g.num_heads, member_dot, jnp.zeros((_FIRST, g.bn), F32)))
    else:
        y = jnp.sum(_loop(g.num_heads, member, jnp.zeros((dv, g.bn), F32)), axis=0)
    # the model rounds the attention output to bf16 before the residual add
    x = _load_x(x_ref, n0, g.bn) + y.astype(BF16).astype(F32)
    out_ref[pl.ds(n0, g.bn)] = x
    acc_ref[pl.ds(n0, g.bn)] = x


def _swiglu_act(gate, up):
    """SiLU(gate) * up of f32 GEMV outputs, each rounded to bf16 as the model's matmuls round them; the
    elementwise math in f32 (the Triton lowering has no bf16 division), the product rounded to bf16."""
    gate, up = gate.astype(BF16).astype(F32), up.astype(BF16).astype(F32)
    return (gate * jax.nn.sigmoid(gate) * up).astype(BF16)


# DOTS: the kernels' products (attn_in's q/k/v, attn_out's W_o, the MLP's gate/up and down) as 16-row tensor-core
# dots (row 0 the token, the rest zeros) in loops that Triton pipelines (DOT_STAGES): Triton pipelines only loads
# that feed a dot, and the FMA form's weight loads each wait a memory latency (offline SASS, BENCHMARKS.md
# session 13). Timed (one H200, session 16, `bench_fused.py --config configs/smollm2_135m.json --profile [--dots]`,
# us per call): attn_in 16.0 -> 9.1, attn_out 30.6 -> 15.2, mlp 22.4 -> 17.9; the fused step 1.924 -> 1.229 ms/token
# (XLA's path in the same run: 1.198), greedy tokens identical. On by default.
DOTS = True
DOT_STAGES = 3
_FIRST = 16  # rows of the padded dot


def _row0(a):
    return jnp.sum(jnp.where((jnp.arange(_FIRST) == 0)[:, None], a, 0.0), axis=0)


def _as_rows(v):
    """[n] -> [16, n] bf16, v in row 0 and zeros below (the dot's A operand)."""
    return jnp.where((jnp.arange(_FIRST) == 0)[:, None], v[None, :].astype(F32), 0.0).astype(BF16)


def _normed_gemv_dot(block, layer, cols, hidden, bk):
    """_normed_gemv as dots in a loop (block: _normed_input(..., traced=True))."""
    def body(i, accs):
        k0 = pl.multiple_of(i * bk, bk)
        xr = _as_rows(block(i)[:, 0])
        return tuple(a + jnp.dot(xr, w_ref[layer, pl.ds(k0, bk), pl.ds(c0, width)], preferred_element_type=F32)
                     for a, (w_ref, c0, width) in zip(accs, cols))
    init = tuple(jnp.zeros((_FIRST, width), F32) for _, _, width in cols)
    return [_row0(a) for a in jax.lax.fori_loop(0, hidden // bk, body, init)]


def _mlp_dot(x_ref, nw_ref, wg_ref, wu_ref, wd_ref, acc_ref, layer, c0, g: Geometry):
    """_mlp_kernel's body with the products as dots: gate/up over K blocks, then W_down's [bi, bn] blocks, each
    block's row added atomically into the residual accumulator."""
    block = _normed_input(x_ref, nw_ref, layer, g.hidden, g.bk, g.eps, traced=True)
    gate, up = _normed_gemv_dot(block, layer, [(wg_ref, c0, g.bi), (wu_ref, c0, g.bi)], g.hidden, g.bk)
    hr = _as_rows(_swiglu_act(gate, up))

    def down(b, carry):
        n0 = pl.multiple_of(b * g.bn, g.bn)
        y = jnp.dot(hr, wd_ref[layer, pl.ds(c0, g.bi), pl.ds(n0, g.bn)], preferred_element_type=F32)
        plgpu.atomic_add(acc_ref, (pl.ds(n0, g.bn),), _row0(y))
        return carry
    jax.lax.fori_loop(0, g.hidden // g.bn, down, 0)


def _mlp_kernel(layer_ref, x_ref, acc_in, nw_ref, wg_ref, wu_ref, wd_ref, acc_ref, *, g: Geometry):
    del acc_in  # aliased to acc_ref
    i = pl.program_id(0)
    layer = layer_ref[0]
    c0 = pl.multiple_of(i * g.bi, g.bi)
    if DOTS:
        return _mlp_dot(x_ref, nw_ref, wg_ref, wu_ref, wd_ref, acc_ref, layer, c0, g)
    block = _normed_input(x_ref, nw_ref, layer, g.hidden, g.bk, g.eps)
    gate, up = _normed_gemv(block, layer, [(wg_ref, c0, g.bi), (wu_ref, c0, g.bi)], g.hidden, g.bk)
    h = _swiglu_act(gate, up).astype(F32)[:, None]

    def body(b, carry):
        n0 = _aligned(b * g.bn, g.bn)
        w = wd_ref[layer, pl.ds(c0, g.bi), pl.ds(n0, g.bn)].astype(F32)
        plgpu.atomic_add(acc_ref, (pl.ds(n0, g.bn),), jnp.sum(h * w, axis=0))
        return carry
    _loop(g.hidden // g.bn, body, 0)


# --------------------------------------------------------------------------- entry points

# Pipeline stages of attn_out's loop over key blocks. At 1 (as measured so far) each block's K/V loads wait a
# full memory latency: read offline from its SASS, 12 dependent round trips per program for SmolLM2 (4 blocks x
# 3 kv heads), about its 30 us per call. At 3 (one H200, session 16, FMA form): 30.6 -> 14.1 us per call, the
# fused step 1.924 -> 1.543 ms/token; with DOTS (15.2 us at 1) the pair is untimed, so this stays 1 for now.
ATTN_OUT_STAGES = 1


def _call(kernel, grid, out_shape, interpret, aliases=None, num_warps=4, num_stages=1):
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret,
                          input_output_aliases=aliases or {},
                          compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))


@functools.partial(jax.jit, static_argnames=("g", "interpret"))
def attn_in(layer, pos, x, norm_w, wq, wk, wv, q_buf, cache_k, cache_v, *, g: Geometry, interpret: bool = False):
    """-> (q_buf [Hkv, GP, D] with this layer's q, cache_k, cache_v with position `pos` written at `layer`).

    layer, pos: int32 [1]; x [H] f32; norm_w [L, H]; wq [L, H, Hq*D]; wk [L, H, Hkv*D]; wv [L, H, Hkv*Dv];
    cache_k [L, 1, S, Hkv, D]; cache_v [L, 1, S, Hkv, Dv]."""
    out_shape = (jax.ShapeDtypeStruct(q_buf.shape, q_buf.dtype), jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                 jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype))
    return _call(functools.partial(_attn_in_kernel, g=g), (g.num_heads + 2 * g.num_kv_heads,), out_shape,
                 interpret, {7: 0, 8: 1, 9: 2}, num_stages=DOT_STAGES if DOTS else 1)(
        layer, pos, x, norm_w, wq, wk, wv, q_buf, cache_k, cache_v)


@functools.partial(jax.jit, static_argnames=("g", "interpret"))
def attn_out(layer, pos, x, q_buf, cache_k, cache_v, sink, wo, *, g: Geometry, interpret: bool = False):
    """x + attention(...) @ W_o -> (x_mid [H] f32, the same again as the MLP's accumulator).
    sink [L, Hkv, GP] f32 (`sink_table`; ignored unless g.sink); wo [L, Hq*Dv, H]."""
    programs = g.hidden // g.bn
    kernel = functools.partial(_attn_out_kernel, g=g, interpret=interpret)
    out_shape = (jax.ShapeDtypeStruct((g.hidden,), F32), jax.ShapeDtypeStruct((g.hidden,), F32),
                 jax.ShapeDtypeStruct((programs, g.num_kv_heads, g.group_pad, g.v_head_dim), BF16))  # scratch
    x_mid, acc, _ = _call(kernel, (programs,), out_shape, interpret,
                          num_stages=max(ATTN_OUT_STAGES, DOT_STAGES if DOTS else 1))(
        layer, pos, x, q_buf, cache_k, cache_v, sink, wo)
    return x_mid, acc


@functools.partial(jax.jit, static_argnames=("g", "interpret"))
def mlp(layer, x, acc, norm_w, w_gate, w_up, w_down, *, g: Geometry, interpret: bool = False):
    """acc + SwiGLU(RMSNorm(x)) [H] f32: each program adds its block's share of the down projection into acc
    atomically (acc arrives holding x: the residual). x, acc [H] f32."""
    kernel = functools.partial(_mlp_kernel, g=g)
    return _call(kernel, (g.intermediate // g.bi,), jax.ShapeDtypeStruct((g.hidden,), F32), interpret, {2: 0},
                 num_stages=DOT_STAGES if DOTS else 1)(
        layer, x, acc, norm_w, w_gate, w_up, w_down)


def sink_table(sink, g: Geometry):
    """Sinks [L, Hq] -> [L, Hkv, GP] f32 (padded rows 0), the layout attn_out reads; zeros when g.sink is off."""
    if not g.sink:
        return jnp.zeros((1, g.num_kv_heads, g.group_pad), F32)
    s = sink.astype(F32).reshape(sink.shape[0], g.num_kv_heads, g.group)
    return jnp.pad(s, ((0, 0), (0, 0), (0, g.group_pad - g.group)))


def _rms(x, w, eps):
    xf = x * jax.lax.rsqrt(jnp.mean(x * x) + eps)
    return w * xf.astype(BF16)


def reference_attn_in(layer, pos, x, norm_w, wq, wk, wv, q_buf, cache_k, cache_v, *, g: Geometry):
    l, p = layer[0], pos[0]
    xn = _rms(x, norm_w[l], g.eps).astype(BF16)

    def proj(w, heads, d):
        return jnp.dot(xn, w[l].astype(BF16), preferred_element_type=F32).astype(BF16).reshape(heads, d)

    def rope(y):
        half = g.rope_dim // 2
        y = y.astype(F32)
        o1, o2 = _rope(y[:, :half], y[:, half:g.rope_dim], p, g)
        return jnp.concatenate([o1, o2, y[:, g.rope_dim:]], axis=1).astype(BF16)

    q = rope(proj(wq, g.num_heads, g.head_dim)).reshape(g.num_kv_heads, g.group, g.head_dim)
    k = rope(proj(wk, g.num_kv_heads, g.head_dim))
    v = proj(wv, g.num_kv_heads, g.v_head_dim)
    if g.value_scale != 1.0:
        v = v * jnp.asarray(g.value_scale, BF16)
    slot = _slot(p, g, cache_k.shape[2])
    q_buf = q_buf.at[:, :g.group].set(q.astype(q_buf.dtype))
    return (q_buf, cache_k.at[l, 0, slot].set(k.astype(cache_k.dtype)),
            cache_v.at[l, 0, slot].set(v.astype(cache_v.dtype)))


def reference_attn_out(layer, pos, x, q_buf, cache_k, cache_v, sink, wo, *, g: Geometry):
    l, p = layer[0], pos[0]
    size = cache_k.shape[2]
    q = q_buf[:, :g.group].astype(BF16)                     # [Hkv, G, D]
    k, v = cache_k[l, 0].astype(BF16), cache_v[l, 0].astype(BF16)  # [S, Hkv, D]
    s = jnp.einsum("hgd,shd->hgs", q, k, preferred_element_type=F32) * g.head_dim ** -0.5
    _, visible = _key_positions(jnp.arange(size), p, g, size)
    s = jnp.where(visible[None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if g.sink:
        sk = sink[l, :, :g.group].astype(F32)
        m = jnp.maximum(m, sk)
    e = jnp.exp(s - m[..., None])
    denom = jnp.sum(e, axis=-1) + (jnp.exp(sk - m) if g.sink else 0.0)
    o = jnp.einsum("hgs,shd->hgd", (e / denom[..., None]).astype(BF16), v, preferred_element_type=F32)
    o = o.astype(BF16).reshape(-1)
    y = jnp.dot(o, wo[l].astype(BF16), preferred_element_type=F32).astype(BF16).astype(F32)
    return x + y


def reference_mlp(layer, x, acc, norm_w, w_gate, w_up, w_down, *, g: Geometry):
    l = layer[0]
    xn = _rms(x, norm_w[l], g.eps).astype(BF16)
    gate = jnp.dot(xn, w_gate[l].astype(BF16), preferred_element_type=F32)
    up = jnp.dot(xn, w_up[l].astype(BF16), preferred_element_type=F32)
    h = _swiglu_act(gate, up)
    return acc + jnp.dot(h, w_down[l].astype(BF16), preferred_element_type=F32)
