#!/usr/bin/env bash
# README command 1: set up, then partition the embedded SmolLM2-135M-Instruct
# for TP=3, build the three rank engines, and answer a prompt with 3 MPI ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
WORK=${WORK:-out/quickstart}
PROMPT=${1:-What is the capital of France?}
[ -d "$WORK/ckpt" ] || dist-infer partition --model default --tp 3 --out "$WORK/ckpt"
[ -d "$WORK/engine" ] || dist-infer build --checkpoint "$WORK/ckpt" --out "$WORK/engine"
mpirun --allow-run-as-root --oversubscribe -n 3 \
    dist-infer run --engine "$WORK/engine" --prompt "$PROMPT" --max-new-tokens 48
