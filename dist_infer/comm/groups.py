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
    def build(cls, world: Communicator, mapping: Mapping) -> ParallelGroups:
        if world.size != mapping.world_size:
            raise LaunchError(f"launched {world.size} processes for a tp={mapping.tp} x pp={mapping.pp} layout "
                              f"that needs {mapping.world_size}.")
        mapping = mapping.with_rank(world.rank)
        # Collective: every rank must call both splits in the same order.
        tp = world.split(color=mapping.pp_rank, key=mapping.tp_rank)
        pp = world.split(color=mapping.tp_rank, key=mapping.pp_rank)
        return cls(world, tp, pp, mapping)
