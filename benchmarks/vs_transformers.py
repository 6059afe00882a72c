"""Batch-1 decode, mimo_jax against what a user would pick instead: transformers (eager, and torch.compile'd), same
config, same GPU, random bf16 weights.

    python benchmarks/vs_transformers.py --config configs/mid_mimo.json [--steps 64] [--compile default]
    python benchmarks/vs_transformers.py --config configs/smollm2_135m.json --compile reduce-overhead

transformers: the config's model class (MiMoV2FlashForCausalLM / LlamaForCausalLM) built from our config, bf16 on
the GPU, a StaticCache of the same capacity as ours, prefill of a 16-token prompt, then `--steps` one-token forwards
(greedy argmax on the device, no host sync inside the loop), timed after 8 warm-up steps at the timed shapes; with
`--compile MODE` the forward is torch.compile'd (MoE: experts_implementation "batched_mm", the compile-friendly
one; the mode that fails to compile is reported and the eager figure kept). Ours: the Engine's decode at the same
capacity (Engine.generate's decode tok/s after a warm-up generate of the same length), bf16 everywhere, and with
`--ours_quant` also int4 experts + `--dense fp8_all` (fewer bytes: not the same model, labelled so).
The read ceiling is measured in this run and each row is given against its bytes' floor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# one process holds both frameworks: JAX allocates as it goes instead of taking 75% of the GPU up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import DENSE, FULL, load_config

PROMPT = 16


def hf_config(cfg):
    """Our ModelConfig as the transformers config of the same model."""
    if cfg.model_type == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                           rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
                           max_position_embeddings=cfg.max_position_embeddings)
    from transformers import MiMoV2FlashConfig

    swa = cfg.attention("sliding")
    if swa.num_kv_heads != 2 * cfg.num_kv_heads or swa.num_heads != cfg.num_heads:
        raise SystemExit("vs_transformers: transformers' MiMo-V2-Flash has SWA kv heads = 2 x full ones")
    return MiMoV2FlashConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, v_head_dim=cfg.v_head_dim, moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        sliding_window=cfg.sliding_window + 1,
        layer_types=["full_attention" if t == FULL else "sliding_attention" for t in cfg.layer_types],
        mlp_layer_types=["dense" if t == DENSE else "sparse" for t in cfg.mlp_types],
        routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
        attention_value_scale=cfg.attention_value_scale, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                               "partial_rotary_factor": cfg.partial_rotary_factor},
            "sliding_attention": {"rope_type": "default", "rope_theta": swa.rope_theta,
                                  "partial_rotary_factor": cfg.partial_rotary_factor}})


def time_transformers(cfg, capacity: int, steps: int, mode: str | None):
    import torch
    import transformers

    hcfg = hf_config(cfg)
    cls = transformers.LlamaForCausalLM if cfg.model_type == "llama" else transformers.MiMoV2FlashForCausalLM
    kw = {} if cfg.model_type == "llama" or not mode else {"experts_implementation": "batched_mm"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: a smoke run of the script)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    with torch.device(dev):
        try:
            m = cls._from_config(hcfg, dtype=torch.bfloat16, **kw).eval()
        except (TypeError, ValueError) as e:  # an older transformers without the experts switch
            print(f"  (transformers {transformers.__version__}: {type(e).__name__} {str(e)[:120]}; default experts)")
            m = cls._from_config(hcfg, dtype=torch.bfloat16).eval()
    impl = getattr(m.config, "_experts_implementation", None)
    cache = transformers.StaticCache(config=m.config, max_cache_len=capacity)
    fwd = torch.compile(m.forward, mode=mode) if mode else m.forward
    with torch.no_grad():
        ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), device=dev)
        out = m(input_ids=ids, past_key_values=cache, cache_position=torch.arange(PROMPT, device=dev), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        positions = torch.arange(PROMPT, capacity, device=dev)

        def run(n, start):
            t = tok
            for i in range(n):
                o = fwd(input_ids=t, past_key_values=cache, cache_position=positions[start + i:start + i + 1],
                        use_cache=True)
                t = o.logits[:, -1:].argmax(-1)
            return t

        t0 = time.perf_counter()
        run(8, 0)
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(steps, 8)
        sync()
        dt = (time.perf_counter() - t0) / steps
    m = cache = None  # noqa: F841 -- freed before the next model is built
    if dev == "cuda":
        torch.cuda.empty_cache()
    return dt, warm, impl, transformers.__version__, torch.__version__


def time_ours(cfg, capacity: int, steps: int, quant: bool):
    from mimo_jax.engine import Engine
    from mimo_jax.quantize_model import quantize_dense, quantize_experts

    from mimo_jax import model

    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    if quant:
        params = quantize_dense(quantize_experts(params, "int4_sym", 128) if cfg.num_experts else params, "fp8_all")
    e = Engine(cfg, params, max_seq_len=capacity)
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, PROMPT))
    e.generate(prompt, max_new_tokens=steps, stop_at_eos=False)  # compile at these shapes
    best = max(e.generate(prompt, max_new_tokens=steps, stop_at_eos=False).stats.decode_tok_s for _ in range(3))
    return 1.0 / best


def main():
    from bench_decode import step_bytes
    from ceiling import read_ceiling

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mid_mimo.json")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--compile", default="default", help="torch.compile mode(s), comma separated; 'none': eager only")
    ap.add_argument("--ours_quant", action="store_true", help="also ours with int4 experts + dense fp8_all")
    ap.add_argument("--skip_theirs", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    cfg = load_config(a.config)
    ceiling = read_ceiling()
    floor = step_bytes(cfg, 2, a.capacity) / ceiling
    print(f"== {Path(a.config).stem}: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; batch 1, cache {a.capacity}, bf16; read ceiling {ceiling / 1e9:.0f} GB/s; "
          f"bf16 floor {1e3 * floor:.3f} ms/token", flush=True)
    rows = []

    def row(name, s, extra="", fl=floor):
        rows.append({"path": name, "ms": 1e3 * s, "pct_floor": 100 * fl / s, "note": extra})
        print(f"| {name} | {1e3 * s:.3f} ms | {1 / s:.0f} tok/s | {100 * fl / s:.1f}% | {extra} |", flush=True)

    print("| path | ms/token | tok/s | % of its floor | note |\n|---|---|---|---|---|")
    # transformers first: torch hands its memory back (empty_cache), JAX's allocator keeps what it took
    if not a.skip_theirs:
        for mode in [None] + [m for m in a.compile.split(",") if m != "none"]:
            name = f"transformers {'eager' if mode is None else 'torch.compile ' + mode}"
            try:
                s, warm, impl, tv, pv = time_transformers(cfg, a.capacity, a.steps, mode)
                row(name, s, f"transformers {tv}, torch {pv}, experts {impl}, warm-up {warm:.0f} s")
            except Exception as e:  # noqa: BLE001 -- report and go on
                print(f"| {name} | failed | | | {type(e).__name__}: {str(e)[:300]} |", flush=True)
    row("mimo_jax (Engine, bf16)", time_ours(cfg, a.capacity, a.steps, False))
    if a.ours_quant:
        fl = step_bytes(cfg, 2, a.capacity, expert_itemsize=0.5 + 2 / 128, dense="fp8_all") / ceiling
        row("mimo_jax, int4 experts + dense fp8_all", time_ours(cfg, a.capacity, a.steps, True),
            "fewer bytes (not the same weights)", fl)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / f"vs_transformers_{Path(a.config).stem}.json", "w") as f:
        json.dump({"ceiling": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
