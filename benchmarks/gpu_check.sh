#!/usr/bin/env bash
# The GPU checks of the finetuner, as one script for a lent CUDA machine (see benchmarks/README.md):
# the CUDA/Triton tests, the kernel table (roofline) and the end-to-end pairs/s table.
# Usage: OUT=<dir> bash benchmarks/gpu_check.sh   (logs go to $OUT, default ./gpu_logs)
set -uo pipefail
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.log"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_finetune_losses.py tests/test_finetune.py 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 150 "$PY" -m benchmarks.bench_kernels --cuda-only 2>&1 | tee "$OUT/kernels.log"
timeout 170 "$PY" -m benchmarks.bench_gpu 2>&1 | tee "$OUT/gpu.log"
