#!/usr/bin/env bash
# The measurements session 20 could not make, in the order they matter, each under its own timeout (one device call;
# ~6 minutes on an H100). Run from the repository root on the device machine: bash benchmarks/next_gpu_session20.sh
# 1. the bf16 pair kernel alone (its first run on a GPU: a hang or a bad result shows here, nowhere else);
# 2. mid_mimo with bf16 experts, XLA's path vs the kernel (quant.PAIR_GEMV_FLOAT), plain + speculative k = 8;
# 3. the transformers table again with the kernel on (transformers + torch.compile ran this model in 4.99 ms);
# 4. issue 12's mid_mimo rows for the three FP8 sets (the stated machine is an H200: say which card ran them).
set -u
OUT=${OUT:-.}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.log"
timeout 150 python benchmarks/bench_pair_gemv.py 2>&1 | grep -v Warn | tee "$OUT/pair.log"
for V in 0 1; do
  timeout 130 python benchmarks/knobs.py quant.PAIR_GEMV_FLOAT=$V -- benchmarks/profile_step.py --wall_only \
    --config configs/mid_mimo.json --k 8 --drafter block --decode_steps 4 2>&1 | grep -v Warn | tee -a "$OUT/bf16_experts.log"
done
timeout 200 python benchmarks/knobs.py quant.PAIR_GEMV_FLOAT=1 -- benchmarks/vs_transformers.py \
  --config configs/mid_mimo.json --compile default 2>&1 | grep "^|\|^==" | tee "$OUT/vs_transformers.log"
for D in fp8_all fp8_layers fp8; do
  timeout 110 python benchmarks/profile_step.py --wall_only --config configs/mid_mimo.json --quant_experts int4_sym \
    --dense $D --k 8 --drafter block --decode_steps 4 2>&1 | grep -v Warn | tee -a "$OUT/mid_mimo_dense.log"
done
