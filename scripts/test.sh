#!/usr/bin/env bash
# README command 2: install what the tests start for real (Slurm + munge,
# network namespaces, Ray; needs root/apt), the .venv, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ci_system_deps.sh
bash scripts/setup.sh
.venv/bin/python -m pytest -q -rfE --durations=25 "$@"
