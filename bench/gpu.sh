#!/usr/bin/env bash
# GPU benchmark on SD v1.4's architecture with random weights (no download): `make bench-gpu` or `bash bench/gpu.sh`.
# About 9 minutes on one H100 (each step has its own limit). Writes logs, the JSON lines and the operator profile to $OUT (default outputs/bench-gpu).
# Steps, most important first; each has its own time limit so a slow step cannot eat the ones after it:
#   1. ours, paper settings (T = 35, 3 instruction concepts, to_out), 200 iterations, teacher in pure bf16, with
#      the one-at-a-time reference (10 iterations), an operator profile, the precision check and generation;
#   2. 100 iterations with the autocast teacher (the other trainer.teacher_precision);
#   3. ESD: its official student sampling (sequential), and the batched teacher-sampling option;
#   4. ours with trainer.compile=true.
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
timeout 200 $B --methods ours --iterations 200 --teacher-batch 50 --reference-iterations 10 --generation-images 8 \
  --set trainer.teacher_precision=pure --precision-check --profile "$OUT/profile.txt" 2>&1 | tee "$OUT/1_ours_pure.log"
timeout 95 $B --methods ours --iterations 100 --teacher-batch 50 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=autocast 2>&1 | tee "$OUT/2_ours_autocast.log"
timeout 55 $B --methods esd --baseline-iterations 10 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=pure 2>&1 | tee "$OUT/3_esd_student.log"
timeout 65 $B --methods esd --baseline-iterations 50 --teacher-batch 50 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=pure --set method.sampler=teacher 2>&1 | tee -a "$OUT/3_esd_student.log"
timeout 90 $B --methods ours --iterations 100 --teacher-batch 50 --reference-iterations 0 --skip-generation \
  --set trainer.teacher_precision=pure --set trainer.compile=true 2>&1 | tee "$OUT/4_ours_compile.log"
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl"
