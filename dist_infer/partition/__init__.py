"""HF checkpoint -> per-rank shards (see partitioner.py for the flow)."""

from dist_infer.partition.checkpoint import PartitionedCheckpoint
from dist_infer.partition.partitioner import partition

__all__ = ["PartitionedCheckpoint", "partition"]
