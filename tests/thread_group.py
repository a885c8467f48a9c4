"""A TP group whose ranks are threads of one process (tests of sharded layers without launching ranks)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch


class ThreadGroup:
    """A TP group whose ranks are threads of this process: collectives meet at a barrier and
    sum in rank order, so every rank gets the same bits."""

    def __init__(self, size: int):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size)

    def member(self, rank: int) -> SimpleNamespace:
        return SimpleNamespace(rank=rank, size=self.size, all_gather=lambda x: self._gather(rank, x),
                               all_reduce=lambda x: x.copy_(self._gather(rank, x).sum(0)))

    def _gather(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        out = torch.stack(self.slots)  # [size, *x.shape]
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return out
