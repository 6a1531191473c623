#!/bin/bash
# GPU check of the library, in one call of the lent device machine (results:
# benchmarks/results/h100/, docs/benchmarks.md "On a GPU"). Part A: environment, matmul precision probe,
# GD benchmark (fp32 default and bf16), vmapped sweep, million-fact
# construction. Part B: roofline at full fp32 precision and the core tests.
# Part C: the tests that failed on the GPU (one process, full tracebacks),
# the construction tests, and the million-fact construction.
# Part D: the d = 128 capacity rows a 2-core CPU cannot finish (N = 4,096 and
# 8,192, full fp32 matmuls as on CPU; rows.csv starts from the CPU rows so
# finished points are skipped; rounds.jsonl too, so unfinished cells resume),
# the test suite beside them, then the roofline
# alone on the GPU. CAP_S bounds the capacity runs, TESTS_S the tests.
# Part E: capacity searches alone for CAP_S seconds (ALPHAS, METHODS,
# GEOMETRIES; default GD and encoder-decoder GD at d = 128, N = 8,192, the
# cells a 2-core CPU cannot finish), resuming from the rounds already logged; bring
# $OUT/cap/rows.csv and rounds.jsonl back into capacity_scaling_n8192/.
# Usage: bash benchmarks/gpu/check.sh A|B|C|D|E   (writes under $OUT).
set -u
part=${1:-A}
OUT=${OUT:-/tmp/gpu_out}; LOGS=/tmp/gpu_logs_$part; mkdir -p "$OUT" "$LOGS"
trap 'tar -czf "$OUT/logs_$part.tar.gz" -C "$LOGS" .' EXIT
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, never abort the script
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$LOGS/$name.log" 2>&1
  echo "[$name] rc=$? $(( $(date +%s) - t0 ))s"
}
cap_setup() {  # $OUT/cap starts from the CPU rows and logged rounds
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
  mkdir -p "$OUT/cap"
  cp experiments/results/capacity_scaling_n8192/rows.csv "$OUT/cap/"
  cp experiments/results/capacity_scaling_n8192/rounds.jsonl "$OUT/cap/" 2>/dev/null
}
if [ "$part" = A ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  python3 -c "import jax, flax, optax, chex; print(jax.__version__, flax.__version__, optax.__version__, chex.__version__, jax.devices())" | tee -a "$OUT/env.txt"
  run precision 40 python3 benchmarks/gpu/precision_probe.py
  tail -4 "$LOGS/precision.log"
  run gd_fp32 100 python3 benchmarks/gd.py --out=$OUT/gd_gpu.json
  run gd_bf16 45 python3 benchmarks/gd.py --skip_plain --compute_dtype=bfloat16 --out=$OUT/gd_gpu_bf16.json
  run sweep 45 python3 benchmarks/sweep.py --out=$OUT/sweep_gpu.json
  run million 150 python3 benchmarks/million.py --sizes=1048576 --quiet_wait_s=0 --max_minutes=30 --out=$OUT/million_gpu.json
  pkill -f benchmarks/million.py; true
  for f in gd_fp32 gd_bf16 sweep million; do echo "== $f"; grep -v "it/s\|^I1\|^W1\|tpu" "$LOGS/$f.log" | tail -6; done
elif [ "$part" = C ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
  run failed 150 python3 -m pytest -q -p no:xdist -p no:cacheprovider -o addopts="" --tb=long \
      "tests/test_construction.py::BatchedTest::test_vmapped_gadgets_match_loop" \
      "tests/test_locate_edit.py::MemitTest::test_vmap_equals_loop" \
      "tests/test_transformer.py::ScheduleTest::test_schedule_b_trains_through_constructed_mlp"
  grep -v "^I1\|^W1\|tpu" "$LOGS/failed.log" | grep -A12 "^E \|Error\|passed\|failed" | head -90
  run construction 150 python3 -m pytest -q -n 8 -p no:cacheprovider -o addopts="" --tb=short \
      tests/test_construction.py tests/test_streaming.py tests/test_editing.py
  tail -15 "$LOGS/construction.log"
  run million 120 python3 benchmarks/million.py --sizes=1048576 --quiet_wait_s=0 --max_minutes=30 --out=$OUT/million_gpu.json
  grep -v "it/s\|^I1\|^W1\|tpu" "$LOGS/million.log" | tail -6
elif [ "$part" = D ]; then
  cap_setup
  bash benchmarks/gpu/tests.sh "${TESTS_S:-360}" 10 > "$LOGS/tests_summary.txt" 2>&1 &
  cap="JAX_DEFAULT_MATMUL_PRECISION=highest python3 experiments/capacity_scaling.py \
      --dims=128 --geometries=isotropic --chunk_size=0 --out_dir=$OUT/cap"
  run cap "${CAP_S:-380}" bash -c "$cap --alphas=0.25 --methods=gd,encoder_decoder_gd \
      && $cap --alphas=0.5 --methods=encoder_decoder,gd,encoder_decoder_gd \
      && $cap --alphas=0.5 --methods=ntk,hebbian_ridge,hebbian_data"
  pkill -f experiments/capacity_scaling.py
  wait
  pkill -f pytest; sleep 1
  cat "$LOGS/tests_summary.txt"
  grep "\[.* s\]" "$LOGS/cap.log" | tail -n 40
  JAX_DEFAULT_MATMUL_PRECISION=highest run roofline "${ROOF_S:-130}" python3 benchmarks/roofline.py --roofline_out=$OUT/roofline_gpu.json
  grep -v "^I1\|^W1\|tpu" "$LOGS/roofline.log" | tail -25
elif [ "$part" = E ]; then
  cap_setup
  JAX_DEFAULT_MATMUL_PRECISION=highest run cap "${CAP_S:-540}" python3 \
      experiments/capacity_scaling.py --dims=128 \
      --geometries="${GEOMETRIES:-isotropic}" \
      --chunk_size=0 --out_dir=$OUT/cap --alphas="${ALPHAS:-0.5}" \
      --methods="${METHODS:-gd,encoder_decoder_gd}"
  pkill -f experiments/capacity_scaling.py
  tr '\r' '\n' < "$LOGS/cap.log" | grep " s\] " | tail -n 40
else
  JAX_DEFAULT_MATMUL_PRECISION=highest run roofline 100 python3 benchmarks/roofline.py --roofline_out=$OUT/roofline_gpu.json
  grep -v "^I1\|^W1\|tpu" "$LOGS/roofline.log" | tail -25
  run tests 200 python3 -m pytest -q -n 8 -p no:cacheprovider -o addopts="" \
      tests/test_construction.py tests/test_decodability.py tests/test_storage.py \
      tests/test_training.py tests/test_mlp.py tests/test_streaming.py \
      tests/test_methods.py tests/test_editing.py tests/test_baselines.py \
      tests/test_serialization_versions.py tests/test_capacity.py
  tail -30 "$LOGS/tests.log"
fi
