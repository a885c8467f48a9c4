"""Rank 0's request bookkeeping, in plain Python (no torch, no comm): sequences,
the paged-KV block manager with prefix caching, the scheduler (token budget,
chunked prefill, preemption) and incremental detokenization with stop strings.
Everything here is unit-tested without ranks."""

from dist_infer.scheduler.block_manager import BlockManager
from dist_infer.scheduler.detokenizer import IncrementalDetokenizer
from dist_infer.scheduler.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from dist_infer.scheduler.sequence import Sequence, SequenceStatus

__all__ = ["BlockManager", "IncrementalDetokenizer", "ScheduledChunk", "Scheduler", "SchedulerConfig",
           "SchedulerOutput", "Sequence", "SequenceStatus"]
