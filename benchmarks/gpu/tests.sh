#!/bin/bash
# The test suite on the lent GPU (all files but the notebook, whose Jupyter
# kernel packages the device image lacks). Verbose, so a killed run's log
# still lists every finished test.
# Usage: bash benchmarks/gpu/tests.sh SECONDS [WORKERS]
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
t0=$(date +%s)
timeout "${1:-300}" python3 -m pytest -v -n "${2:-14}" -p no:cacheprovider -o addopts="" \
    --ignore=tests/test_notebook.py tests > "$OUT/tests_gpu.log" 2>&1
echo "rc=$? $(( $(date +%s) - t0 ))s"
grep -c " PASSED" "$OUT/tests_gpu.log"; grep " FAILED\| ERROR" "$OUT/tests_gpu.log" | head -40
tail -3 "$OUT/tests_gpu.log"
