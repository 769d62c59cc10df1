# GPU step "choice" (issue 17, item 1): the expert-choice kernels and the device bias update on
# the GPU (the gpu-marked tests: benchmark sizes exactly against the stable top-C of the
# kernel's scores, tie groups across chunks, CUDA graphs), then the expert-choice benchmark (its
# kernels compiled by then; torch.compile of the reference last). Sourced by scripts/gpu_run.sh
# with OUT, PY and rc set. ~110 s on an H200. Writes $OUT/choice/:
#   pytest_gpu.log                         tests/test_expert_choice.py, tests/test_bias_update.py
#   expert_choice.json, expert_choice.csv  routerlib.bench.expert_choice (rows: triton,
#                                          triton_graph, torch, compile; time_us medians),
#                                          rewritten after each case
#   bench.log
mkdir -p "$OUT/choice"
HYPOTHESIS_PROFILE=ci timeout "${CHOICE_TESTS_TIMEOUT:-75}" "$PY" -m pytest -q -rf --tb=short \
  -p no:cacheprovider -m gpu tests/test_expert_choice.py tests/test_bias_update.py \
  >"$OUT/choice/pytest_gpu.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
echo "choice tests: exit $code ($(tail -n 1 "$OUT/choice/pytest_gpu.log"))"
timeout "${CHOICE_BENCH_TIMEOUT:-75}" "$PY" -m routerlib.bench.expert_choice \
  --out "$OUT/choice" ${CHOICE_ARGS:-} >"$OUT/choice/bench.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
echo "choice benchmark: exit $code"
grep -E "fwd|wrote|compile" "$OUT/choice/bench.log" | tail -n 70
