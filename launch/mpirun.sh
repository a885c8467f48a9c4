#!/usr/bin/env bash
# Run a dist_infer engine under mpirun with one process per rank.
#   launch/mpirun.sh ENGINE_DIR [HOSTFILE] -- [dist-infer run args...]
# The rank count comes from the engine (tp x pp). Extra mpirun flags: MPIRUN_ARGS.
# On GPU clusters keep the NCCL settings in the environment of every rank (-x).
set -euo pipefail
ENGINE=${1:?usage: launch/mpirun.sh ENGINE_DIR [HOSTFILE] -- run-args...}; shift
HOSTFILE=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then HOSTFILE=$1; shift; fi
[ "${1:-}" = "--" ] && shift
N=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1]+'/engine.json'))['mapping']; print(m['tp']*m['pp'])" "$ENGINE")
ARGS=(-n "$N")
[ -n "$HOSTFILE" ] && ARGS+=(--hostfile "$HOSTFILE")
[ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
for var in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS PYTHONPATH; do
    [ -n "${!var:-}" ] && ARGS+=(-x "$var")
done
# shellcheck disable=SC2086
exec mpirun "${ARGS[@]}" ${MPIRUN_ARGS:-} dist-infer run --engine "$ENGINE" "$@"
