#!/usr/bin/env bash
# The GPU checks, in one go, for a CUDA machine that has torch (e.g. a rented H100/H200):
#   1. the library's tests with CUDA visible (train.device "auto" then trains on the GPU),
#   2. bench.training's GPU section (train_stage wafers/s, compact and the seed's vgg16),
#   3. bench.inference's GPU section (compact scoring wafers/s),
#   4. bench.cascade: the demo's whole training on the GPU, then a long FCN-8s-only cascade.
# Each step has its own time limit and its log goes to OUT; one failing step does not stop the rest.
#
#   bash bench/gpu_check.sh [OUT_DIR]     (default bench/results; exit status: failed steps)
set -u
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
failed=0

step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT/NAME.log, count failures
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  || { echo "no usable CUDA torch here"; exit 1; }

step gpu-tests 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" --timeout=120 \
  tests/test_models.py tests/test_metrics.py tests/test_train.py tests/test_predict.py tests/test_predict_fast.py \
  tests/test_data.py tests/test_padding.py tests/test_evaluate.py tests/test_verdicts.py tests/test_weak.py \
  tests/test_bench_smoke.py -k "not inference_bench and not geometry_bench and not memory_bench" -rs
step bench-training-gpu 150 $PY -m bench.training --sections gpu --results-dir "$OUT"
step bench-inference-gpu 90 $PY -m bench.inference --sections gpu --results-dir "$OUT"
step cascade-default 200 $PY -m bench.cascade --device cuda --results-dir "$OUT" --tag default-cuda
step cascade-fcn8s-long 200 $PY -m bench.cascade --device cuda --results-dir "$OUT" --tag fcn8s-long-cuda \
  --set train.final_stage=fcn8s --set train.fcn32s.epochs=12 --set train.fcn16s.epochs=24 \
  --set train.fcn8s.epochs=120
echo "failed steps: $failed"
exit "$failed"
