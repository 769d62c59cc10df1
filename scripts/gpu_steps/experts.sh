# GPU step "experts": the fused experts' GPU tests (full model shapes, the torch._grouped_mm weight
# gradients on every layout, CUDA graph) and the layer benchmark (decode / forward / train for
# Qwen3-30B-A3B, OLMoE, DeepSeek-V3, Mixtral, with the tile-config sweep on Qwen3 and Mixtral).
# Sourced by scripts/gpu_run.sh with OUT, PY and rc set. At most 300 s on an H200 (tests <= 100 s,
# benchmark <= 200 s; it writes its file after every shape, so a cut run keeps what it measured).
mkdir -p "$OUT/experts"
HYPOTHESIS_PROFILE=ci timeout "${EXPERTS_TESTS_TIMEOUT:-100}" "$PY" -m pytest -q -rf --tb=short \
  -p no:cacheprovider -m "not notebook" -k "gpu or odd or capacity or deterministic" \
  tests/test_experts.py >"$OUT/experts/pytest_gpu.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
echo "experts tests: exit $code ($(tail -n 1 "$OUT/experts/pytest_gpu.log"))"
timeout "${EXPERTS_BENCH_TIMEOUT:-200}" "$PY" -m routerlib.bench.experts --sweep \
  --out "$OUT/experts" ${EXPERTS_ARGS:-} >"$OUT/experts/bench.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
echo "experts benchmark: exit $code"
grep -E "^target|wrote|: [0-9.]+ s$" "$OUT/experts/bench.log"
