"""GPU data plane over nccl4py (`import nccl.core`).

Tensor collectives go through NCCL on the caller's current CUDA stream, so
they can be captured inside a CUDA graph with the rest of the step. Object
collectives and the unique-id exchange go through the host bootstrap
communicator (MPI under mpirun, gloo under Ray/env launches).
"""

from __future__ import annotations

import torch

from dist_infer.comm.base import Communicator
from dist_infer.comm.custom_all_reduce import try_custom_all_reduce
from dist_infer.errors import LaunchError


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


class NcclCommunicator:
    def __init__(self, bootstrap: Communicator, custom_all_reduce: bool = False):
        try:
            import nccl.core as nccl
        except ImportError as exc:
            raise LaunchError("GPU runs need nccl4py: `pip install nccl4py` (imported as nccl.core).") from exc
        self._nccl = nccl
        self.bootstrap = bootstrap
        self.rank, self.size = bootstrap.rank, bootstrap.size
        uid = nccl.get_unique_id() if bootstrap.rank == 0 else None
        uid_bytes = bootstrap.broadcast_object(None if uid is None else uid.as_bytes, src=0)
        self.comm = nccl.Communicator.init(self.size, self.rank, nccl.UniqueId.from_bytes(uid_bytes))
        # The TP group's small messages go through a one-shot kernel over IPC buffers where it can.
        self.custom = try_custom_all_reduce(bootstrap, torch.device("cuda", torch.cuda.current_device())) \
            if custom_all_reduce else None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.custom is not None and self.custom.fits(x):
            return self.custom.all_reduce(x)
        self.comm.allreduce(x, x, self._nccl.SUM, stream=_stream())
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All-reduce + residual add + RMSNorm in one kernel where the custom all-reduce takes
        the shapes; None where it does not (the caller all-reduces, then norms)."""
        if self.custom is not None and self.custom.fits_rows(x, residual, weight):
            return self.custom.all_reduce_add_rms_norm(x, residual, weight, eps)
        return None

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((self.size, *x.shape))
        self.comm.allgather(x, out, stream=_stream())
        return out

    def send(self, x: torch.Tensor, dst: int) -> None:
        self.comm.send(x.contiguous(), dst, stream=_stream())

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self.comm.recv(x, src, stream=_stream())
        return x

    def broadcast_object(self, obj, src=0):
        return self.bootstrap.broadcast_object(obj, src)

    def all_gather_object(self, obj):
        return self.bootstrap.all_gather_object(obj)

    def barrier(self) -> None:
        self.bootstrap.barrier()

    def split(self, color: int, key: int) -> NcclCommunicator:
        return NcclCommunicator(self.bootstrap.split(color, key), self.custom is not None)

    def abort(self, code: int = 1) -> None:
        self.comm.abort()
        self.bootstrap.abort(code)

    def close(self) -> None:
        """Destroy the NCCL communicator (after every graph that captured it is gone)."""
        if self.custom is not None:
            self.custom.close()
            self.custom = None
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
