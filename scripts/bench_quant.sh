#!/usr/bin/env bash
# Decode speed of each --quant mode on one GPU (issue #10), Llama-3-8B shape, random weights.
# Run from the repo root on the lent H100 (one call, ~6-8 min):
#   bash scripts/bench_quant.sh            MODES="bf16 int8_wo int4_wo fp8" BATCHES="1 64" by default
#
# For each mode: `dist-infer build --random-weights llama-3-8b` (bf16 activations; --quant MODE, INT4 in
# groups of 128) into /tmp, then `dist-infer bench --engine` at batch 1 and 64 (128 in / 128 out), then
# the engine is deleted (disk). The tokenizer is SmolLM2's (carry .whl/smollm2-tokenizer): the engine's
# vocabulary is its 49,152 ids (dist_infer/engine/random_engine.py), so the LM head is 0.40 GB instead of
# Llama-3's 1.05 GB; the bytes below are this engine's.
#
# Bytes read per decode step (for MBU): every tensor of the rank file except the embedding table, of which a
# step reads one row per token, plus the KV cache the step attends over (bf16, mean context 128 + 64).
# `dist-infer bench`'s own mbu field counts the whole embedding table (0.40 GB more); summary.txt has both.
#
# Files in $OUT: gpu.txt, build_MODE.log, bench_MODE.log, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench_quant}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
MODES=${MODES:-bf16 int8_wo int4_wo fp8}
BATCHES=${BATCHES:-1 64}
ISL=${ISL:-128}; OSL=${OSL:-128}
TOKENIZER=${TOKENIZER:-.whl/smollm2-tokenizer}
ROOT=${ROOT:-/tmp/bench-quant}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "== $(date +%T) $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
[[ -f $TOKENIZER/tokenizer.json ]] || { echo "no tokenizer at $TOKENIZER (carry .whl/smollm2-tokenizer)"; exit 1; }

for mode in $MODES; do
    engine=$ROOT/engine-$mode
    quant=()
    case $mode in
        bf16) ;;
        int4_wo) quant=(--quant int4_wo --quant-group-size 128) ;;
        *) quant=(--quant "$mode") ;;
    esac
    rm -rf "$ROOT"; mkdir -p "$ROOT"  # one engine on disk at a time
    say "build $mode" | tee "$OUT/build_$mode.log"
    { time $PYTHON -m dist_infer build --random-weights llama-3-8b --tokenizer "$TOKENIZER" --out "$engine" \
        --dtype bfloat16 --max-batch-size 64 --max-seq-len 512 "${quant[@]}"; } >> "$OUT/build_$mode.log" 2>&1
    [[ -f $engine/engine.json ]] || { echo "build $mode failed:"; tail -20 "$OUT/build_$mode.log"; continue; }
    # Bytes of the rank file's tensors, from its safetensors header: total and the embedding table.
    $PYTHON - "$engine" <<'PY' | tee -a "$OUT/build_$mode.log"
import json, struct, sys
path = f"{sys.argv[1]}/rank0/weights.safetensors"
with open(path, "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
header.pop("__metadata__", None)
size = {name: t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items()}
embed = size["embed.weight"]
row = embed // header["embed.weight"]["shape"][0]
print(f"WEIGHT_BYTES total={sum(size.values())} embed={embed} embed_row={row} "
      f"read_per_step={sum(size.values()) - embed}")
PY
    say "bench $mode" | tee "$OUT/bench_$mode.log"
    $PYTHON -m dist_infer bench --engine "$engine" --batch-size $BATCHES --input-len "$ISL" --output-len "$OSL" \
        >> "$OUT/bench_$mode.log" 2>&1 || echo "bench $mode failed (exit $?)" | tee -a "$OUT/bench_$mode.log"
    grep '^\[BENCHMARK\]' "$OUT/bench_$mode.log" | cut -c1-400
done
rm -rf "$ROOT"

# One row per (mode, batch): decode tok/s from the step p50, bytes per step, MBU against the copy bandwidth.
$PYTHON - "$OUT" $MODES <<'PY' | tee "$OUT/summary.txt"
import re, sys
out, modes = sys.argv[1], sys.argv[2:]
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
kv_per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # k and v, bf16
print("| mode | batch | step p50 (ms) | decode tok/s | GB read/step | MBU | bench mbu | tokens/s (e2e) | peak GB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for mode in modes:
    try:
        weights = open(f"{out}/build_{mode}.log").read()
        bench = open(f"{out}/bench_{mode}.log").read()
    except OSError:
        continue
    m = re.search(r"WEIGHT_BYTES total=(\d+) embed=(\d+) embed_row=(\d+) read_per_step=(\d+)", weights)
    if not m:
        continue
    read, row = int(m[4]), int(m[3])
    for line in bench.splitlines():
        if not line.startswith("[BENCHMARK]"):
            continue
        f = dict(re.findall(r"(\S+) (\S+)", line[len("[BENCHMARK] "):]))
        batch, p50 = int(f["batch_size"]), float(f["percentile50(ms)"]) / 1e3
        ctx = int(f["input_length"]) + int(f["output_length"]) / 2
        step_bytes = read + batch * (row + ctx * kv_per_token)
        mbu = step_bytes / p50 / (float(f["copy_bw(gb/s)"]) * 1e9)
        print(f"| {mode} | {batch} | {p50 * 1e3:.2f} | {batch / p50:.0f} | {step_bytes / 1e9:.2f} | {mbu:.3f} | "
              f"{f['mbu']} | {f['tokens_per_sec']} | {f['gpu_peak_mem(gb)']} |")
PY
