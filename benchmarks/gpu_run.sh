#!/usr/bin/env bash
# On the GPU machine (after benchmarks/gpu_prepare.sh here; carry .whl and .cifar):
#   bash benchmarks/gpu_run.sh
# installs the carried wheels beside the image's torch and runs gpu_check.py, its output
# also in $OUT/gpu_check.log (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm | tail -1
python3 benchmarks/gpu_check.py --cifar .cifar "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
exit "${PIPESTATUS[0]}"
