#!/usr/bin/env bash
# The one prepared script for a session lent an NVIDIA GPU (the device tool's `run`, ~10 minutes in all):
#   1. the Triton kernel tests on the GPU, then the kernel tables (benchmarks/gpu_kernels.py runs the tests first);
#   2. the end-to-end tables: dsv3 FP8/BF16, graphs on/off, against transformers (benchmarks/gpu_e2e.py).
# Each stage has its own time limit, so a slow one still leaves the others' figures; the logs and the updated
# RESULTS.md are copied to $OUT after every stage. Needs torch with CUDA, triton, transformers, pytest, click,
# tokenizers, jinja2, tqdm (the device image has them); dsv3 runs from the checkout, not installed.
#
#   bash benchmarks/gpu_session.sh                      # as the device call's command (timeout_s 600)
#   GPU_SESSION_TUNE=1 bash benchmarks/gpu_session.sh   # + a short launch-config sweep (TP 1, M 1/16/128)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/dsv3-gpu-session}"
mkdir -p "$OUT"
save() { cp benchmarks/RESULTS.md "$OUT/RESULTS.md"; [ -f dsv3/backends/cuda/configs/nvidia-sm90.json ] && cp dsv3/backends/cuda/configs/nvidia-*.json "$OUT/" 2>/dev/null; true; }
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} $(date +%T)"
    save
}
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$OUT/gpu.log"
stage kernels 270 python3 benchmarks/gpu_kernels.py
stage e2e 270 python3 benchmarks/gpu_e2e.py
if [ "${GPU_SESSION_TUNE:-0}" = 1 ]; then
    stage tune 240 python3 benchmarks/gpu_kernels.py --no-write --tune --tune-only --tune-tp 1 --tune-m 1,16,128
fi
