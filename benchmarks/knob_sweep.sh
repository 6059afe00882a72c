#!/bin/bash
# Step wall time of one profile_step command under library-knob variants (benchmarks/knobs.py), each variant its
# own process, in one device call:
#   KNOBS="baseline;sharding.VOCAB_EMBED_LOCAL=0;ops.OUT_IN_ON_MESH=1 ops.MESH_PAD_ROWS=8" \
#     bash benchmarks/knob_sweep.sh --config configs/mimo_v2_flash.json --layers 48 --devices 2 --k 8 --drafter block
# Items are separated by ";", knobs within an item by spaces; "baseline" (or an empty item) = today's defaults.
# TIMEOUT (seconds per variant, default 240) bounds each run so one hang cannot eat the call.
set -u
IFS=';' read -r -a variants <<< "${KNOBS:-baseline}"
for knobs in "${variants[@]}"; do
  knobs=$(echo "$knobs" | xargs)  # trim
  echo "== knobs: ${knobs:-baseline}"
  if [ -z "$knobs" ] || [ "$knobs" = baseline ]; then
    cmd=(python benchmarks/profile_step.py --wall_only "$@")
  else
    read -r -a kv <<< "$knobs"
    cmd=(python benchmarks/knobs.py "${kv[@]}" -- benchmarks/profile_step.py --wall_only "$@")
  fi
  timeout "${TIMEOUT:-240}" "${cmd[@]}" 2>&1 | grep -E "^--|^==|wall|Error|error|Traceback" | head -12
done
