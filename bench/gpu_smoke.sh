#!/usr/bin/env bash
# GPU smoke benchmark, one run under 8 minutes on one GPU machine:
#   1. the device (nvidia-smi, TensorFlow's view);
#   2. bench/train_step.py --device gpu: ViT-B/16, 384 px, batch 16, bf16 + XLA, img/s and
#      MFU against the datasheet peak and a measured 8192^3 bf16 matmul;
#   3. one synthetic training epoch through `vitpcm train` (MirroredStrategy);
#   4. 960 px inference throughput (ViT-B/16, bf16, graph mode as `vitpcm test` runs it).
# JSON goes to $OUT (default build/bench/gpu), where `python bench/report.py --from-json`
# picks it up for BENCHMARKS.md's GPU rows. `--dry` runs the same steps at tiny sizes on
# the CPU (seconds to minutes), to check the script where no GPU is lent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT:-build/bench/gpu}
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "device"
{ command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi: not found"; } \
  | tee "$OUT/device.txt"
"$PY" -c 'import tensorflow as tf; print("TensorFlow", tf.__version__, "GPUs:", tf.config.list_physical_devices("GPU"))' \
  | tee -a "$OUT/device.txt"

if [ "$DRY" = 1 ]; then
  step "train step (dry: CPU, ViT-S/16 128 px, fp32, graph mode, 1 round)"
  timeout 600 "$PY" bench/train_step.py --device cpu --size 128 --precision fp32 --xla off \
    --rounds 1 --steps 1 --matmul-size 512 --json "$OUT/train_step.json"
  step "one synthetic epoch (dry)"
  timeout 600 "$PY" bench/gpu_extra.py epoch --dry --json "$OUT/epoch.json"
  step "inference (dry)"
  timeout 300 "$PY" bench/gpu_extra.py inference --dry --rounds 2 --json "$OUT/inference.json"
else
  step "train step: ViT-B/16 384 px, batch 16, bf16, XLA"
  timeout 210 "$PY" bench/train_step.py --device gpu --rounds 3 --steps 5 \
    --json "$OUT/train_step.json"
  step "one synthetic epoch, MirroredStrategy"
  timeout 120 "$PY" bench/gpu_extra.py epoch --json "$OUT/epoch.json"
  step "960 px inference"
  timeout 120 "$PY" bench/gpu_extra.py inference --size 960 --batch 8 \
    --json "$OUT/inference.json"
fi
step "done: $(ls "$OUT")"
