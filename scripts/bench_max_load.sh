#!/usr/bin/env bash
# Max-load throughput on one GPU (issues #10 and #12), Llama-3-8B shape, random weights:
# trtllm-bench's throughput run, every request submitted at once through the LLMEngine.
# Run from the repo root on the lent H100 (one call, ~6-9 min):
#   bash scripts/bench_max_load.sh
#
# For each engine in ENGINES (bf16 | fp8: `dist-infer build --random-weights llama-3-8b [--quant fp8]`, built
# for --max-batch-size MAX_BUILD), then for each case "ISL/OSL/N/B" in CASES: `dist-infer bench --engine
# --num-requests N --input-len ISL --output-len OSL --max-batch-size B`; the fp8 engine once per KV dtype in
# FP8_KV (default "fp8 auto": FP8 KV, then the model dtype's). bf16 runs first in the same call: the baseline.
# SCHEDULING="async sync" runs each case twice: async scheduling (the default), then --no-async-scheduling.
# The tokenizer is SmolLM2's (carry .whl/smollm2-tokenizer): 49,152 ids, both engines alike.
#
# Files in $OUT: gpu.txt, build_ENGINE.log, bench_ENGINE.log, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench_max_load}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
ENGINES=${ENGINES:-bf16 fp8}
CASES=${CASES:-128/128/1024/512 128/128/1024/1024 2048/128/256/128}
MAX_BUILD=${MAX_BUILD:-1024}
FP8_KV=${FP8_KV:-fp8 auto}
SCHEDULING=${SCHEDULING:-async}  # "async sync": each case also with --no-async-scheduling, after the default
TOKENIZER=${TOKENIZER:-.whl/smollm2-tokenizer}
ROOT=${ROOT:-/tmp/bench-max-load}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "== $(date +%T) $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
[[ -f $TOKENIZER/tokenizer.json ]] || { echo "no tokenizer at $TOKENIZER (carry .whl/smollm2-tokenizer)"; exit 1; }

for name in $ENGINES; do
    engine=$ROOT/engine-$name
    quant=(); kvs=(auto)
    if [[ $name == fp8 ]]; then quant=(--quant fp8); read -ra kvs <<< "$FP8_KV"; fi
    rm -rf "$ROOT"; mkdir -p "$ROOT"  # one engine on disk at a time
    say "build $name" | tee "$OUT/build_$name.log"
    $PYTHON -m dist_infer build --random-weights llama-3-8b --tokenizer "$TOKENIZER" --out "$engine" \
        --dtype bfloat16 --max-batch-size "$MAX_BUILD" --max-seq-len 2304 "${quant[@]}" >> "$OUT/build_$name.log" 2>&1
    [[ -f $engine/engine.json ]] || { echo "build $name failed:"; tail -20 "$OUT/build_$name.log"; continue; }
    for kv in "${kvs[@]}"; do
        for case in $CASES; do
            IFS=/ read -r isl osl n b <<< "$case"
            for scheduling in $SCHEDULING; do
                flags=(); [[ $scheduling == sync ]] && flags=(--no-async-scheduling)
                say "bench $name kv=$kv $isl/$osl n=$n batch=$b $scheduling" | tee -a "$OUT/bench_$name.log"
                $PYTHON -m dist_infer bench --engine "$engine" --num-requests "$n" --max-batch-size "$b" \
                    --input-len "$isl" --output-len "$osl" --kv-cache-dtype "$kv" "${flags[@]}" \
                    >> "$OUT/bench_$name.log" 2>&1 || echo "bench $name $case failed (exit $?)" | tee -a "$OUT/bench_$name.log"
            done
        done
    done
    grep '^\[BENCHMARK\]' "$OUT/bench_$name.log" | cut -c1-600
done
rm -rf "$ROOT"

# One row per (engine, case), and fp8's ratio to bf16 on the same case.
$PYTHON - "$OUT" $ENGINES <<'PY' | tee "$OUT/summary.txt"
import re, sys
out, names = sys.argv[1], sys.argv[2:]
rows = {}
for name in names:
    try:
        text = open(f"{out}/bench_{name}.log").read()
    except OSError:
        continue
    for line in text.splitlines():
        if line.startswith("[BENCHMARK]"):
            f = dict(re.findall(r"(\S+) (\S+)", line.removeprefix("[BENCHMARK] ")))
            rows[name, f["kv_cache_dtype"], f["input_length"], f["output_length"], f["num_requests"],
                 f["max_batch_size"]] = f
print("| engine | KV | ISL/OSL | requests | max batch | output tok/s | vs bf16 | TTFT p50 / p99 (ms) | KV blocks | peak GB |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
for (name, kv, isl, osl, n, b), f in rows.items():
    base = rows.get(("bf16", "bfloat16", isl, osl, n, b))
    ratio = f"{float(f['tokens_per_sec']) / float(base['tokens_per_sec']):.2f}x" if base else "-"
    print(f"| {name} | {f['kv_cache_dtype']} | {isl}/{osl} | {n} | {b} | {float(f['tokens_per_sec']):,.0f} | {ratio} | "
          f"{f['ttft_p50(ms)']} / {f['ttft_p99(ms)']} | {f['kv_cache_blocks']} | {f['gpu_peak_mem(gb)']} |")
PY
