#!/usr/bin/env bash
# The GPU checks of the finetuner, as one script for a lent CUDA machine (see benchmarks/README.md):
# the CUDA/Triton tests, the kernel table (roofline), the Triton knob sweep and the end-to-end
# pairs/s table. Budget: ~7 minutes on an H200, Triton compilation included; each step has a
# timeout and prints its elapsed seconds (H200, 2026-11-26: tests 33 s; kernel table 58 s before
# its timing loop stopped queueing replays past the time limit; sweep ~30 s of compilation).
# Usage: OUT=<dir> bash benchmarks/gpu_check.sh   (logs go to $OUT, default ./gpu_logs)
set -uo pipefail
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
START=$SECONDS

# step NAME LOG COMMAND...: run COMMAND, log to $OUT/LOG, then print its status and elapsed seconds.
step() {
  local name=$1 log=$2 t0=$SECONDS
  shift 2
  "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "## step $name: exit $rc, $((SECONDS - t0)) s (total $((SECONDS - START)) s)" | tee -a "$OUT/steps.log"
}

step env env.log bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  '$PY' -c \"import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)\""
# Only the tests that run on CUDA (Triton kernels, finetuner on cuda): the CPU ones run in CI.
step tests tests.log timeout 150 "$PY" -m pytest -q -p no:cacheprovider -k "triton or cuda" \
  tests/test_finetune_losses.py tests/test_finetune.py
step kernels kernels.log timeout 150 "$PY" -m benchmarks.bench_kernels --cuda-only
step sweep sweep.log timeout 200 "$PY" -m benchmarks.bench_kernels --cuda-only --sweep
step gpu gpu.log timeout 170 "$PY" -m benchmarks.bench_gpu
