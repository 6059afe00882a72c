"""Batch-1 decode benchmark: plain decode and the speculative step, against the memory floor of the same run.

    python benchmarks/bench_decode.py --config configs/tiny_mimo.json --k 8
    python benchmarks/bench_decode.py --config configs/mid_mimo.json --k 8 --dtype bfloat16   # on a GPU

Prints: the read ceiling measured now (jnp.sum over a large array), the bytes one step must read (active
weights + KV cache), plain decode tok/s and its % of the floor, the speculative step time for the MTP drafter
(random weights: low acceptance) and the oracle drafter (acceptance = k), the accepted-length histogram, and
the tok/s projected at UltraSpeed's acceptance lengths (4.3 / 5.6 / 6.3 accepted drafts per step).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import model
from mimo_jax.config import DENSE, FULL, ModelConfig, load_config
from mimo_jax.engine import Engine

from ceiling import read_ceiling


def step_bytes(cfg: ModelConfig, itemsize: int, capacity: int, tokens: int = 1, distinct_experts: float | None = None,
               ring: int = 0, expert_itemsize: float | None = None, dense: str = "bf16") -> float:
    """Weights + KV a forward over `tokens` positions must read once (experts: `distinct_experts` per layer;
    dense "fp8": q/k/v and the dense MLP at 1 byte per value + a float32 scale per 128 x 128 block; "fp8_layers":
    o_proj too; "fp8_all":
    o_proj and an untied lm_head too)."""
    h, total = cfg.hidden_size, 0
    f8 = (1 + 4 / 128 ** 2) / itemsize if dense != "bf16" else 1.0
    f8_o = f8 if dense in ("fp8_layers", "fp8_all") else 1.0
    f8_head = f8 if dense == "fp8_all" else 1.0
    for attn_kind, mlp_kind in cfg.layer_kinds:
        s = cfg.attention(attn_kind)
        total += h * (s.num_heads * s.head_dim + s.num_kv_heads * (s.head_dim + s.v_head_dim)) * f8 + \
            s.num_heads * s.v_head_dim * h * f8_o
        length = capacity if attn_kind == FULL else s.window + ring
        total += length * s.num_kv_heads * (s.head_dim + s.v_head_dim)
        if mlp_kind == DENSE:
            total += 3 * h * cfg.intermediate_size * f8
        else:
            e = distinct_experts if distinct_experts is not None else cfg.num_experts_per_tok
            total += (3 * h * cfg.moe_intermediate_size * e * (expert_itemsize or itemsize) / itemsize
                      + h * cfg.num_experts * 2)  # router in f32
    total += h * cfg.vocab_size * (1.0 if cfg.tie_word_embeddings else f8_head)  # lm_head
    return total * itemsize


def mtp_bytes(cfg: ModelConfig, itemsize: int, ring: int) -> float:
    s, h = cfg.attention("sliding"), cfg.hidden_size
    layer = 2 * h * h + h * (s.num_heads * s.head_dim + s.num_kv_heads * (s.head_dim + s.v_head_dim)) + \
        s.num_heads * s.v_head_dim * h + 3 * h * cfg.intermediate_size + \
        (s.window + ring) * s.num_kv_heads * (s.head_dim + s.v_head_dim)
    return (layer + h * cfg.vocab_size) * itemsize  # each draft depth also reads the lm_head


def run(engine: Engine, prompt, n_new: int):
    engine.generate(prompt, max_new_tokens=min(n_new, 12), stop_at_eos=False)  # compile
    return engine.generate(prompt, max_new_tokens=n_new, stop_at_eos=False).stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny_mimo.json")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--quant_experts", default="none", help="none | int4_sym | int4_asym | mxfp4")
    ap.add_argument("--quant_group", type=int, default=128)
    ap.add_argument("--drafters", default="mtp,oracle")
    args = ap.parse_args()
    cfg = load_config(args.config)
    dtype = jnp.dtype(args.dtype)
    params = model.init_params(cfg, jax.random.PRNGKey(0), dtype)
    expert_itemsize = None
    if args.quant_experts != "none":
        from mimo_jax.quantize_model import quantize_experts

        params = quantize_experts(params, args.quant_experts, args.quant_group)
        group = 32 if args.quant_experts == "mxfp4" else args.quant_group
        scale_bytes = {"int4_sym": 2, "int4_asym": 4, "mxfp4": 1}[args.quant_experts]
        expert_itemsize = 0.5 + scale_bytes / group
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    ceiling = read_ceiling() / 1e9
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, config "
          f"{args.config}, dtype {args.dtype}, experts {args.quant_experts}, read ceiling measured now: {ceiling:.1f} GB/s")
    capacity = 256
    while capacity < args.prompt_len + args.new_tokens + 2 * (args.k + 1):
        capacity *= 2
    plain = run(Engine(cfg, params, max_seq_len=capacity, prefill_chunk=64), prompt, args.new_tokens)
    b1 = step_bytes(cfg, dtype.itemsize, capacity, expert_itemsize=expert_itemsize)
    t_plain = 1.0 / plain.decode_tok_s
    print(f"plain decode: {1e3 * t_plain:.3f} ms/token, {plain.decode_tok_s:.1f} tok/s; floor {b1 / 1e6:.1f} MB "
          f"-> {1e3 * b1 / ceiling / 1e9:.3f} ms ({100 * b1 / ceiling / 1e9 / t_plain:.1f}% of the ceiling)")
    k = args.k
    e_uniform = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / max(cfg.num_experts, 1)) ** (k + 1))
    for drafter in [d for d in args.drafters.split(",") if d]:
        st = run(Engine(cfg, params, max_seq_len=capacity, prefill_chunk=64, speculative_k=k, drafter=drafter),
                 prompt, args.new_tokens)
        t_step = st.decode_s / max(st.spec_steps, 1)
        verify = step_bytes(cfg, dtype.itemsize, capacity, k + 1, e_uniform, ring=k + 1, expert_itemsize=expert_itemsize)
        draft = k * mtp_bytes(cfg, dtype.itemsize, k + 1) if drafter == "mtp" else k * b1
        print(f"speculative k={k} drafter={drafter}: {1e3 * t_step:.3f} ms/step ({t_step / t_plain:.2f}x a plain "
              f"step), {st.mean_accepted:.2f} accepted/step, {(st.new_tokens - 1) / st.decode_s:.1f} tok/s; "
              f"histogram n=0..{k}: {st.accepted_hist}")
        print(f"   floor (verify with {e_uniform:.0f} distinct experts/layer if routing were uniform, + drafts): "
              f"{(verify + draft) / 1e6:.1f} MB -> {1e3 * (verify + draft) / ceiling / 1e9:.3f} ms")
        if drafter == "mtp":
            proj = ", ".join(f"a={a}: {(a + 1) / t_step:.0f} tok/s" for a in (4.3, 5.6, 6.3))
            print(f"   projected at UltraSpeed acceptance (a accepted drafts + 1 bonus per step): {proj}")


if __name__ == "__main__":
    main()
