# GPU step "quant" (issue 18): the quantization tests on the GPU, then the precision benchmark.
# Sourced by scripts/gpu_run.sh with OUT, PY, ROOT and rc set. Writes $OUT/quant/:
#   pytest_gpu_quant.log   tests/test_quant.py (the gpu-marked full-size checks included)
#   quant.json, quant.csv  routerlib.bench.quant (router paths, payload dispatch, layer error)
#   bench_quant.log
mkdir -p "$OUT/quant"
HYPOTHESIS_PROFILE=ci timeout 100 "$PY" -m pytest -q -rf --tb=short -p no:cacheprovider \
  tests/test_quant.py >"$OUT/quant/pytest_gpu_quant.log" 2>&1
code=$?; rc=$((rc | code))
echo "quant tests: exit $code ($(tail -n 1 "$OUT/quant/pytest_gpu_quant.log"))"
timeout 150 "$PY" -m routerlib.bench.quant --out "$OUT/quant" >"$OUT/quant/bench_quant.log" 2>&1
code=$?; rc=$((rc | code))
echo "quant bench: exit $code"; tail -n 5 "$OUT/quant/bench_quant.log"
