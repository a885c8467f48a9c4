"""TP and PP groups built from one Mapping."""

from __future__ import annotations

from dataclasses import dataclass

from dist_infer.comm.base import Communicator
from dist_infer.config import Mapping
from dist_infer.errors import LaunchError


@dataclass
class ParallelGroups:
    world: Communicator
    tp: Communicator  # ranks of this pipeline stage
    pp: Communicator  # this TP rank across stages
    mapping: Mapping

    @classmethod
    def build(cls, world: Communicator, mapping: Mapping, device: str = "cpu") -> ParallelGroups:
        """TP and PP groups; on CUDA their tensor traffic goes over NCCL while
        `world` (host objects, tokens) stays on the launch's bootstrap."""
        if world.size != mapping.world_size:
            raise LaunchError(f"launched {world.size} processes for a tp={mapping.tp} x pp={mapping.pp} layout "
                              f"that needs {mapping.world_size}.")
        mapping = mapping.with_rank(world.rank)
        # Collective: every rank must call both splits in the same order.
        tp = world.split(color=mapping.pp_rank, key=mapping.tp_rank)
        pp = world.split(color=mapping.tp_rank, key=mapping.pp_rank)
        if str(device).startswith("cuda"):
            from dist_infer.comm.nccl import NcclCommunicator

            tp = NcclCommunicator(tp, custom_all_reduce=True) if tp.size > 1 else tp
            pp = NcclCommunicator(pp) if pp.size > 1 else pp
        return cls(world, tp, pp, mapping)

    def close(self) -> None:
        """Tear down device communicators (call after CUDA graphs are released)."""
        for group in (self.tp, self.pp):
            if hasattr(group, "close"):
                group.close()
