#!/usr/bin/env bash
# Partition throughput against its floor, `cp` of the same files, in one call:
#   [LAYERS=N] bash scripts/partition_speed.sh [SHAPE] [TP...]   (SHAPE: a dist_infer.presets name,
#   default llama-3-8b; LAYERS: fewer layers than the preset, for a smaller file)
# transformers saves a random checkpoint of SHAPE (bf16 safetensors, 5 GB shards); then `cp -r` + sync, and
# `partition --tp N` for each N, each timed to its exit and to its data on disk (a sync after it).
# BEFORE="/path/to/tree ..." times those trees' partition too, alternated with this one's (each run from
# inside its tree: `python3 -m` puts the working directory first on sys.path, so PYTHONPATH alone would time
# this tree every time).
# PYCACHE=DIR keeps Python's bytecode there (PYTHONPYCACHEPREFIX), warmed by one import before the timings:
# for an image whose site-packages has no .pyc files and which sets PYTHONDONTWRITEBYTECODE=1 (the lent GPU
# machines), where every process compiles torch's and transformers' sources again, 7-8 s of one core before
# partition reads a byte. A normal pip install has the .pyc files.
set -euo pipefail
SHAPE=${1:-llama-3-8b}; shift || true
TPS=${*:-1 2}
W=${W:-/tmp/partition-speed}; OUT=${OUT:-out}; mkdir -p "$OUT"; rm -rf "$W"; mkdir -p "$W"
if [[ -n ${PYCACHE:-} ]]; then export PYTHONPYCACHEPREFIX=$PYCACHE; unset PYTHONDONTWRITEBYTECODE; fi
python3 - "$SHAPE" "$W/hf" "${LAYERS:-0}" <<'PY'
import sys, torch
from transformers import LlamaForCausalLM
from dist_infer.presets import preset_hf_config
torch.manual_seed(0)
with torch.device("meta"):
    layers = {"num_hidden_layers": int(sys.argv[3])} if int(sys.argv[3]) else {}
    model = LlamaForCausalLM(preset_hf_config(sys.argv[1], **layers))
model = model.to_empty(device="cpu").to(torch.bfloat16)
for p in model.parameters():
    p.data.normal_(0, 0.02)
model.save_pretrained(sys.argv[2], max_shard_size="5GB")
PY
TREES=("$PWD" ${BEFORE:-})
if [[ -n ${PYCACHE:-} ]]; then  # the bytecode of what partition imports, before the timings
    for tree in "${TREES[@]}"; do
        (cd "$tree" && python3 -c "import sys, dist_infer.partition.partitioner, dist_infer.cli; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])" "$W/hf")
    done
fi
GB=$(du -sb "$W/hf" | awk '{printf "%.2f", $1/1e9}')
timed() {  # NAME CMD...: seconds to the command's exit and to its data on disk (a sync after it), GB/s of the checkpoint
    local name=$1; shift; local t0=$(date +%s.%N); "$@"; local t1=$(date +%s.%N); sync; local t2=$(date +%s.%N)
    python3 - "$t0" "$t1" "$t2" "$name" "$GB" <<'PY' | tee -a "$OUT/partition_speed.txt"
import sys
t0, t1, t2, name, gb = *map(float, sys.argv[1:4]), sys.argv[4], float(sys.argv[5])
print(f"[PARTITION] {name:<28} exit {t1 - t0:6.1f} s ({gb / (t1 - t0):4.2f} GB/s)  on disk {t2 - t0:6.1f} s ({gb / (t2 - t0):4.2f} GB/s)  of {gb} GB")
PY
}
sync
timed cp_floor cp -r "$W/hf" "$W/copy"; rm -rf "$W/copy"
for tp in $TPS; do
    for tree in "${TREES[@]}"; do  # each tree from inside it: `python3 -m` puts the working directory first on sys.path
        timed "tp$tp $(basename "$tree")" sh -c "cd '$tree' && PYTHONPATH='$tree' python3 -m dist_infer partition --model '$W/hf' --tp $tp --out '$W/ckpt' --quiet"
        rm -rf "$W/ckpt"
    done
done
rm -rf "$W"
