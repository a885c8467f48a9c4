"""CPU data plane over mpi4py: tensors travel as numpy views (no copies for
float32/int64; bf16 is reduced in float32 because MPI has no bf16 sum)."""

from __future__ import annotations

import numpy as np
import torch


def _as_buffer(x: torch.Tensor) -> np.ndarray:
    """Raw bytes of a contiguous CPU tensor, for point-to-point transfers."""
    return x.view(-1).view(torch.uint8).numpy()


class MpiCommunicator:
    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        from mpi4py import MPI

        if x.is_contiguous() and x.dtype in (torch.float32, torch.float64, torch.int64, torch.int32, torch.float16):
            self.comm.Allreduce(MPI.IN_PLACE, x.numpy(), op=MPI.SUM)
            return x
        # bf16 (no MPI sum for it) and strided views: reduce a contiguous copy, write back in place.
        wide = x.float() if x.dtype == torch.bfloat16 else x.contiguous()
        self.comm.Allreduce(MPI.IN_PLACE, wide.numpy(), op=MPI.SUM)
        return x.copy_(wide)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((self.size, *x.shape))
        self.comm.Allgather(_as_buffer(x), _as_buffer(out))
        return out

    def send(self, x: torch.Tensor, dst: int) -> None:
        self.comm.Send(_as_buffer(x.contiguous()), dest=dst)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self.comm.Recv(_as_buffer(x), source=src)
        return x

    def broadcast_object(self, obj, src=0):
        return self.comm.bcast(obj, root=src)

    def all_gather_object(self, obj):
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()

    def split(self, color: int, key: int) -> MpiCommunicator:
        return MpiCommunicator(self.comm.Split(color, key))

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)
