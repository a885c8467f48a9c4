"""A one-shot all-reduce over CUDA IPC buffers for the TP group's decode-size messages.

At TP=2 a decode step makes 65 all-reduces of 8 KB to a few hundred KB, and NCCL spends
10-12 us on each from a CUDA graph: at batch 1 that is a fifth of the step. Here every rank
registers one data buffer and one flag area with its peers once (CUDA IPC, NVLink
peer-to-peer, never multicast); a call is then one kernel (custom_all_reduce.cu): write the
input into every rank's buffer, a flag barrier per block, sum the slots of our own buffer. It is captured in the decode graphs
like any kernel. Messages above `max_bytes` and groups whose GPUs cannot reach each other
stay on NCCL (`NcclCommunicator` decides; every rank of the group decides alike).

The kernel is compiled at load by NVRTC through CuPy, which also does the IPC calls.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch

from dist_infer.comm.base import Communicator

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("custom_all_reduce.cu")
MAX_RANKS = 8  # custom_all_reduce.cu's MAX_RANKS
MAX_BLOCKS = 36  # custom_all_reduce.cu's MAX_BLOCKS
THREADS = 512
SIGNAL_BYTES = MAX_BLOCKS * MAX_RANKS * 8
# One-shot moves world x message bytes per rank, so it wins only up to a size; above it
# NCCL's ring is faster (2x H200, measured per size: docs/PERFORMANCE.md, all-reduce table).
DEFAULT_MAX_BYTES = 4 * 2**20
SUFFIX = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
KERNELS = {dtype: f"one_shot_all_reduce_{s}" for dtype, s in SUFFIX.items()}
NORM_KERNELS = {dtype: f"one_shot_add_rms_norm_{s}" for dtype, s in SUFFIX.items()}
ENV_SWITCH = "DIST_INFER_CUSTOM_ALL_REDUCE"  # "0": NCCL for every message (A/B benchmarks)


def wanted() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def max_bytes_setting() -> int:
    return int(os.environ.get(f"{ENV_SWITCH}_MAX_BYTES", DEFAULT_MAX_BYTES))


def reason_unusable(peers: list[tuple[str, int]], me: int) -> str | None:
    """Why this group cannot use IPC buffers (None when it can). peers: (host, CUDA device) per rank."""
    if len(peers) > MAX_RANKS:
        return f"{len(peers)} ranks (the kernel takes at most {MAX_RANKS})"
    if len({host for host, _ in peers}) > 1:
        return "its ranks are on more than one host"
    device = peers[me][1]
    cut = [d for _, d in peers if d != device and not torch.cuda.can_device_access_peer(device, d)]
    return f"GPU {device} cannot reach GPU(s) {cut} peer-to-peer" if cut else None


class CustomAllReduce:
    """IPC buffers registered with every rank of `group` plus the compiled kernels.
    Construct on every rank of the group together (it exchanges handles)."""

    def __init__(self, group: Communicator, device: torch.device, max_bytes: int):
        import cupy

        self._cupy, self.rank, self.world, self.max_bytes = cupy, group.rank, group.size, max_bytes
        self.device = device
        cupy.cuda.Device(device.index).use()  # CuPy's allocations and IPC calls on the rank's GPU
        data_bytes = 2 * self.world * max_bytes  # 2 halves x a slot per rank
        self._own = [cupy.cuda.runtime.malloc(data_bytes), cupy.cuda.runtime.malloc(SIGNAL_BYTES)]
        cupy.cuda.runtime.memset(self._own[1], 0, SIGNAL_BYTES)
        cupy.cuda.runtime.deviceSynchronize()  # flags are zero before any peer can signal
        handles = group.all_gather_object([cupy.cuda.runtime.ipcGetMemHandle(p) for p in self._own])
        self._opened: list[int] = []
        bufs, sigs = zip(*(self._pointers(r, h) for r, h in enumerate(handles)))
        self._table = torch.tensor([bufs, sigs], dtype=torch.int64, device=device)  # [2, world] pointers
        self._epochs = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=device)
        module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("--std=c++17",))
        self._kernels = {dtype: module.get_function(name) for dtype, name in KERNELS.items()}
        self._norm_kernels = {dtype: module.get_function(name) for dtype, name in NORM_KERNELS.items()}

    def _pointers(self, rank: int, handles) -> tuple[int, int]:
        if rank == self.rank:
            return tuple(self._own)
        opened = [self._cupy.cuda.runtime.ipcOpenMemHandle(h) for h in handles]
        self._opened += opened
        return tuple(opened)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype in KERNELS and x.is_contiguous() and x.numel() * x.element_size() <= self.max_bytes

    def fits_rows(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the fused all-reduce + add + RMSNorm takes these: rows of whole 16-byte packs."""
        return (self.fits(x) and x.dim() == 2 and residual.shape == x.shape and residual.dtype == x.dtype
                and residual.is_contiguous() and weight.dtype == x.dtype and weight.is_contiguous()
                and x.shape[1] * x.element_size() % 16 == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the group, in place (every rank gets the same bits)."""
        import numpy as np

        nbytes = x.numel() * x.element_size()
        blocks = max(1, min(MAX_BLOCKS, -(-nbytes // (16 * THREADS))))
        self._launch(self._kernels[x.dtype], blocks, np.uint64(x.data_ptr()), np.int64(nbytes))
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(sum(x) + residual) * weight, sum(x) + residual) in one kernel; the new residual
        stream is written into x (consumed), residual is only read. x, residual: [N, H]; the
        roundings of the unfused ops (all-reduce, add, norm) are kept step by step."""
        import numpy as np

        rows, cols = x.shape
        out = torch.empty_like(x)
        threads = min(THREADS, max(32, -(-cols * x.element_size() // 16 // 32) * 32))  # a thread per pack
        self._launch(self._norm_kernels[x.dtype], min(MAX_BLOCKS, rows), np.uint64(x.data_ptr()),
                     np.uint64(residual.data_ptr()), np.uint64(out.data_ptr()), np.uint64(weight.data_ptr()),
                     np.int64(rows), np.int64(cols), np.float32(eps), threads=threads)
        return out, x

    def _launch(self, kernel, blocks: int, *args, threads: int = THREADS) -> None:
        """`kernel(*args, buffers...)` on the caller's current stream (captured when it captures)."""
        import numpy as np

        stream = self._cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)
        tail = (np.uint64(self._table[0].data_ptr()), np.uint64(self._table[1].data_ptr()),
                np.uint64(self._epochs.data_ptr()), np.int32(self.rank), np.int32(self.world),
                np.int64(self.max_bytes))
        kernel((blocks,), (threads,), args + tail, stream=stream)

    def close(self) -> None:
        """Unmap the peers' buffers and free ours (after every graph that captured a call is gone)."""
        runtime = self._cupy.cuda.runtime
        for ptr in self._opened:
            runtime.ipcCloseMemHandle(ptr)
        for ptr in self._own:
            runtime.free(ptr)
        self._opened, self._own = [], []


def try_custom_all_reduce(group: Communicator, device: torch.device) -> CustomAllReduce | None:
    """The group's custom all-reduce, or None (NCCL for everything) with the reason logged.
    Collective: every rank of the group calls it and all of them get the same answer."""
    if not wanted():
        return None
    peers = group.all_gather_object((socket.gethostname(), torch.cuda.current_device()))
    reason = reason_unusable(peers, group.rank)
    if not _agreed(group, reason):
        return None
    try:
        custom = CustomAllReduce(group, device, max_bytes_setting())
        error = None
    except Exception as exc:  # noqa: BLE001 - any CuPy/NVRTC/IPC failure means "use NCCL"
        custom, error = None, f"{type(exc).__name__}: {exc}"
    if not _agreed(group, error):
        if custom is not None:
            custom.close()
        return None
    if group.rank == 0:
        log.info("TP all-reduce: one-shot over CUDA IPC for messages up to %d KB, NCCL above",
                 custom.max_bytes // 1024)
    return custom


def _agreed(group: Communicator, reason: str | None) -> bool:
    """True when no rank of the group has a reason against; otherwise log the first one."""
    reasons = [r for r in group.all_gather_object(reason) if r]
    if reasons and group.rank == 0:
        log.warning("TP all-reduce falls back to NCCL for every message: %s", reasons[0])
    return not reasons
