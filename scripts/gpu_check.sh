#!/usr/bin/env bash
# The one device check: on a GPU machine, with its own python3 and preinstalled CUDA torch (no venv,
# installs nothing, needs no network), in under 8 minutes on one H200. Every step has its own time
# limit and writes JSON under $OUT; a step that fails or times out is recorded and the next one runs.
#
#   env           the card, driver, torch, CUDA and NCCL versions, what imports (deep_ep, deep_gemm)
#   pytest        every test marked gpu (junit summary; tests needing what is missing skip saying why)
#   grouped_gemm  expert-stage bf16 TFLOP/s against a dense GEMM of the same FLOPs (H 7168, I 2048,
#                 8 and 9 local experts, 512 to 8192 uneven rows)
#   masked        the masked stage captured in a CUDA graph against the eager valid-rows stage
#   layer         a one-rank NCCL world: flat and lowlatency, shared expert serial against overlap,
#                 micro_batches 2, and the lowlatency layer replayed from a CUDA graph against eager
#
# $OUT/gpu_check.json gathers them all (steps with exit status and seconds, then each step's figures).
#
#   scripts/gpu_check.sh                        # OUT=out/gpu, PYTHON=python3
#   OUT=/tmp/gpu scripts/gpu_check.sh -x        # extra arguments go to pytest
#   GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh    # tiny shapes, runs on a CPU (how the script itself is tested)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUT"
: >"$OUT/steps.tsv"

# run_step NAME LIMIT_S COMMAND...: output to $OUT/NAME.log, one line "NAME rc seconds limit" to steps.tsv.
run_step() {
    local name=$1 limit=$2 start rc=0
    shift 2
    start=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" "$limit" >>"$OUT/steps.tsv"
    echo "gpu_check: $name exit $rc in $(($(date +%s) - start)) s (limit $limit s, log $OUT/$name.log)"
}

collect() {
    if ! "$PYTHON" scripts/gpu_figures.py collect "$OUT" >/dev/null; then
        echo "gpu_check: could not write $OUT/gpu_check.json; the steps are in $OUT/steps.tsv" >&2
    fi
    echo "gpu_check: figures in $OUT/gpu_check.json"
}

dry=()
bench=()
pytest_mode=()
if [[ $DRY_RUN == 1 ]]; then
    dry=(--dry-run)
    bench=(--device cpu --hidden 256 --intermediate 128 --experts 2 3 --rows 64 128 --warmup 0 --iters 1)
    pytest_mode=(--collect-only)
fi

# The limits add up to 7 minutes 30 s with the kill grace: the whole check stays within 8 minutes.
run_step env 30 "$PYTHON" scripts/gpu_figures.py env --json "$OUT/env.json"
if [[ $DRY_RUN != 1 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible to $PYTHON (see $OUT/env.log); run this on a GPU machine" >&2
    printf 'cuda\t2\t0\t0\n' >>"$OUT/steps.tsv"  # recorded as a failed step: nothing else ran
    collect
    exit 2
fi
run_step pytest 130 "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider --junitxml "$OUT/pytest.xml" \
    "${pytest_mode[@]}" tests "$@"
run_step grouped_gemm 100 "$PYTHON" scripts/bench_grouped_gemm.py "${bench[@]}" --json "$OUT/grouped_gemm.json"
run_step masked 50 "$PYTHON" scripts/gpu_figures.py masked "${dry[@]}" --json "$OUT/masked.json"
run_step layer 110 "$PYTHON" scripts/gpu_figures.py layer "${dry[@]}" --json "$OUT/layer.json"
collect
if [[ $(cut -f2 "$OUT/steps.tsv" | sort -u) != 0 ]]; then
    exit 1
fi
