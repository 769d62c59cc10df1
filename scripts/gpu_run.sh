#!/usr/bin/env bash
# One call on a GPU machine: environment, GPU tests, sanitizer, benchmarks. Everything lands in $OUT
# (default build/gpu). Steps are chosen with GPU_STEPS (default: all), e.g. GPU_STEPS="env tests".
#   env        card, driver, versions
#   tests      pytest on the GPU (full-size kernel checks included)
#   sanitize   compute-sanitizer memcheck + racecheck over every kernel
#   baseline   the standard configurations, every stage, the PyTorch reference (+ graphs, profile)
#   compile    torch.compile of the reference routing stages
#   kernels    the sweep with the Triton backend
#   tune       launch-config sweep of the kernels (the defaults are its winners)
#   breakdown  where the routing time goes: device time per kernel, host time of an eager call
#   targets    the issue's targets: kernels vs reference, compile and peers, in one run
#   ncu        Nsight Compute of the route's kernels (three launches, no grid barrier) at the
#              prefill target (T=16384 E=128) and decode (T=64 E=64): speed of light, warp
#              stalls, scheduler, occupancy, instruction mix
#   <name>     any scripts/gpu_steps/<name>.sh: one file per stage (experts, balance, quant, ...)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/build/gpu}"
mkdir -p "$OUT"
# Default: every step, more than one 10-minute call of a lent machine takes: those run subsets
# (GPU_STEPS="route experts" ...).
STEPS="${GPU_STEPS:-env tests sanitize baseline compile kernels tune targets route experts choice quant balance integ ep}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PY:-python3}"
# Peer wheels (torchtitan, DeepSpeed) travel in .whl when carried (scripts/fetch_peer_wheels.sh).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$OUT/peers_install.log" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
has() { [[ " $STEPS " == *" $1 "* ]]; }
rc=0

if has env; then
  { nvidia-smi; "$PY" -m routerlib.bench.envinfo; } >"$OUT/env.txt" 2>&1
  head -n 20 "$OUT/env.txt"
fi
if has tests; then
  # the kernel, benchmark and target tests on the GPU (full-size checks are marked gpu); the
  # reference suite is device-independent and runs in CI. One pytest process per file, all at
  # once: the time goes to compiling kernel variants on the CPU (one process did not finish in
  # 330 s). The bandwidth test times kernels, so it runs alone afterwards. GPU_TESTS: files
  # (and pytest options, e.g. "-m gpu", passed to every process).
  files=() opts=()
  for a in ${GPU_TESTS:-tests/test_kernel_*.py tests/test_route_rows.py tests/test_targets.py \
      tests/test_bench.py tests/test_router_layer.py}; do
    if [[ "$a" == *.py || "$a" == *::* ]]; then files+=("$a"); else opts+=("$a"); fi
  done
  # GPU_TEST_CHUNKS=N: each file's collected tests in N processes (round robin)
  chunks="${GPU_TEST_CHUNKS:-1}"
  ids_dir=$(mktemp -d)  # not under $OUT: what comes back from the device is limited in count
  pids=()
  declare -A seen=()  # one file named twice (file::test ids): its logs must not collide
  for f in "${files[@]}"; do
    name=$(basename "${f%%::*}" .py)
    seen[$name]=$(( ${seen[$name]:-0} + 1 ))
    [[ ${seen[$name]} -eq 1 ]] || name="${name}_id${seen[$name]}"
    sel=(-m "not notebook" -k "not bandwidth" -p no:cacheprovider "${opts[@]}")
    if [[ $chunks -gt 1 ]]; then
      "$PY" -m pytest --co -q "${sel[@]}" "$f" 2>/dev/null | grep "::" >"$ids_dir/$name.txt"
      split -n "r/$chunks" -d "$ids_dir/$name.txt" "$ids_dir/${name}_"
      parts=("$ids_dir/${name}"_*)
    else
      parts=("")
    fi
    for part in "${parts[@]}"; do
      tag="$name${part:+_${part##*_}}"
      if [[ -n "$part" ]]; then mapfile -t targets <"$part"; else targets=("$f"); fi
      [[ ${#targets[@]} -gt 0 ]] || continue  # an empty chunk would run the whole suite
      HYPOTHESIS_PROFILE=ci timeout "${TESTS_TIMEOUT:-330}" "$PY" -m pytest -q -rf --tb=short \
        "${sel[@]}" --junitxml="$ids_dir/pytest_gpu_$tag.xml" "${targets[@]}" \
        >"$OUT/pytest_gpu_$tag.log" 2>&1 &
      pids+=($!)
    done
  done
  ran=0  # exit 5: nothing selected in that file (e.g. -m gpu); a failure only if in every file
  for p in "${pids[@]}"; do
    wait "$p"; code=$?
    if [[ $code -ne 5 ]]; then ran=1; rc=$((rc | code)); fi
  done
  [[ $ran -eq 1 ]] || rc=$((rc | 5))
  if [[ " ${files[*]} " == *test_kernel_dispatch_combine* ]]; then
    HYPOTHESIS_PROFILE=ci timeout 150 "$PY" -m pytest -q -rf --tb=short -p no:cacheprovider \
      -k bandwidth tests/test_kernel_dispatch_combine.py >"$OUT/pytest_gpu_bandwidth.log" 2>&1
    code=$?; [[ $code -eq 5 ]] || rc=$((rc | code))
  fi
  for f in "$OUT"/pytest_gpu_*.log; do
    last=$(grep -E "passed|failed|error|skipped|deselected|no tests ran" "$f" | tail -n 1)
    echo "$(basename "$f"): $last"
  done | tee "$OUT/pytest_gpu_summary.txt"
  # the device returns few files: the logs travel as one archive
  tar czf "$OUT/pytest_gpu_logs.tgz" -C "$OUT" $(cd "$OUT" && ls pytest_gpu_*.log) \
    && rm -f "$OUT"/pytest_gpu_*.log
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    timeout "${SANITIZE_TIMEOUT:-110}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" scripts/sanitize_kernels.py ${SANITIZE_ARGS:-} >"$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(tail -n 1 "$OUT/sanitizer_$tool.log"))"
  done
fi
if has baseline; then
  timeout 420 "$PY" -m routerlib.bench --configs all --tokens decode,prefill --backends torch \
    --stages all --cuda-graph --profile --no-progress --out "$OUT/baseline" 2>&1 | tail -n 30
fi
if has compile; then  # compiling takes 10-60 s a case: the routing stages, two sizes
  timeout 400 "$PY" -m routerlib.bench --configs all --tokens 64,16384 --backends compile \
    --stages route,dispatch,combine --no-progress --out "$OUT/baseline_compile" 2>&1 | tail -n 20
fi
if has kernels; then
  timeout "${KERNELS_TIMEOUT:-200}" "$PY" -m routerlib.bench --configs all --tokens decode,prefill \
    --backends triton \
    --stages route,dispatch,combine,backward --cuda-graph --no-progress --out "$OUT/kernels" \
    2>&1 | tail -n 30
fi
if has tune; then
  timeout "${TUNE_TIMEOUT:-150}" "$PY" -m routerlib.bench.tune ${TUNE_ARGS:-} --out "$OUT/tune" 2>&1 | tail -n 12
fi
if has breakdown; then
  timeout 180 "$PY" -m routerlib.bench.route_breakdown --out "$OUT/route_breakdown.json" 2>&1 \
    | tail -n 60
fi
if has ncu; then
  sections=(--section SpeedOfLight --section WarpStateStats --section SchedulerStats
            --section Occupancy --section LaunchStats --section InstructionStats
            --section MemoryWorkloadAnalysis)
  for te in "16384 128 9 3" "64 64 6 2"; do
    read -r t e skip count <<<"$te"
    timeout "${NCU_TIMEOUT:-120}" ncu --clock-control none \
      --kernel-name regex:'_rows_|_tiles_|_slots_' --launch-skip "$skip" --launch-count "$count" \
      "${sections[@]}" "$PY" scripts/time_route.py --profile --T "$t" --E "$e" \
      >"$OUT/ncu_route_T${t}_E${e}.txt" 2>&1
    echo "ncu T=$t E=$e: exit $?"
  done
fi
if has targets; then
  timeout "${TARGETS_TIMEOUT:-240}" "$PY" -m routerlib.bench.targets ${TARGETS_ARGS:-} --out "$OUT/targets" 2>&1 \
    | tail -n 40
fi
# Steps of the other stages live in scripts/gpu_steps/<step>.sh (sourced with OUT, PY, rc set).
for step in $STEPS; do
  if [[ -f "scripts/gpu_steps/$step.sh" ]]; then
    echo "== step $step"
    mkdir -p "$OUT/$step"
    t0=$SECONDS
    source "scripts/gpu_steps/$step.sh" || rc=$((rc | 1))
    echo "== step $step: $((SECONDS - t0)) s, rc so far $rc"
  fi
done
# The device returns at most 8 files: every folder under $OUT travels as one archive.
dirs=$(cd "$OUT" && find . -mindepth 1 -maxdepth 1 -type d -printf '%f\n')
if [[ -n "$dirs" ]]; then
  tar czf "$OUT/steps.tgz" -C "$OUT" $dirs && (cd "$OUT" && rm -rf $dirs)
fi
exit $rc
