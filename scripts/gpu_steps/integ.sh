# integ: end-to-end inference of the MoE LM (decode latency p50/p99, tokens/s per backend, batch
# 1/8/32, eager and CUDA graph; generated text), the Hugging Face drop-in's speedup (forward and
# generate, Qwen3-30B-A3B / OLMoE / Mixtral widths, 2 layers) and the GPU tests of both.
# Sourced by scripts/gpu_run.sh with OUT, PY, ROOT and rc set. About 150 s on an H200.
mkdir -p "$OUT/integ"
# the trained checkpoint: the balance step's $OUT/balance/balance_model.pt when it ran first,
# else one committed under results/ (else a toy model, labelled so in every row)
ckpt=$(ls -t "$OUT"/*/*model.pt "$OUT"/*/*/*model.pt results/*/*model.pt results/*/*/*model.pt \
  2>/dev/null | head -n 1)
timeout "${INTEG_BENCH_TIMEOUT:-170}" "$PY" -m routerlib.bench.inference --out "$OUT/integ" ${ckpt:+--checkpoint "$ckpt"} \
  >"$OUT/integ/inference.log" 2>&1
code=$?; rc=$((rc | code)); echo "inference bench: exit $code"; tail -n 30 "$OUT/integ/inference.log"
timeout "${INTEG_TESTS_TIMEOUT:-90}" "$PY" -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
  tests/test_generate.py tests/test_hf.py >"$OUT/integ/pytest_gpu_integ.log" 2>&1
code=$?; rc=$((rc | code)); echo "integ gpu tests: exit $code ($(tail -n 1 "$OUT/integ/pytest_gpu_integ.log"))"
