# The load-balancing study (notebook 03): the language model's GPU tests, then every balancing
# strategy trained at full size (routerlib.models.study), steps chosen so that the training fits
# BALANCE_BUDGET_S. Writes $OUT/balance/: balance.json/.csv, balance_history.npz,
# balance_model.pt, lm_trace.npz, lm_trace_none.npz, study.log, pytest_models.log.
# Commit balance.* under results/h200/ and lm_trace*.npz under results/traces/.
mkdir -p "$OUT/balance"
timeout "${BALANCE_TESTS_TIMEOUT:-75}" "$PY" -m pytest -q -rf --tb=short -p no:cacheprovider \
  -m gpu tests/test_models.py >"$OUT/balance/pytest_models.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
tail -n 3 "$OUT/balance/pytest_models.log"
timeout "${BALANCE_TIMEOUT:-215}" "$PY" -m routerlib.models.study --size full --no-progress \
  --budget-s "${BALANCE_BUDGET_S:-150}" --out "$OUT/balance" >"$OUT/balance/study.log" 2>&1
code=$?; [[ $code -eq 0 ]] || rc=$((rc | code))
tail -n 30 "$OUT/balance/study.log"
