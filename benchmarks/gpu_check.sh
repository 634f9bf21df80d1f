#!/usr/bin/env bash
# The GPU check of rwkvkit in one script: the `cuda` tests, then the benchmark.
# Run from the repository root on a machine with an NVIDIA GPU and nvcc:
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]
# Results go to RESULTS_DIR/gpu_results.txt (default: the current folder).
# Each part has its own time limit; a failing part does not stop the next.
set -u
DIR=${1:-.}
mkdir -p "$DIR"
RES="$DIR/gpu_results.txt"
PY=${PYTHON:-python3}
export PYTHONPATH=src PYTHONUNBUFFERED=1
: >"$RES"
log() { echo "$@" | tee -a "$RES"; }

log "== machine =="
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1; date -u; } 2>&1 | tee -a "$RES"

log "== pytest -m cuda tests/test_cuda.py =="
t0=$SECONDS
timeout 150 "$PY" -m pytest -q --tb=short -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$DIR/pytest_log.txt" | tail -30 | tee -a "$RES"
log "(pytest exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s)"

log "== benchmark =="
t0=$SECONDS
timeout "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/gpu_check.py --out "$RES" 2>&1 | tee "$DIR/bench_log.txt"
rc=${PIPESTATUS[0]}
log "(benchmark exit $rc, $((SECONDS - t0)) s)"
