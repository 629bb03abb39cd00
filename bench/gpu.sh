#!/usr/bin/env bash
# GPU benchmark on SD v1.4's architecture with random weights (no download): `make bench-gpu` or `bash bench/gpu.sh`.
# About 12 minutes on one H100 (each step has its own limit). Writes logs and the JSON lines to $OUT (default outputs/bench-gpu).
# Steps, most important first (STEPS="1 4" runs only those); each has its own time limit so a slow step cannot eat
# the ones after it:
#   1. ours, paper settings (T = 35, 3 instruction concepts, to_out), ITS iterations (default 200), teacher in pure
#      bf16, with the one-at-a-time reference (REF iterations, default 10; 0 = skip), the precision check, and side by
#      side in the same process the variants of docs/PERFORMANCE.md's next steps: attention without cuDNN's kernel
#      (trainer.sdpa_backends=flash+efficient), channels-last convolutions, both; then generation under both
#      attention settings;
#   2. 100 iterations with the autocast teacher (the other trainer.teacher_precision);
#   3. ESD: its official student sampling (sequential), and the batched teacher-sampling option;
#   4. ours with trainer.compile=true beside the same run without it (attention without cuDNN's kernel).
set -uo pipefail
OUT=${OUT:-outputs/bench-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # packages the device image lacks (diffusers, hydra, omegaconf)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; $PY -c 'import torch; print(torch.__version__)') \
  > "$OUT/device.txt" 2>&1
MODEL=${MODEL:-sd14-random}
B="$PY -m erasure.bench --model $MODEL --concept nudity"
STEPS=${STEPS:-1 2 3 4} ITS=${ITS:-200} REF=${REF:-10}
step() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
NO_CUDNN=trainer.sdpa_backends=flash+efficient
step 1 && timeout 480 $B --methods ours --iterations "$ITS" --teacher-batch 50 --reference-iterations "$REF" \
  --generation-images 8 --generation-sdpa auto,flash+efficient --set trainer.teacher_precision=pure --precision-check \
  --variant "no_cudnn=$NO_CUDNN" --variant channels_last=trainer.channels_last=true \
  --variant "no_cudnn_channels_last=$NO_CUDNN trainer.channels_last=true" 2>&1 | tee "$OUT/1_ours_pure.log"
step 2 && timeout 95 $B --methods ours --iterations 100 --teacher-batch 50 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=autocast 2>&1 | tee "$OUT/2_ours_autocast.log"
step 3 && timeout 55 $B --methods esd --baseline-iterations 10 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=pure 2>&1 | tee "$OUT/3_esd_student.log"
step 3 && timeout 65 $B --methods esd --baseline-iterations 50 --teacher-batch 50 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=pure --set method.sampler=teacher 2>&1 | tee -a "$OUT/3_esd_student.log"
step 4 && timeout 170 $B --methods ours --iterations 20 --teacher-batch 20 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=pure --set $NO_CUDNN --variant compile=trainer.compile=true 2>&1 | tee "$OUT/4_ours_compile.log"
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl"
