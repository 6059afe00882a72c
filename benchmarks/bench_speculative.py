"""Speculative decoding on a real model: acceptance by draft position, accepted-length histogram, tok/s vs plain.

    python benchmarks/bench_speculative.py                                  # bundled SmolLM2, shipped drafter
    python benchmarks/bench_speculative.py --drafter /tmp/d/drafter.safetensors --k 8 --png /tmp/spec.png
    python benchmarks/bench_speculative.py --model model.gguf --prompts 16 --max_new_tokens 256

Prompts are the trainer's held-out sets (train_drafter.py): windows of standard-library files it never trains on,
and chat instructions on held-out topics. Greedy: every speculative output is checked against plain decoding.
Prints one line per set (accepted drafts per step, by position, tok/s spec and plain, speedup), writes a PNG
(matplotlib) and, with --json, the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plot(results: dict, k: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in results.items():
        axes[0].plot(range(1, k + 1), r["acceptance_by_position"], marker="o",
                     label=f"{name}: {r['mean_accepted']:.2f} accepted/step")
        hist = np.asarray(r["accepted_hist"], float)
        axes[1].plot(range(k + 1), hist / max(hist.sum(), 1), marker="s", label=name)
    axes[0].set(xlabel="draft position i", ylabel="P(draft i accepted)", ylim=(0, 1), title="acceptance by position")
    axes[1].set(xlabel="drafts accepted in a step", ylabel="fraction of steps", title="accepted-length histogram")
    names = list(results)
    x = np.arange(len(names))
    axes[2].bar(x - 0.2, [results[n]["plain_tok_s"] for n in names], 0.4, label="plain")
    axes[2].bar(x + 0.2, [results[n]["spec_tok_s"] for n in names], 0.4, label=f"speculative k={k}")
    for i, n in enumerate(names):
        axes[2].text(i + 0.2, results[n]["spec_tok_s"], f"{results[n]['speedup']:.2f}x", ha="center", va="bottom")
    axes[2].set(xticks=x, xticklabels=names, ylabel="decode tok/s", title="speed")
    for ax in axes:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help=".gguf or checkpoint dir (default: the bundled SmolLM2)")
    ap.add_argument("--drafter", default="auto", help="auto | mtp | block | PATH")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts per set")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--png", default="speculative.png")
    ap.add_argument("--json", default=None)
    ap.add_argument("--layout", default="auto", choices=("auto", "scan", "unrolled"), help="the engines' layer layout")
    ap.add_argument("--decode_steps", type=int, default=0, help="steps per dispatch of both engines (0: the Engine's "
                    "default for the platform)")
    a = ap.parse_args(argv)

    import jax

    from mimo_jax import train_drafter
    from mimo_jax.engine import Engine

    steps = a.decode_steps or None
    plain = Engine.from_pretrained(a.model, max_seq_len=1024, layout=a.layout, decode_steps=steps)
    prompts = train_drafter.eval_prompts(plain.tokenizer, a.prompts, a.prompt_len)
    spec = Engine.from_pretrained(a.model, max_seq_len=1024, layout=a.layout, speculative_k=a.k, drafter=a.drafter,
                                  decode_steps=steps)
    results = train_drafter.evaluate(plain, a.drafter, prompts, a.k, a.max_new_tokens, spec=spec)
    device = jax.devices()[0].device_kind
    print(f"device {device}, drafter {a.drafter}, k={a.k}, {a.prompts} prompts x {a.max_new_tokens} tokens per set, "
          f"greedy, {plain.decode_steps} step(s) per dispatch")
    for name, r in results.items():
        print(f"{name:5s} accepted/step {r['mean_accepted']:.2f} of {a.k} | by position "
              f"{' '.join(f'{x:.2f}' for x in r['acceptance_by_position'])} | hist {r['accepted_hist']} | "
              f"spec {r['spec_tok_s']:.1f} tok/s vs plain {r['plain_tok_s']:.1f} ({r['speedup']:.2f}x) | "
              f"identical to plain: {r['greedy_identical']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device, "drafter": a.drafter, "k": a.k, "results": results},
                                           indent=1))
    try:
        plot(results, a.k, a.png, f"speculative decoding, drafter {Path(a.drafter).name}, k={a.k}, {device}")
        print(f"wrote {a.png}")
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
