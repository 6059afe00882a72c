#!/usr/bin/env bash
# Train the block drafter for SmolLM2-135M on one GPU, then evaluate it on the held-out sets (acceptance by
# position, accepted-length histogram, tok/s speculative vs plain, a PNG), all inside one device call of < 9.5 min.
#   bash benchmarks/train_drafter_gpu.sh MODEL.gguf|carried OUTDIR [TRAINER FLAGS]
# "carried": the 98 MB GGUF travels in two halves, .gg1/a + .gg2/b, joined here into
# /tmp; the gguf wheel in .gg1/ is installed when `import gguf` fails. Both halves together exceed a call's 64 MiB
# carry: call 1 carries .gg1 and runs `cp .gg1/a /tmp/gg.a; cp .gg1/*.whl /tmp/`, call 2 (the machine still warm)
# carries .gg2 and runs `mkdir -p .gg1; cp /tmp/gg.a .gg1/a; cp /tmp/gguf-*.whl .gg1/; bash THIS carried $OUT`. Extra trainer flags override the ones below
# (a CPU smoke run: --code_prompts 4 --steps 3 ...). Environment: TOTAL_S (wall budget of the whole script, default
# 540 s), EVAL_S (kept for the evaluation, default 170 s), BENCH_PROMPTS / BENCH_TOKENS size the evaluation.
# Writes OUT/drafter.safetensors (ship it as mimo_jax/drafters/smollm2_135m_block.safetensors), OUT/eval.json
# (training figures), OUT/bench.json, OUT/speculative.png, OUT/train.log, OUT/bench.log, OUT/last.safetensors
# (weights + optimizer state every 500 steps: a timeout still returns a drafter), OUT/status (the phase reached).
set -euo pipefail
GGUF=${1:?usage: $0 MODEL.gguf|carried OUTDIR [trainer flags]}
OUT=${2:?usage: $0 MODEL.gguf|carried OUTDIR [trainer flags]}
shift 2
T0=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
phase() { echo "$1 at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/status"; }
trap 'echo "FAILED (exit $?) at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/status"' ERR
if [ "$GGUF" = carried ]; then
  if ! python -c "import gguf" 2>/dev/null; then  # `pip install` alone went to another interpreter on the image
    python -m pip install --no-index --no-deps -q --target /tmp/site .gg1/gguf-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  cat .gg1/a .gg2/b > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
fi
[ -s "$GGUF" ] || { echo "no model file $GGUF"; exit 1; }
python -c "import optax, safetensors, tqdm, gguf" || { echo "the trainer needs optax, safetensors, tqdm, gguf"; exit 1; }
python -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"
phase "start"
DEADLINE=$(( T0 + ${TOTAL_S:-540} - ${EVAL_S:-170} ))
# data: 16384 code continuations (64-token stdlib prompts, 256 greedy tokens), 8192 chat completions, 16384
# teacher-forced stdlib windows; drafter: 2 layers conditioned on target layers 1, 15, 26 and the last one.
python -m mimo_jax.train_drafter --model "$GGUF" --out "$OUT" --cache_dir /tmp/drafter_data \
  --code_prompts 16384 --chat_prompts 8192 --source_windows 16384 --prompt_len 64 --gen_len 256 --gen_batch 1024 \
  --steps 30000 --batch 32 --anchors 48 --layers 2 --intermediate 1024 --lr 1e-3 --target_layers auto \
  --deadline "$DEADLINE" --eval_prompts 0 "$@" 2>&1 | tr '\r' '\n' | awk 'NR % 50 == 1 || !/it\/s|s\/it/' \
  | tee "$OUT/train.log"
phase "trained"
python benchmarks/bench_speculative.py --model "$GGUF" --drafter "$OUT/drafter.safetensors" --k 8 \
  --prompts "${BENCH_PROMPTS:-12}" --max_new_tokens "${BENCH_TOKENS:-256}" --png "$OUT/speculative.png" \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
phase "evaluated"
