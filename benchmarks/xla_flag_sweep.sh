#!/bin/bash
# Step wall time of one config under XLA flag variants (each in its own process: XLA reads XLA_FLAGS once).
#   bash benchmarks/xla_flag_sweep.sh configs/smollm2_135m.json auto [extra profile_step args]
# SWEEP="flags a;flags b" replaces the default variants (an empty item: no flags), e.g. for 2 GPUs:
#   SWEEP=";--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" bash benchmarks/xla_flag_sweep.sh \
#     configs/mimo_v2_flash.json auto --layers 48 --devices 2 --k 8 --drafter block
# (xla_gpu_enable_dot_strength_reduction, tried before, no longer exists in jax 0.11's XLA: it aborts the run.)
cfg=$1; layouts=$2; shift 2
variants=("" "--xla_gpu_enable_pdl=true" "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true"
          "--xla_gpu_graph_enable_concurrent_region=true" "--xla_gpu_require_exclusive_lock=true"
          "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true --xla_gpu_require_exclusive_lock=true")
if [ -n "${SWEEP+x}" ]; then IFS=';' read -r -a variants <<< "$SWEEP"; [ "${SWEEP: -1}" = ";" ] && variants+=(""); fi
for flags in "${variants[@]}"; do
  echo "== XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" python benchmarks/profile_step.py --config "$cfg" --layout "$layouts" --wall_only "$@" 2>&1 \
    | grep -E "^--|wall|Error|error|Abort|unknown" | head -8
done
