#!/usr/bin/env bash
# The GPU check in one command, for a lent H100/H200 machine (one device `run` call, under 10 minutes):
#
#     bash benchmarks/gpu_run.sh                      # FXSPARSE_GIT_REV=<rev> names the code where .git is absent
#
# 1. installs the project without dependencies (that machine has torch, triton, transformers and peft, and no
#    package registry); if pip cannot, the packages are put on PYTHONPATH through a folder of links;
# 2. runs the kernel tests (tests/codegen) on CUDA;
# 3. runs benchmarks/gpu_kernels.py (about 6 minutes on an H200; --budget-s keeps it inside its time), which
#    appends to benchmarks/results/gpu_kernels.csv and regenerates gpu_kernels.md;
# 4. copies the CSV, the markdown and the logs to $OUT when it is set (at most 8 files come back from there).
#
# Extra arguments go to gpu_kernels.py (e.g. --only s2ft). The exit status is the benchmark's (0: every check
# passed), or the tests' when they failed and the benchmark did not.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${OUT:-/tmp/fxsparse-gpu-run}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
export FXSPARSE_CACHE_DIR=${FXSPARSE_CACHE_DIR:-/tmp/fxsparse-cache}
unset TRITON_INTERPRET FXSPARSE_KERNELS
start=$(date +%s)
stamp() { echo "[gpu_run +$(( $(date +%s) - start ))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1 | tee "$LOG_DIR/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG_DIR/device.txt"

stamp "install"
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$LOG_DIR/install.log" 2>&1; then
    # fxsparse.passes / fxsparse.codegen live in passes/ and codegen/: a folder of links gives that layout
    stamp "pip install failed (see install.log): using PYTHONPATH with a linked package folder"
    shim=/tmp/fxsparse-shim/fxsparse
    rm -rf /tmp/fxsparse-shim && mkdir -p "$shim"
    for f in fxsparse/*; do ln -s "$PWD/$f" "$shim/$(basename "$f")"; done
    ln -s "$PWD/passes" "$shim/passes"
    ln -s "$PWD/codegen" "$shim/codegen"
    export PYTHONPATH=/tmp/fxsparse-shim${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import fxsparse, fxsparse.codegen; print('fxsparse from', fxsparse.__file__)" 2>&1 | tee -a "$LOG_DIR/install.log"

stamp "tests/codegen on CUDA"
set -o pipefail
timeout "${TEST_TIMEOUT_S:-180}" $PY -m pytest -q -p no:cacheprovider tests/codegen 2>&1 | tee "$LOG_DIR/pytest_codegen.log"
tests_rc=$?

stamp "benchmarks/gpu_kernels.py"
timeout "${BENCH_TIMEOUT_S:-360}" $PY benchmarks/gpu_kernels.py --allow-dirty --budget-s "${BENCH_BUDGET_S:-280}" "$@" \
    2>&1 | tee "$LOG_DIR/gpu_kernels.log"
bench_rc=$?

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/gpu_kernels.csv benchmarks/results/gpu_kernels.md "$OUT"/ 2>/dev/null
fi
stamp "done: tests exit $tests_rc, benchmark exit $bench_rc"
if [ "$bench_rc" -ne 0 ]; then exit "$bench_rc"; fi
exit "$tests_rc"
