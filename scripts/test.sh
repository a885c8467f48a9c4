#!/usr/bin/env bash
# README command 2: install what the tests start for real (Slurm + munge,
# network namespaces, Ray; needs root/apt), the .venv, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# The embedded SmolLM2 is imported (GGUF -> safetensors, ~30 s of one core) once into this cache
# (.ci/run sets it; the tests reuse it). That import runs beside the system installs (apt and
# pip, mostly waiting on disk and network) instead of inside the first test that needs it.
export DIST_INFER_CACHE="${DIST_INFER_CACHE:-$PWD/out/cache}"
bash scripts/setup.sh
.venv/bin/python -c "from dist_infer.partition.sources import default_gguf_path, import_gguf
import_gguf(default_gguf_path())" &
import_pid=$!
bash scripts/ci_system_deps.sh
# Best effort: if it failed, the first test that needs the model imports it (and shows why).
wait "$import_pid" || echo "note: the SmolLM2 import beside the installs failed; the tests import it again"
.venv/bin/python -m pytest -q -rfE --durations=25 "$@"
