#!/usr/bin/env bash
# Run on the lent GPU machine (device tool): GPU tests, then benchmarks.
#   bash scripts/device_gpu.sh [tests|bench1|bench2|allreduce|pipeline|engine|all]
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
    python3 -m pytest tests/engine tests/workers/test_beam_search_gpu.py tests/comm/test_custom_all_reduce_gpu.py -m gpu -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
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
if [[ $what == allreduce ]]; then
    # TP=2's all-reduce: correctness against NCCL, latency per size, and the 8B decode at
    # TP=1, TP=2 over NCCL only (the baseline) and TP=2 with the one-shot kernel, one call.
    ARGS=(--allow-run-as-root -x PYTHONPATH -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PYTHONUNBUFFERED)
    nvidia-smi topo -m 2>&1 | tee "$OUT/topo.txt"
    python3 -m pytest tests/comm/test_custom_all_reduce_gpu.py -m gpu -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/allreduce_tests.log"
    mpirun "${ARGS[@]}" -n 2 python3 scripts/bench_all_reduce.py --out "$OUT/allreduce.json" 2>&1 | tee "$OUT/allreduce_bench.log"
    python3 -m dist_infer bench --model llama-3-8b --batch-size 1 64 2>&1 | tee "$OUT/bench_ar_tp1.log"
    DIST_INFER_CUSTOM_ALL_REDUCE=0 mpirun "${ARGS[@]}" -x DIST_INFER_CUSTOM_ALL_REDUCE -n 2 python3 -m dist_infer bench --model llama-3-8b --tp 2 --batch-size 1 64 2>&1 | tee "$OUT/bench_ar_tp2_nccl.log"
    mpirun "${ARGS[@]}" -n 2 python3 -m dist_infer bench --model llama-3-8b --tp 2 --batch-size 1 64 2>&1 | tee "$OUT/bench_ar_tp2_custom.log"
    # Where the batch-1 step goes at TP=1 and TP=2 (per-kernel, eager): what does not halve with TP.
    python3 scripts/profile_step.py --batch 1 2>&1 | tee "$OUT/profile_tp1_b1.log"
    mpirun "${ARGS[@]}" -n 2 python3 scripts/profile_step.py --tp 2 --batch 1 2>&1 | tee "$OUT/profile_tp2_b1.log"
fi
if [[ $what == pipeline ]]; then
    # Pipelined PP (two GPUs): max-load 128/128 x 1,024 on one GPU, and at PP=2 with the stages in turn
    # (--pipeline-depth 1), one micro-batch per stage (the default) and three micro-batches; with $BEFORE
    # (e.g. `git archive <rev> | tar -x -C .base`) also PP=2 from that tree. Alternated twice in one call.
    ARGS=(--allow-run-as-root -x PYTHONPATH -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PYTHONUNBUFFERED)
    LOAD=(--model llama-3-8b --num-requests 1024 --input-len 128 --output-len 128)
    for run in 1 2; do
        python3 -m dist_infer bench "${LOAD[@]}" --output-json "$OUT/pp1_$run.json" 2>&1 | tee "$OUT/pp1_$run.log"
        for depth in 1 2 3; do
            mpirun "${ARGS[@]}" -n 2 python3 -m dist_infer bench "${LOAD[@]}" --pp 2 --pipeline-depth $depth \
                --output-json "$OUT/pp2_depth${depth}_$run.json" 2>&1 | tee "$OUT/pp2_depth${depth}_$run.log"
        done
        if [[ -n ${BEFORE:-} ]]; then
            B=$(cd "$BEFORE" && pwd)
            (cd "$B" && PYTHONPATH=${PYTHONPATH/$PWD/$B} mpirun "${ARGS[@]}" -n 2 python3 -m dist_infer bench \
                "${LOAD[@]}" --pp 2 --output-json "$OUT/pp2_before_$run.json") 2>&1 | tee "$OUT/pp2_before_$run.log"
        fi
    done
fi
if [[ $what == engine ]]; then
    # A real partition -> build -> load -> run on GPU (random 1B-shape Llama saved by transformers):
    # build time, first load (Triton compiles), second load (kernels from the engine's cache).
    W=/tmp/engine-check; rm -rf $W; mkdir -p $W
    python3 - <<'PY' 2>&1 | tee "$OUT/engine.log"
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained("/tmp/engine-check/hf")
open("/tmp/engine-check/p.jsonl", "w").write("".join(json.dumps({"input_ids": list(range(5 + i, 60 + 7 * i))}) + "\n" for i in range(8)))
print("saved", sum(p.numel() for p in model.parameters()) / 1e9, "B params")
PY
    ARGS=(--allow-run-as-root -x PYTHONPATH -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PYTHONUNBUFFERED)
    for TP in 1 2; do
        { time python3 -m dist_infer partition --model $W/hf --tp $TP --out $W/ckpt$TP --quiet; } 2>&1 | tee -a "$OUT/engine.log"
        { time mpirun "${ARGS[@]}" -n $TP python3 -m dist_infer build --checkpoint $W/ckpt$TP --out $W/engine$TP --dtype bfloat16 --max-batch-size 8; } 2>&1 | tee -a "$OUT/engine.log"
        for attempt in first second; do
            echo "== TP=$TP $attempt load" | tee -a "$OUT/engine.log"
            { time mpirun "${ARGS[@]}" -n $TP python3 -m dist_infer run --engine $W/engine$TP --device cuda --prompts-file $W/p.jsonl --max-new-tokens 64 --ignore-eos --json > $W/out$TP-$attempt.jsonl; } 2>&1 | grep -v "^$" | tee -a "$OUT/engine.log"
        done
        python3 -c "
import json, sys
ids = [[json.loads(l)['output_ids'] for l in open(f)] for f in sys.argv[1:]]
print('TP=$TP tokens identical across the two loads:', ids[0] == ids[1])" $W/out$TP-first.jsonl $W/out$TP-second.jsonl | tee -a "$OUT/engine.log"
    done
    python3 -c "
import json
a=[json.loads(l)['output_ids'] for l in open('$W/out1-first.jsonl')]; b=[json.loads(l)['output_ids'] for l in open('$W/out2-first.jsonl')]
print('TP=2 vs TP=1 first-32-token agreement:', sum(x[:32]==y[:32] for x,y in zip(a,b)), 'of', len(a))" | tee -a "$OUT/engine.log"
fi
grep -h "BENCHMARK\|passed\|failed" "$OUT"/*.log 2>/dev/null
