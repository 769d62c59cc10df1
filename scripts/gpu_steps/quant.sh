# GPU step "quant" (issue 18): the quantization tests on the GPU, then the precision benchmark.
# Sourced by scripts/gpu_run.sh with OUT, PY, ROOT and rc set. Expected ~150 s of H200 time,
# 180 s at most (tests <= 60 s, mostly compiling; benchmark <= 120 s, its result file rewritten
# after each part). Writes $OUT/quant/:
#   pytest_gpu_quant_full.log   the gpu-marked full-size checks (autotuned kernels)
#   pytest_gpu_quant_small.log  the rest of tests/test_quant.py on the GPU (one pinned launch
#                               config for the payload kernel: no autotuning per small shape)
#   quant.json, quant.csv       routerlib.bench.quant (payload, fp8 experts, router, layer)
#   bench_quant.log
mkdir -p "$OUT/quant"
HYPOTHESIS_PROFILE=ci timeout 60 "$PY" -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
  tests/test_quant.py >"$OUT/quant/pytest_gpu_quant_full.log" 2>&1 &
p_full=$!
ROUTERLIB_QUANT_DISPATCH_CONFIG=default HYPOTHESIS_PROFILE=ci timeout 60 "$PY" -m pytest -q -rf \
  --tb=short -p no:cacheprovider -m "not gpu" tests/test_quant.py \
  >"$OUT/quant/pytest_gpu_quant_small.log" 2>&1 &
p_small=$!
for p in $p_full $p_small; do wait "$p"; code=$?; rc=$((rc | code)); done
for f in "$OUT"/quant/pytest_gpu_quant_*.log; do
  echo "$(basename "$f"): $(tail -n 1 "$f")"
done
timeout 120 "$PY" -m routerlib.bench.quant --out "$OUT/quant" >"$OUT/quant/bench_quant.log" 2>&1
code=$?; rc=$((rc | code))
echo "quant bench: exit $code"; tail -n 8 "$OUT/quant/bench_quant.log"
