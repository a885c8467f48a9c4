"""The one communication protocol model code and workers talk to.

Model code receives a group object (TP or PP) and calls its methods; it never
sees MPI, NCCL or torch.distributed. Collectives operate in place where the
backend allows, and every implementation returns early when size == 1 is
handled by the callers (parallel layers skip the call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Communicator(Protocol):
    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` across the group, in place; returns `x`."""

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Stack every rank's `x`: returns [size, *x.shape]."""

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send a contiguous tensor to group rank `dst`."""

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into the preallocated `x` from group rank `src`; returns `x`."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Picklable object from `src` to all ranks."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order."""

    def barrier(self) -> None: ...

    def split(self, color: int, key: int) -> Communicator:
        """Sub-group of the ranks that pass the same `color`, ordered by `key`."""

    def abort(self, code: int = 1) -> None:
        """Tear down every process of the job (used when one rank fails so the others do not hang)."""


class LocalCommunicator:
    """A group of one process: every collective is the identity."""

    rank = 0
    size = 1

    def all_reduce(self, x):
        return x

    def all_gather(self, x):
        return x.unsqueeze(0)

    def send(self, x, dst):
        raise RuntimeError("send in a group of size 1")

    def recv(self, x, src):
        raise RuntimeError("recv in a group of size 1")

    def broadcast_object(self, obj, src=0):
        return obj

    def all_gather_object(self, obj):
        return [obj]

    def barrier(self):
        pass

    def split(self, color, key):
        return LocalCommunicator()

    def abort(self, code=1):
        raise SystemExit(code)


def collective_call(world: Communicator, fn: Callable[[], Any], gather: bool = False) -> Any:
    """Run `fn` on every rank of `world`; if it raised a user error on any rank,
    raise it on every rank. Without this, one rank failing (say, a corrupt
    shard) leaves the others waiting forever in their next collective.
    With gather=True, returns every rank's result in rank order."""
    from dist_infer import errors

    try:
        result, error = fn(), None
    except errors.DistInferError as exc:
        result, error = None, exc
    reports = world.all_gather_object(None if error is None else (type(error).__name__, str(error)))
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        if error is None:
            rank, (kind, message) = failed[0]
            error = getattr(errors, kind, errors.DistInferError)(f"rank {rank}: {message}")
        error.collective = True  # every rank raises it: no need to abort the job
        raise error
    return world.all_gather_object(result) if gather else result
