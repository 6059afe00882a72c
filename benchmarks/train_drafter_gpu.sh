#!/usr/bin/env bash
# Train the block drafter for SmolLM2-135M on one GPU, then evaluate it on the held-out sets (acceptance by
# position, accepted-length histogram, tok/s speculative vs plain, a PNG). About 6-7 minutes on one H200.
#   bash benchmarks/train_drafter_gpu.sh /path/to/SmolLM2-135M-Instruct.Q4_1.gguf /path/to/outdir [TRAINER FLAGS]
# Extra trainer flags override the ones below (a CPU smoke run: --code_prompts 4 --steps 3 ...; BENCH_PROMPTS and
# BENCH_TOKENS size the evaluation). Writes OUT/drafter.safetensors (ship it as
# mimo_jax/drafters/smollm2_135m_block.safetensors), OUT/eval.json (training figures), OUT/bench.json,
# OUT/speculative.png, OUT/train.log, OUT/bench.log.
set -euo pipefail
GGUF=${1:?usage: $0 MODEL.gguf OUTDIR [trainer flags]}
OUT=${2:?usage: $0 MODEL.gguf OUTDIR [trainer flags]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
python -c "import optax, safetensors, tqdm" || { echo "the trainer needs optax, safetensors, tqdm (pip install optax)"; exit 1; }
python -m mimo_jax.train_drafter --model "$GGUF" --out "$OUT" --cache_dir "$OUT/data" \
  --code_prompts 2048 --chat_prompts 1024 --source_windows 4096 --prompt_len 64 --gen_len 256 --gen_batch 256 \
  --steps 4000 --batch 32 --anchors 32 --layers 2 --intermediate 1024 --lr 1e-3 --max_minutes 3.5 \
  --eval_prompts 0 "$@" 2>&1 | tr '\r' '\n' | awk 'NR % 50 == 1 || !/it\/s|s\/it/' | tee "$OUT/train.log"
python benchmarks/bench_speculative.py --model "$GGUF" --drafter "$OUT/drafter.safetensors" --k 8 \
  --prompts "${BENCH_PROMPTS:-16}" --max_new_tokens "${BENCH_TOKENS:-256}" --png "$OUT/speculative.png" \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
