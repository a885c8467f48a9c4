"""Communicators: one protocol, a CPU (MPI) and a GPU (NCCL) data plane."""

from dist_infer.comm.base import Communicator, LocalCommunicator
from dist_infer.comm.bootstrap import world_from_launch
from dist_infer.comm.groups import ParallelGroups

__all__ = ["Communicator", "LocalCommunicator", "ParallelGroups", "world_from_launch"]
