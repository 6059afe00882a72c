#!/usr/bin/env bash
# Train a drafter (block; PHASE=mtp: MTP layers) for SmolLM2-135M on one GPU and evaluate it on the held-out sets (acceptance by
# position, accepted-length histogram, tok/s speculative vs plain, a PNG): in one device call (PHASE=one, the
# default) or over several back-to-back calls on the same warm machine (PHASE=first, middle..., last).
#   [PHASE=...] bash benchmarks/train_drafter_gpu.sh MODEL.gguf|carried OUTDIR [TRAINER FLAGS]
#
# "carried": the 98 MB GGUF travels in parts, .gg1/a + .gg2/b [+ .gg3/c] (.gg1 and .gg2 with the gguf wheel), more
# than one call's 64 MiB carry (with the shipped drafters in the tree, 3 parts of ~33 MB): earlier calls carry .gg1
# (and .gg3) and copy them to /tmp (gg.a, gg.c); the next carries .gg2 and this script joins the parts into
# /tmp/SmolLM2-135M-Instruct.Q4_1.gguf (the first from .gg1/a, else /tmp/gg.a; the third from .gg3/c, else
# /tmp/gg.c, when there is one) and installs the wheel into /tmp/site when `import gguf` fails. Later phases find
# both in /tmp. Split: F=...Q4_1.gguf; head -c 32787478 $F > .gg1/a; tail -c +32787479 $F | head -c 32787478 >
# .gg2/b; tail -c +65574957 $F > .gg3/c (md5 of the join a1231443440b107ff29f02bdb38c9d0a).
#
# Multi-call run, exact device commands (run tool, kind "nvidia-h200" on every call: the rates below are an H200's,
# and the source windows' teacher-forced pass holds [1024 x 320 x 49152] f32 logits, 60 GiB; back to back, the
# machine warm: its /tmp survives between calls, nothing else does):
#   call 0  carry [".gg1"]  command: cp .gg1/a /tmp/gg.a && cp .gg1/gguf-*.whl /tmp/ && ls -l /tmp/gg.a
#   (3 parts: then carry [".gg3"]  command: cp .gg3/c /tmp/gg.c)
#   call 1  carry [".gg2"]  command: PHASE=first PLAN_MIN=19 bash benchmarks/train_drafter_gpu.sh carried $OUT
#   call 2  carry []        command: PHASE=middle PLAN_MIN=19 bash benchmarks/train_drafter_gpu.sh carried $OUT
#   call 3  carry []        command: PHASE=last PLAN_MIN=19 bash benchmarks/train_drafter_gpu.sh carried $OUT
# (no middle call: PLAN_MIN=11 in calls 1 and 3; more middle calls: add ~8.5 to PLAN_MIN each. The machine is
# taken back after 30 minutes held: calls 0-3 are ~26 minutes of commands, tight; each call returns its drafter.)
#   first   joins the GGUF, generates ~25M target tokens into the /tmp/drafter_data cache (45056 code + 13600 chat
#           continuations of 256 tokens, 36864 teacher-forced source windows: ~4 min at ~100k tok/s), starts a
#           fresh run in /tmp/drafter_run and trains until its deadline (~4.5 min).
#   middle  resumes /tmp/drafter_run from the cache (--require_cache) and trains until its deadline (~8.5 min).
#   last    resumes, trains until TOTAL_S - EVAL_S (~6 min; --finish ends the learning-rate decay there), then
#           runs bench_speculative.py on the result.
# PHASE=tune (one call, after the GGUF's first half was carried as in call 0): fine-tunes the shipped drafter
# (INIT, default mimo_jax/drafters/smollm2_135m_block.safetensors) on new data (DATA_SEED, default 1: other code
# prompts, chat instructions and source windows; ~19M target tokens, ~3 min), with a fresh schedule annealed to 0 at the call's
# deadline, then evaluates it like PHASE=one (the same held-out sets): each session's device time adds to the last.
# DRAFT_VOCAB=N (optional) widens the drafter's vocabulary (its own list joined with the new data's N most frequent).
#   carry [".gg2"]  command: PHASE=tune bash benchmarks/train_drafter_gpu.sh carried $OUT
# PHASE=mtp (one call; right after a tune call with the same DATA_SEED it reuses that call's data): trains the other
# drafter kind, an MTP layer (train_mtp.py): fine-tunes the shipped one (MTP_INIT, default
# mimo_jax/drafters/smollm2_135m_mtp.safetensors; MTP_INIT=none: from scratch, as session 8's first run), and
# evaluates it the same way. After a tune call, nothing need be carried:
#   carry []  command: PHASE=mtp DATA_SEED=4 bash benchmarks/train_drafter_gpu.sh carried $OUT
# The schedule spans the calls: --plan_minutes PLAN_MIN is the training time planned over all of them; the seconds
# done, step, optimizer state and sampler state are in /tmp/drafter_run/last.safetensors (~80 MB with Adam's
# moments: over the 16 MiB a returned file may have, so it stays in /tmp). A middle or last call that finds its
# /tmp state gone (a fresh machine) prints one "STATE GONE: ..." line and exits 3 instead of starting over.
#
# Every call writes OUT/status (phases reached, devices), OUT/train.log, OUT/drafter.safetensors (float16 weights
# as of this call's end: ship the last one as mimo_jax/drafters/smollm2_135m_block.safetensors) and OUT/eval.json
# (training figures); the last (and PHASE=one) adds OUT/bench.json, OUT/bench.log, OUT/speculative.png.
# Environment: PHASE, PLAN_MIN (default 19), MTP_DEPTHS (PHASE=mtp: chain depths trained, default 4), TOTAL_S (wall budget of this call: 540 for one, 560 otherwise),
# EVAL_S (kept for the evaluation: 170), END_S (kept after training in first/middle calls: 25), GEN_BATCH (1024),
# BENCH_PROMPTS / BENCH_TOKENS (the evaluation's size), RUN_DIR / DATA_DIR (instead of /tmp/drafter_run and
# /tmp/drafter_data). Extra trainer flags override the ones below (every call of a run must pass the same data
# flags: the cache's file names hash them).
# A CPU smoke run of the phases: PHASE=first TOTAL_S=85 PLAN_MIN=2 bash THIS MODEL.gguf /tmp/o1 --code_prompts 8
#   --chat_prompts 4 --source_windows 4 --gen_len 8 --gen_batch 4 --batch 2 --anchors 2 --layers 1
#   --intermediate 64 --window 16 --draft_vocab 512, then PHASE=middle, then PHASE=last (EVAL_S=90 BENCH_PROMPTS=1).
set -euo pipefail
GGUF=${1:?usage: [PHASE=one|first|middle|last] $0 MODEL.gguf|carried OUTDIR [trainer flags]}
OUT=${2:?usage: [PHASE=one|first|middle|last] $0 MODEL.gguf|carried OUTDIR [trainer flags]}
shift 2
T0=$(date +%s)
PHASE=${PHASE:-one}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
phase() { echo "$1 at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/status"; }
gone() {
  echo "STATE GONE: $1 (a fresh machine? /tmp did not survive since PHASE=first): nothing trained, start again" \
       "with PHASE=first" | tee -a "$OUT/status"
  exit 3
}
trap 'echo "FAILED (exit $?) at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/status"' ERR
case "$PHASE" in
  one|first|middle|last|tune|mtp) ;;
  *) echo "PHASE=$PHASE: one of one, first, middle, last, tune, mtp"; exit 2 ;;
esac
RUN=${RUN_DIR:-/tmp/drafter_run}  # the trainer's state between calls
DATA=${DATA_DIR:-/tmp/drafter_data}  # the generated data, cached
JOINED=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
if [ "$GGUF" = carried ]; then
  GGUF=$JOINED
  if [ "$PHASE" = one ] || [ "$PHASE" = first ] || [ "$PHASE" = tune ] || [ "$PHASE" = mtp ]; then
    if ! python -c "import gguf" 2>/dev/null; then  # `pip install` alone went to another interpreter on the image
      WHL=$(ls .gg1/gguf-*.whl .gg2/gguf-*.whl /tmp/gguf-*.whl 2>/dev/null | head -1)
      python -m pip install --no-index --no-deps -q --target /tmp/site "$WHL"
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    A=.gg1/a; [ -s "$A" ] || A=/tmp/gg.a
    C=.gg3/c; [ -s "$C" ] || C=/tmp/gg.c  # a third part when the tree's own files leave less room per carry
    [ -s "$C" ] || C=
    if [ -s .gg2/b ] || [ ! -s "$JOINED" ]; then cat "$A" .gg2/b $C > "$JOINED"; fi  # an earlier call's join stays
  fi
fi
if [ "$PHASE" = middle ] || [ "$PHASE" = last ]; then
  [ -s "$GGUF" ] || gone "no model file $GGUF"
  [ -s "$RUN/last.safetensors" ] || gone "no $RUN/last.safetensors"
  python -c "import gguf" 2>/dev/null || gone "the gguf package is not importable (no /tmp/site)"
fi
[ -s "$GGUF" ] || { echo "no model file $GGUF"; exit 1; }
python -c "import optax, safetensors, tqdm, gguf" || { echo "the trainer needs optax, safetensors, tqdm, gguf"; exit 1; }
python -c "import jax; print('devices:', jax.devices())" | tee -a "$OUT/status"
phase "start ($PHASE)"
# drafter: 2 layers conditioned on target layers 1, 15, 26 and the last one; 32 sequences x 48 anchors x 8 slots.
MODEL_FLAGS=(--batch 32 --anchors 48 --layers 2 --intermediate 1024 --lr 1e-3 --target_layers auto --eval_prompts 0)
TRAINER=mimo_jax.train_drafter
if [ "$PHASE" = one ]; then
  # data: 16384 code continuations (64-token stdlib prompts, 256 greedy tokens), 8192 chat completions, 16384
  # teacher-forced stdlib windows (10.9M target tokens)
  DEADLINE=$(( T0 + ${TOTAL_S:-540} - ${EVAL_S:-170} ))
  TRAIN_OUT=$OUT
  RUN_FLAGS=(--code_prompts 16384 --chat_prompts 8192 --source_windows 16384 --steps 30000 --deadline "$DEADLINE")
elif [ "$PHASE" = tune ]; then
  INIT=${INIT:-mimo_jax/drafters/smollm2_135m_block.safetensors}
  [ -s "$INIT" ] || { echo "no drafter $INIT to fine-tune"; exit 1; }
  DEADLINE=$(( T0 + ${TOTAL_S:-560} - ${EVAL_S:-170} ))
  TRAIN_OUT=$OUT
  # data: 24576 code continuations, 27200 chat completions of new instructions (drafter_data.chat_instructions with
  # a data_seed), 24576 teacher-forced stdlib windows (~19M target tokens)
  RUN_FLAGS=(--code_prompts 24576 --chat_prompts 27200 --source_windows 24576 --steps 1000000 --deadline "$DEADLINE"
             --init "$INIT" --data_seed "${DATA_SEED:-1}" --lr 5e-4)  # half the first run's peak: a fine-tune
  # DRAFT_VOCAB=N widens the drafter's vocabulary to its own plus the new data's N most frequent tokens
  if [ -n "${DRAFT_VOCAB:-}" ]; then RUN_FLAGS+=(--draft_vocab "$DRAFT_VOCAB"); fi
elif [ "$PHASE" = mtp ]; then
  # the other drafter kind: one new MTP layer (MiMo's layout) chained 8 deep, trained 4 deep, on PHASE=tune's data
  # flags (the same DATA_SEED after a tune call on this machine reads its cache: no data time)
  DEADLINE=$(( T0 + ${TOTAL_S:-560} - ${EVAL_S:-170} ))
  TRAIN_OUT=$OUT
  TRAINER=mimo_jax.train_mtp
  MODEL_FLAGS=(--batch 32 --layers 1 --depths "${MTP_DEPTHS:-4}" --lr 1e-3 --eval_prompts 0)  # MTP_DEPTHS: chain depths trained
  RUN_FLAGS=(--code_prompts 24576 --chat_prompts 27200 --source_windows 24576 --steps 1000000 --deadline "$DEADLINE"
             --data_seed "${DATA_SEED:-1}")
  # fine-tune the shipped MTP drafter (MTP_INIT; MTP_INIT=none: a fresh layer) at half the peak learning rate
  MTP_INIT=${MTP_INIT:-mimo_jax/drafters/smollm2_135m_mtp.safetensors}
  if [ "$MTP_INIT" != none ]; then
    [ -s "$MTP_INIT" ] || { echo "no MTP drafter $MTP_INIT to fine-tune (MTP_INIT=none trains a fresh one)"; exit 1; }
    RUN_FLAGS+=(--init "$MTP_INIT" --lr 5e-4)
  fi
else
  # data: ~25M target tokens (13600 = every training chat instruction); the time plan, not --steps, ends the run
  case "$PHASE" in
    last) DEADLINE=$(( T0 + ${TOTAL_S:-560} - ${EVAL_S:-170} )) ;;
    *) DEADLINE=$(( T0 + ${TOTAL_S:-560} - ${END_S:-25} )) ;;
  esac
  TRAIN_OUT=$RUN
  RUN_FLAGS=(--code_prompts 45056 --chat_prompts 13600 --source_windows 36864 --steps 1000000
             --plan_minutes "${PLAN_MIN:-19}" --deadline "$DEADLINE")
  case "$PHASE" in
    first) rm -rf "$RUN" ;;
    middle) RUN_FLAGS+=(--resume --require_cache) ;;
    last) RUN_FLAGS+=(--resume --require_cache --finish) ;;
  esac
fi
python -m "$TRAINER" --model "$GGUF" --out "$TRAIN_OUT" --cache_dir "$DATA" --prompt_len 64 \
  --gen_len 256 --gen_batch "${GEN_BATCH:-1024}" "${MODEL_FLAGS[@]}" "${RUN_FLAGS[@]}" "$@" 2>&1 | tr '\r' '\n' \
  | awk 'NR % 50 == 1 || !/it\/s|s\/it/' | tee "$OUT/train.log"
if [ "$TRAIN_OUT" != "$OUT" ]; then cp "$RUN/drafter.safetensors" "$RUN/eval.json" "$OUT/"; fi
phase "trained"
if [ "$PHASE" = one ] || [ "$PHASE" = last ] || [ "$PHASE" = tune ] || [ "$PHASE" = mtp ]; then
  python benchmarks/bench_speculative.py --model "$GGUF" --drafter "$OUT/drafter.safetensors" --k 8 \
    --prompts "${BENCH_PROMPTS:-12}" --max_new_tokens "${BENCH_TOKENS:-256}" --png "$OUT/speculative.png" \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
  phase "evaluated"
fi
