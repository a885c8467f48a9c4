#!/usr/bin/env bash
# Partition throughput against its floor, `cp` of the same files, in one call:
#   [LAYERS=N] bash scripts/partition_speed.sh [SHAPE] [TP...]   (SHAPE: a dist_infer.presets name,
#   default llama-3-8b; LAYERS: fewer layers than the preset, for a smaller file)
# transformers saves a random checkpoint of SHAPE (bf16 safetensors, 5 GB shards); then `cp -r` + sync, and
# `partition --tp N` + sync for each N. Set BEFORE=/path/to/other/tree to time that tree's partition too.
set -euo pipefail
SHAPE=${1:-llama-3-8b}; shift || true
TPS=${*:-1 2}
W=${W:-/tmp/partition-speed}; OUT=${OUT:-out}; mkdir -p "$OUT"; rm -rf "$W"; mkdir -p "$W"
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
GB=$(du -sb "$W/hf" | awk '{printf "%.2f", $1/1e9}')
timed() {  # NAME CMD...: wall seconds and GB/s of the checkpoint
    local name=$1; shift; local t0=$(date +%s.%N); "$@"; local t1=$(date +%s.%N)
    python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'[PARTITION] {sys.argv[3]:<24} {s:7.1f} s  {float(sys.argv[4])/s:5.2f} GB/s of {sys.argv[4]} GB')" "$t0" "$t1" "$name" "$GB" | tee -a "$OUT/partition_speed.txt"
}
sync
timed cp_floor sh -c "cp -r '$W/hf' '$W/copy' && sync"; rm -rf "$W/copy"
for tp in $TPS; do
    timed "partition_tp$tp" sh -c "python3 -m dist_infer partition --model '$W/hf' --tp $tp --out '$W/ckpt' --quiet && sync"
    rm -rf "$W/ckpt"
    if [[ -n ${BEFORE:-} ]]; then
        timed "before_tp$tp" sh -c "PYTHONPATH='$BEFORE' python3 -m dist_infer partition --model '$W/hf' --tp $tp --out '$W/ckpt' --quiet && sync"
        rm -rf "$W/ckpt"
    fi
done
rm -rf "$W"
