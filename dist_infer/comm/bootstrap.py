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
import socket

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
        yield_when_oversubscribed()
        from mpi4py import MPI  # MPI_Init reads the MCA variables set above

        from dist_infer.comm.mpi import MpiCommunicator

        world = MpiCommunicator(MPI.COMM_WORLD)
    check_slurm_world(world.size)
    _world = world
    return world


def yield_when_oversubscribed() -> None:
    """Open MPI busy-polls while a rank waits in a collective. With more ranks than CPUs on a
    node (CPU ranks on a small machine) the waiting ranks take the cores from the rank that
    works: SmolLM2 at TP=3 under `srun -n 3` on 2 cores made 2.8-3.1 tok/s, 10.5-12.2 yielding.
    mpirun turns yielding on only when it counts more ranks than slots (a hostfile's slots can
    hide it); srun never does. So it is set here, before MPI_Init, whenever this node holds more
    ranks than usable CPUs."""
    ranks_here = ranks_on_this_node()
    if ranks_here and ranks_here > usable_cpus() and "OMPI_MCA_mpi_yield_when_idle" not in os.environ:
        os.environ["OMPI_MCA_mpi_yield_when_idle"] = "1"
        log.info("%d ranks on %d CPU(s): MPI yields the CPU while it waits", ranks_here, usable_cpus())


def ranks_on_this_node() -> int | None:
    """This node's rank count, from the launcher's environment (before MPI_Init): Open MPI,
    MPICH/Hydra, torchrun, or Slurm's per-node task list ("2(x3),1", indexed by SLURM_NODEID)."""
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    node = os.environ.get("SLURM_NODEID", "0")
    if not per_node or not node.isdigit():
        return None
    counts = slurm_task_counts(per_node)
    return counts[int(node)] if counts and int(node) < len(counts) else None


def slurm_task_counts(text: str) -> list[int] | None:
    """Slurm's compressed per-node task counts: "2(x3),1" -> [2, 2, 2, 1]; None if malformed."""
    counts: list[int] = []
    for part in text.split(","):
        tasks, _, repeat = part.partition("(x")
        if not tasks.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return None
        counts += [int(tasks)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


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


def share_node_cpus(world: Communicator, device: str) -> None:
    """CPU ranks that share a node split its cores. torch's default, one thread per core in
    every rank, oversubscribes the node as soon as two ranks share it: SmolLM2 at TP=3 under
    `srun -n 3` on 2 cores made 0.5-1.0 tok/s with 2 threads a rank, 9.7-16.7 with 1.
    OMP_NUM_THREADS, when set (Ray sets it per actor), wins. Collective: every rank calls it."""
    if device != "cpu":
        return
    hosts = world.all_gather_object(socket.gethostname())
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    ranks_here = hosts.count(hosts[world.rank])
    threads = max(1, usable_cpus() // ranks_here)
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("rank %d: %d ranks share this node's %d CPU(s): %d torch thread(s) each",
                 world.rank, ranks_here, usable_cpus(), threads)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
