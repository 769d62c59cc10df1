# GPU step "experts": the fused experts' GPU tests (full model shapes, CUDA graph) and the layer
# benchmark (decode / forward / train for Qwen3-30B-A3B, DeepSeek-V3, Mixtral, OLMoE, with the
# tile-config sweep). Sourced by scripts/gpu_run.sh with OUT, PY and rc set. ~300 s on an H200.
mkdir -p "$OUT/experts"
HYPOTHESIS_PROFILE=ci timeout "${EXPERTS_TESTS_TIMEOUT:-120}" "$PY" -m pytest -q -rf --tb=short \
  -p no:cacheprovider -m "not notebook" -k "gpu or match_reference or deterministic" \
  tests/test_experts.py >"$OUT/experts/pytest_gpu.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
echo "experts tests: exit $code ($(tail -n 1 "$OUT/experts/pytest_gpu.log"))"
timeout "${EXPERTS_BENCH_TIMEOUT:-200}" "$PY" -m routerlib.bench.experts --sweep \
  --out "$OUT/experts" ${EXPERTS_ARGS:-} >"$OUT/experts/bench.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
echo "experts benchmark: exit $code"
grep -E "^target|wrote" "$OUT/experts/bench.log"
