#!/usr/bin/env bash
# Fast start (issue #12, deliverable 5): a real 8B-shape checkpoint (random weights saved by
# transformers as safetensors) through partition -> build -> run, timed; transformers' own
# from_pretrained + first token beside it as the baseline. Run from the repo root on the lent GPU:
#   bash scripts/launch_time.sh            # PRESET=llama-3-8b TP=1 (needs ~50 GB of disk)
# Files in $OUT: launch_time.log (every command's time, peak RSS, the ranks' logs), summary.txt.
# PYCACHE=DIR: keep Python's bytecode there, for an image that sets PYTHONDONTWRITEBYTECODE=1 and ships no
# .pyc files (the lent GPU machines: each process then compiles torch's and transformers' sources, ~3 s).
# The first commands (saving the checkpoint, the baseline) warm it for ours.
# BEFORE="/path/to/tree ...": those trees launch the same engine too, alternated with this one, ROUNDS=N
# times (default 1); each tree's first launch starts from an empty kernel cache. Each runs from inside its
# tree (`python3 -m` puts the working directory first on sys.path).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/launch_time}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
SITE=${PYTHONPATH:-}
PRESET=${PRESET:-llama-3-8b}; TP=${TP:-1}
W=${W:-/tmp/launch-time}; rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PYC=()
if [[ -n ${PYCACHE:-} ]]; then export PYTHONPYCACHEPREFIX=$PYCACHE; unset PYTHONDONTWRITEBYTECODE; PYC=(-x PYTHONPYCACHEPREFIX); fi
MPI=(mpirun --allow-run-as-root "${PYC[@]}" -x PYTHONPATH -x PYTHONUNBUFFERED -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -n "$TP")
LOG=$OUT/launch_time.log; : > "$LOG"
timed() {  # timed NAME CMD...: wall seconds and peak RSS (largest process, from rusage) into the log
    python3 - "$@" >> "$LOG" 2>&1 <<'PY'
import resource, subprocess, sys, time
name, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
rc = subprocess.call(cmd)
peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"[timed] {name} seconds {time.perf_counter() - t0:.2f} peak_rss_gb {peak_gb:.2f} rc {rc}", flush=True)
PY
    grep "^\[timed\] $1 " "$LOG" | tail -1 >> "$OUT/summary.txt"
}

python3 - "$W/hf" "$PRESET" >> "$LOG" 2>&1 <<'PY'
import sys, torch
from dist_infer.presets import preset_hf_config
from transformers import AutoModelForCausalLM
cfg = preset_hf_config(sys.argv[2], bos_token_id=1, eos_token_id=2)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size="5GB")
print("saved", sum(p.numel() for p in model.parameters()) / 1e9, "B params")
PY
du -sb "$W/hf" | tee -a "$OUT/summary.txt"
printf '%s\n' '{"input_ids": [1, 15, 27, 99, 4, 8]}' '{"input_ids": [1, 300, 301, 302]}' > "$W/p.jsonl"

# The baseline: transformers loads the same safetensors onto the GPU and makes its first token.
timed hf_load_first_token python3 -c "
import sys, time, torch
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16, device_map='cuda')
m.generate(torch.tensor([[1, 15, 27, 99]], device='cuda'), max_new_tokens=1, do_sample=False)
print('hf first token after', round(time.perf_counter() - t0, 2), 's')" "$W/hf"
# Partition reads and writes every byte once: `cp` of the same files (and its writeback) is its floor.
timed cp_baseline sh -c "cp -r '$W/hf' '$W/hf-copy' && sync"
rm -rf "$W/hf-copy"
timed partition sh -c "python3 -m dist_infer partition --model '$W/hf' --tp $TP --out '$W/ckpt' --quiet && sync"
rm -rf "$W/hf"   # disk: one copy of the weights at a time besides the engine
timed build "${MPI[@]}" python3 -m dist_infer build --checkpoint "$W/ckpt" --out "$W/engine" --dtype bfloat16 --max-batch-size 8
rm -rf "$W/ckpt"
# Every launch reads the engine from the page cache (as after any earlier launch): the first one after
# build otherwise competes with build's writeback, whichever tree runs it.
sync; cat "$W"/engine/rank*/weights.safetensors > /dev/null
TREES=("$PWD" ${BEFORE:-})
for round in $(seq "${ROUNDS:-1}"); do
    for tree in "${TREES[@]}"; do
        rm -rf "$W"/engine/rank*/triton-cache  # a first launch: no compiled kernels
        for attempt in first second; do
            name=run_$attempt; [[ $tree == "$PWD" ]] || name+=_$(basename "$tree")
            (cd "$tree" && PYTHONPATH=$tree${SITE:+:$SITE} timed "$name" "${MPI[@]}" python3 -m dist_infer run \
                --engine "$W/engine" --device cuda --prompts-file "$W/p.jsonl" --max-new-tokens 8 --ignore-eos --json)
        done
    done
done
grep -h "load\|ready\|captur\|verif\|weights" "$LOG" | head -60
cat "$OUT/summary.txt"
rm -rf "$W"
