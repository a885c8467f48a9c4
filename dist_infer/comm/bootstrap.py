"""Join the job's world from however the processes were launched.

Under `mpirun`/`srun --mpi=pmix` the MPI environment variables are set and the
world is MPI.COMM_WORLD. Env-launched ranks (Ray actors, `srun --mpi=none`,
torchrun) join a gloo world: DIST_INFER_COMM=gloo (or MASTER_ADDR, MASTER_PORT,
RANK and WORLD_SIZE all set), rank/size from RANK/WORLD_SIZE or Slurm's
SLURM_PROCID/SLURM_NTASKS. A plain `python`/`dist-infer` start is a world of one.
"""

from __future__ import annotations

import logging
import os

from dist_infer.comm.base import Communicator, LocalCommunicator
from dist_infer.errors import LaunchError

# Variables an MPI launcher sets in each rank's environment (OpenMPI, PMIx, MPICH/Hydra).
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in (*MPI_SIZE_VARS, "PMIX_RANK"))


_world: Communicator | None = None  # the world this process joined last


def current_world() -> Communicator | None:
    """The world this process joined (for aborting the job on a failure), if any."""
    return _world


def world_from_launch() -> Communicator:
    global _world
    world: Communicator = LocalCommunicator()
    if launched_by_env():
        world = gloo_world_from_env()
    elif launched_by_mpi():
        from mpi4py import MPI

        from dist_infer.comm.mpi import MpiCommunicator

        world = MpiCommunicator(MPI.COMM_WORLD)
    check_slurm_world(world.size)
    _world = world
    return world


ENV_WORLD_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def launched_by_env() -> bool:
    """Ranks told to build a gloo world from environment variables."""
    comm = os.environ.get("DIST_INFER_COMM", "").lower()
    if comm and comm not in ("gloo", "mpi"):
        raise LaunchError(f"DIST_INFER_COMM={comm!r} is not a communicator; use gloo or mpi.")
    if comm == "mpi":
        return False
    return comm == "gloo" or (all(v in os.environ for v in ENV_WORLD_VARS) and not launched_by_mpi())


def env_rank_world() -> tuple[int, int]:
    """This rank and the world size from RANK/WORLD_SIZE, else mpirun's or Slurm's task variables
    (DIST_INFER_COMM=gloo under mpirun: MPI starts the ranks, gloo carries the data)."""
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and size_var in os.environ:
            try:
                return int(os.environ[rank_var]), int(os.environ[size_var])
            except ValueError:
                raise LaunchError(f"{rank_var}={os.environ[rank_var]!r} / {size_var}={os.environ[size_var]!r} "
                                  "are not integers.") from None
    raise LaunchError("DIST_INFER_COMM=gloo but neither RANK/WORLD_SIZE nor SLURM_PROCID/SLURM_NTASKS are set; "
                      "start the ranks with srun or set RANK and WORLD_SIZE for each process.")


def gloo_world_from_env() -> Communicator:
    rank, size = env_rank_world()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise LaunchError(f"an env-launched gloo world needs {' and '.join(missing)}: the address and a free port "
                          "of rank 0's node (the Slurm/Ray launchers of dist_infer set them).")
    if size == 1:
        return LocalCommunicator()
    from dist_infer.comm.gloo import GlooCommunicator

    return GlooCommunicator.init_world(rank, size, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))


def check_slurm_world(mpi_size: int) -> None:
    """Under srun with the wrong --mpi plugin every rank silently starts alone
    (MPI size 1 while Slurm started several tasks). Only that case is refused:
    under mpirun inside an allocation, SLURM_NTASKS counts OpenMPI's daemons."""
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
    if "SLURM_STEP_ID" in os.environ and tasks and int(tasks) > 1 and mpi_size == 1:
        raise LaunchError(f"Slurm started {tasks} tasks but MPI sees a world of {mpi_size}: srun's MPI plugin "
                          "does not match this MPI library. Use `srun --mpi=pmix` for OpenMPI, "
                          "`srun --mpi=pmi2` for MPICH, or start the ranks with mpirun inside the allocation.")


log = logging.getLogger(__name__)

# Per-node rank variables (OpenMPI, Slurm, torchrun/Ray conventions).
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


def resolve_device(device: str, world_rank: int) -> str:
    """'cuda' -> 'cuda:<local rank>': one GPU per rank on each node."""
    if device != "cuda":
        return device
    import torch

    if not torch.cuda.is_available():
        raise LaunchError("--device cuda was asked for but no CUDA GPU is visible to this rank.")
    local = next((int(os.environ[v]) for v in LOCAL_RANK_VARS if v in os.environ), world_rank)
    device = f"cuda:{local % torch.cuda.device_count()}"
    torch.cuda.set_device(device)  # before any NCCL communicator: NCCL binds to the current device
    widen_cpu_affinity(world_rank)
    return device


def widen_cpu_affinity(world_rank: int) -> None:
    """mpirun binds each rank of a 1- or 2-rank job to one core (`--bind-to core`, its default).
    A GPU rank's host work is threads: the weights' sha256 pieces hashed beside their read,
    torch's own pools. On one core they take turns (an 8B engine loaded in 20 s instead of 3),
    so a GPU rank takes every CPU its node allows; the GPU does the compute."""
    if not hasattr(os, "sched_setaffinity"):
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))  # the kernel keeps only the CPUs the cpuset allows
    except OSError:
        return
    if (after := os.sched_getaffinity(0)) != before:
        log.info("rank %d: the launcher bound this GPU rank to %d CPU(s); widened to %d, so its host threads "
                 "(weight reads and hashing) run in parallel", world_rank, len(before), len(after))
