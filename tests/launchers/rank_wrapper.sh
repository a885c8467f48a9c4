#!/bin/sh
# Test rank command: records which host this rank ran on, then becomes the rank.
#   command: [tests/launchers/rank_wrapper.sh, PYTHON]   (in a test cluster file)
rank=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${SLURM_PROCID:-${RANK:-x}}}}
hostname > "${DIST_INFER_TEST_RANK_DIR:?}/rank-$rank"
py=$1; shift
exec "$py" -m dist_infer "$@"
