#!/usr/bin/env bash
# The GPU check of rwkvkit in one script: the `cuda` tests, then the benchmark.
# Run from the repository root on a machine with an NVIDIA GPU and nvcc:
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]
# Results go to RESULTS_DIR/gpu_results.txt (default: the current folder).
# Each part has its own time limit; a failing part does not stop the next.
# The whole run is sized for under ~8 minutes on an H200 (PYTEST_TIMEOUT +
# BENCH_TIMEOUT + the install); SECTIONS picks benchmark sections
# (see benchmarks/gpu_check.py --help).
#
# flash-linear-attention 0.6.0 (fla, the comparison for RWKV-6/7) is installed
# from wheels in .whl/ when that folder exists (the device machine has no
# network: download them beforehand with
#     pip download --no-deps -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0 einops transformers==5.24.0
# and carry .whl to the machine), else from the package index.
set -u
DIR=${1:-.}
mkdir -p "$DIR"
RES="$DIR/gpu_results.txt"
PY=${PYTHON:-python3}
export PYTHONPATH=src PYTHONUNBUFFERED=1
: >"$RES"
log() { echo "$@" | tee -a "$RES"; }
T_ALL=$SECONDS

log "== machine =="
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; nvcc --version | tail -1; date -u; } 2>&1 | tee -a "$RES"

log "== install flash-linear-attention==0.6.0 =="
t0=$SECONDS
if "$PY" -c "import fla, sys; sys.exit(0 if fla.__version__ == '0.6.0' else 1)" 2>/dev/null; then
    log "fla 0.6.0 already installed"
else
    if [ -d .whl ]; then
        # --no-deps: torch and triton come with the machine's CUDA torch; einops and
        # (for fla.models) transformers >= 5.6 from .whl only where missing or too old.
        "$PY" -m pip install -q --no-index --find-links .whl --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 2>&1 | tail -3 | tee -a "$RES"
        "$PY" -c "import einops" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links .whl --no-deps einops 2>&1 | tail -3 | tee -a "$RES"
        "$PY" -c "import transformers as t, sys; sys.exit(0 if int(t.__version__.split('.')[0]) >= 5 else 1)" 2>/dev/null \
            || "$PY" -m pip install -q --no-index --find-links .whl --no-deps transformers==5.24.0 2>&1 | tail -3 | tee -a "$RES"
    else
        timeout 180 "$PY" -m pip install -q flash-linear-attention==0.6.0 2>&1 | tail -3 | tee -a "$RES"
    fi
    "$PY" -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1 | tee -a "$RES"
fi
log "(install $((SECONDS - t0)) s)"

log "== pytest -m cuda tests/test_cuda.py tests/test_cuda_rwkv67.py =="
t0=$SECONDS
timeout "${PYTEST_TIMEOUT:-200}" "$PY" -m pytest -q --tb=short -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_cuda_rwkv67.py 2>&1 | tee "$DIR/pytest_log.txt" | tail -40 | tee -a "$RES"
log "(pytest exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s)"

log "== benchmark =="
t0=$SECONDS
SECTIONS=${SECTIONS:-wkv67,train7,decode7,rwkv4bf16,wkv4,decode4}
timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/gpu_check.py --out "$RES" --quick --sections "$SECTIONS" \
    --budget "${BENCH_BUDGET:-250}" 2>&1 | tee "$DIR/bench_log.txt"
rc=${PIPESTATUS[0]}
log "(benchmark exit $rc, $((SECONDS - t0)) s; whole check $((SECONDS - T_ALL)) s)"
