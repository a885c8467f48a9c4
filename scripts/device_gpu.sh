#!/usr/bin/env bash
# Run on the lent GPU machine (device tool): GPU tests, then benchmarks.
#   bash scripts/device_gpu.sh [tests|bench1|bench2|all]
# Needs the nccl4py wheel carried in .whl/. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-out/device}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"
python3 -c "import nccl.core as n; print('nccl4py', n.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
    python3 -m pytest tests/engine/test_gpu.py -m gpu -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [[ $what == bench1 || $what == all ]]; then
    python3 -m dist_infer bench --model llama-3-8b --batch-size 1 8 64 --baseline hf 2>&1 | tee "$OUT/bench_tp1.log"
fi
if [[ $what == bench2 ]]; then
    ARGS=(--allow-run-as-root -x PYTHONPATH -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PYTHONUNBUFFERED)
    python3 -m dist_infer bench --model llama-3-8b --batch-size 1 64 --baseline hf 2>&1 | tee "$OUT/bench_h200_tp1.log"
    mpirun "${ARGS[@]}" -n 2 python3 -m dist_infer bench --model llama-3-8b --tp 2 --batch-size 1 64 2>&1 | tee "$OUT/bench_h200_tp2.log"
    mpirun "${ARGS[@]}" -n 2 python3 -m dist_infer bench --model llama-3-8b --pp 2 --batch-size 1 64 2>&1 | tee "$OUT/bench_h200_pp2.log"
fi
grep -h "BENCHMARK\|passed\|failed" "$OUT"/*.log 2>/dev/null
