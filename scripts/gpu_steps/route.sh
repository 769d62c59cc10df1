# Step "route": the routing kernels' GPU tests (full sizes), then the targets benchmark of this
# tree and, when the lead put the pre-change tree in .before/, of that tree too, and a
# before/after table. About 400 s of an H200: tests 180 s (one process per file, at once),
# each targets run 100 s.
mkdir -p "$OUT/route"
route_files=(tests/test_route_rows.py tests/test_route_dispatch.py tests/test_kernel_plan.py
             tests/test_kernel_topk.py tests/test_kernel_dispatch_combine.py)
route_pids=()
for f in "${route_files[@]}"; do  # the gpu-marked (full-size) tests of each kernel file
  HYPOTHESIS_PROFILE=ci timeout "${ROUTE_TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -rf --tb=short \
    -p no:cacheprovider -m gpu -k "not bandwidth" "$f" \
    >"$OUT/route/pytest_$(basename "$f" .py).log" 2>&1 &
  route_pids+=($!)
done
# the correctness holes of issue 15 (ties at T=12289, fp32 weight gradient, check_finite, errors)
HYPOTHESIS_PROFILE=ci timeout "${ROUTE_TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -rf --tb=short \
  -p no:cacheprovider -k "ties or fp32_accurate or check_finite or clear_errors" \
  tests/test_triton_backend.py >"$OUT/route/pytest_test_triton_backend.log" 2>&1 &
route_pids+=($!)
for p in "${route_pids[@]}"; do
  wait "$p"; code=$?
  [[ $code -eq 0 || $code -eq 5 ]] || rc=$((rc | code))
done
for f in "$OUT"/route/pytest_*.log; do
  echo "$(basename "$f"): $(grep -E "passed|failed|error|no tests ran" "$f" | tail -n 1)"
done
targets_args=(--sections route,dispatch,decode --warmup 10 --rep 50
             --budget-s "${ROUTE_TARGETS_BUDGET:-75}")
timeout 100 "$PY" -m routerlib.bench.targets --backends triton,torch "${targets_args[@]}" \
  --out "$OUT/route/targets" >"$OUT/route/targets.log" 2>&1 || rc=$((rc | 1))
tail -n 22 "$OUT/route/targets.log"
if [[ -d .before ]]; then  # the pre-change tree, with its own (old) CLI
  (cd .before && PYTHONPATH="$PWD" timeout 100 "$PY" -m routerlib.bench.targets \
     --backends triton,torch "${targets_args[@]}" --out "$OUT/route/targets_before" \
     >"$OUT/route/targets_before.log" 2>&1) || rc=$((rc | 1))
  "$PY" scripts/compare_targets.py "$OUT/route/targets_before.json" "$OUT/route/targets.json" \
    | tee "$OUT/route/before_after.txt"
fi
