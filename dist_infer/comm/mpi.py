"""CPU data plane over mpi4py: tensors travel as numpy views (no copies for
float32/int64; bf16 is reduced in float32 because MPI has no bf16 sum)."""

from __future__ import annotations

import pickle
import time

import numpy as np
import torch

# An idle rank waiting for the next object (a server with no requests) spins this
# long after the last one, then sleeps between polls: no busy core while idle,
# no added latency while steps come back to back.
SPIN_S = 0.05
IDLE_POLL_S = 0.002


def _as_buffer(x: torch.Tensor) -> np.ndarray:
    """Raw bytes of a contiguous CPU tensor, for point-to-point transfers."""
    return x.view(-1).view(torch.uint8).numpy()


def _wait_politely(request) -> None:
    started = time.monotonic()
    while not request.Test():
        if time.monotonic() - started > SPIN_S:
            time.sleep(IDLE_POLL_S)


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
        """Size first (a non-blocking broadcast the receivers poll), then the pickled bytes.
        Open MPI's blocking bcast busy-polls a core for as long as a rank waits."""
        size = np.zeros(1, dtype=np.int64)
        if self.rank == src:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            size[0] = len(data)
            self.comm.Ibcast(size, root=src).Wait()
            self.comm.Bcast(np.frombuffer(data, dtype=np.uint8), root=src)
            return obj
        _wait_politely(self.comm.Ibcast(size, root=src))
        buf = np.empty(int(size[0]), dtype=np.uint8)
        self.comm.Bcast(buf, root=src)
        return pickle.loads(buf.tobytes())

    def all_gather_object(self, obj):
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()

    def split(self, color: int, key: int) -> MpiCommunicator:
        return MpiCommunicator(self.comm.Split(color, key))

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)
