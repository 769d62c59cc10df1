# Expert parallelism (issue 19): the gpu- and multigpu-marked tests of tests/test_parallel.py
# (pack / unpack on the GPU, the EP layer with a group of size 1 against MoELayer; with 2+ GPUs
# the gloo checks over NCCL), then scripts/ep_gpu.py under torchrun on every GPU of the machine
# (correctness against the single-GPU layer, all-to-all bandwidth against plain NCCL, layer time
# and tokens/s). Results: $OUT/ep/ep_w<W>.json; logs beside it.
mkdir -p "$OUT/ep"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
HYPOTHESIS_PROFILE=ci timeout 150 "$PY" -m pytest -q -rf --tb=short -m "gpu or multigpu" -p no:cacheprovider \
  tests/test_parallel.py >"$OUT/ep/pytest_gpu_parallel.log" 2>&1 || rc=$((rc | 1))
tail -n 3 "$OUT/ep/pytest_gpu_parallel.log"
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)
[[ "${ngpu:-0}" -ge 1 ]] || ngpu=1
timeout "${EP_TIMEOUT:-120}" "$PY" -m torch.distributed.run --standalone \
  --nproc_per_node="$ngpu" scripts/ep_gpu.py --out "$OUT/ep" \
  >"$OUT/ep/ep_gpu.log" 2>&1 || rc=$((rc | 2))
tail -n 40 "$OUT/ep/ep_gpu.log"
