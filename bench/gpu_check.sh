#!/usr/bin/env bash
# GPU check for the "triton" algorithm, in one short run on a CUDA host: the CUDA test subset, then
# bench/bench_gpu.py (triton and im2col vs cuDNN on ResNet-50 shapes), as called and as CUDA-graph replays. Uses only what the host already
# has (python3 with torch and triton; pytest if present): no venv, no pip, no network.
#
#   bash bench/gpu_check.sh [results.md]        # default results/gpu_check.md (and $OUT/ if OUT is set)
#
# The service's CUDA tests (tests/app/test_cuda.py) run too where fastapi & co import: a bare GPU host
# gets them as wheels from bench/gpu_wheels.sh (see docs/gpu.md, "Running the GPU check").
#
# Time: capped at TEST_SECONDS + 2 x BENCH_SECONDS (6.5 minutes); on an H200 on 2026-11-27 the tests
# took 45-52 s with 12 xdist workers and one benchmark 50-62 s. The tests run without autotuning
# (CONV_TRITON_AUTOTUNE=0: one config per kernel, far fewer compiles) under TEST_SECONDS; each benchmark
# starts no new shape after BENCH_BUDGET seconds and is killed at BENCH_SECONDS. Whatever was cut is
# printed, not hidden.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS=${1:-results/gpu_check.md}
PYTHON=${PYTHON:-python3}
TEST_SECONDS=${TEST_SECONDS:-120}
BENCH_BUDGET=${BENCH_BUDGET:-100}
BENCH_SECONDS=${BENCH_SECONDS:-130}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
start=$SECONDS

"$PYTHON" - <<'EOF' || { echo "gpu_check: torch/triton/CUDA not usable here"; exit 1; }
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print(f"gpu_check: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
EOF

status=0
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    # pytest-xdist, where the host has it, spreads the Triton compiles over the CPU cores (a cold
    # Triton cache makes compiling, not running, most of this step).
    workers=()
    if "$PYTHON" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-12}"); fi
    # The service's CUDA tests need its own dependencies (fastapi, pydantic-settings, orjson, uvicorn),
    # which a bare GPU host may lack: run them where they import.
    service=()
    if "$PYTHON" -c "import fastapi, pydantic_settings, orjson, uvicorn" 2>/dev/null; then service=(tests/app/test_cuda.py); fi
    junit=()
    if [ -n "${OUT:-}" ]; then junit=(--junitxml "$OUT/cuda_tests.xml"); fi
    echo "== CUDA tests (every algorithm's parity on cuda, triton in float32/float16/bfloat16${service[*]:+, the service on cuda}; ${TEST_SECONDS}s cap; ${workers[*]:-1 process})"
    CONV_TRITON_AUTOTUNE=0 timeout "$TEST_SECONDS" "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" --maxfail=200 --tb=short -rfE \
        "${workers[@]}" "${junit[@]}" -k cuda tests/kernels "${service[@]}"
    rc=$?
    case $rc in
        0) echo "== CUDA tests: passed" ;;
        124) echo "== CUDA tests: cut off after ${TEST_SECONDS}s (not all ran)"; status=1 ;;
        5) echo "== CUDA tests: none selected" ;;
        *) echo "== CUDA tests: FAILED (pytest exit $rc)"; status=1 ;;
    esac
else
    echo "== pytest is not installed here: skipping the CUDA tests (the benchmark still records each provider's error vs cuDNN)"
fi

echo "== benchmark (${BENCH_BUDGET}s budget for new shapes, killed at ${BENCH_SECONDS}s)"
timeout "$BENCH_SECONDS" "$PYTHON" -m bench.bench_gpu --results "$RESULTS" --budget "$BENCH_BUDGET"
rc=$?
if [ $rc -ne 0 ]; then
    echo "== benchmark: exit $rc (124 = killed by the time cap)"
    status=1
fi
# The same shapes with both sides captured in CUDA graphs: the GPU work alone, without the host cost
# of issuing it (bench_gpu --graphs). Results beside the main ones, *_graphs.md.
GRAPHS_RESULTS="${RESULTS%.md}_graphs.md"
echo "== benchmark, CUDA-graph replays (${BENCH_BUDGET}s budget for new shapes, killed at ${BENCH_SECONDS}s)"
timeout "$BENCH_SECONDS" "$PYTHON" -m bench.bench_gpu --graphs --results "$GRAPHS_RESULTS" --budget "$BENCH_BUDGET"
rc=$?
if [ $rc -ne 0 ]; then
    echo "== benchmark (graphs): exit $rc (124 = killed by the time cap)"
    status=1
fi
echo "== gpu_check done in $((SECONDS - start))s; results: $RESULTS and $GRAPHS_RESULTS${OUT:+ (and in $OUT/)}"
exit $status
