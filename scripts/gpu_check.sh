#!/usr/bin/env bash
# GPU checks, on a machine with CUDA GPUs: every test marked `gpu` (tests/gpu/ and the DeepEP
# dispatcher contract, which skip what the machine cannot run and say why), then the grouped-GEMM
# benchmark at DeepSeek-V3 shapes against a dense matmul of the same FLOPs, naming the card.
#
#   scripts/gpu_check.sh                 # results under out/gpu/
#   GPU_CHECK_OUT=/tmp/gpu PYTHON=python3 scripts/gpu_check.sh -x   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT_DIR=${GPU_CHECK_OUT:-out/gpu}
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c 'import epruntime, torch' 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import torch and epruntime; install epruntime or set PYTHON (see docs/gpu.md)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print(f"gpu_check: {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}")'

status=0
"$PYTHON" -m pytest -q -rs -m gpu tests "$@" 2>&1 | tee "$OUT_DIR/pytest.log" || status=$?
"$PYTHON" scripts/bench_grouped_gemm.py --json "$OUT_DIR/grouped_gemm.json" 2>&1 | tee "$OUT_DIR/grouped_gemm.txt"
exit "$status"
