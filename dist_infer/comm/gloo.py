"""CPU data plane over torch.distributed's gloo backend, for ranks that have
no MPI: Ray actors and env-launched processes (`srun --mpi=none`, torchrun
style RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT).

One process group per process (torch.distributed's default group) is the
world; `split` makes sub-groups with `new_group`, which every rank of the
world must call for every sub-group, in the same order — `split` does that.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from dist_infer.errors import LaunchError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600
DEFAULT_JOIN_TIMEOUT_S = 300  # every rank must have started within this (DIST_INFER_GLOO_JOIN_TIMEOUT)
JOIN_REPORT_S = 10            # rank 0 says which ranks it still waits for this often
JOIN_POLL_S = 0.2


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("DIST_INFER_GLOO_TIMEOUT", DEFAULT_TIMEOUT_S)))


def _join_timeout() -> float:
    return float(os.environ.get("DIST_INFER_GLOO_JOIN_TIMEOUT", DEFAULT_JOIN_TIMEOUT_S))


class GlooCommunicator:
    def __init__(self, group=None):
        self.group = group  # None: the default (world) group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    @classmethod
    def init_world(cls, rank: int, world_size: int, master_addr: str, master_port: int) -> GlooCommunicator:
        """Join (or create, on rank 0) the world through a TCP store at master_addr:master_port."""
        if dist.is_initialized():
            return cls()
        if not 0 <= rank < world_size:
            raise LaunchError(f"rank {rank} is outside the world of {world_size} ranks; check RANK/WORLD_SIZE "
                              "(or SLURM_PROCID/SLURM_NTASKS).")
        _pick_interface(master_addr)
        try:
            store = _join(rank, world_size, master_addr, int(master_port))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=_timeout())
        except (RuntimeError, ValueError, OSError) as exc:  # DistStoreError is a RuntimeError
            raise LaunchError(f"rank {rank} could not join the gloo world of {world_size} at "
                              f"{master_addr}:{master_port}: {exc}. Check that MASTER_ADDR is reachable from every "
                              "node, MASTER_PORT is free on it, and every rank was started "
                              "(set GLOO_SOCKET_IFNAME to the interface the nodes share).") from exc
        # Without an explicit destroy, c10d's threads are torn down by static destructors at
        # exit and the process can die with "terminate called without an active exception".
        atexit.register(_destroy)
        return cls()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() and x.dtype != torch.bfloat16:
            dist.all_reduce(x, group=self.group)
            return x
        # Like the MPI plane: bf16 is summed in float32 and rounded once; strided views via a copy.
        wide = x.float() if x.dtype == torch.bfloat16 else x.contiguous()
        dist.all_reduce(wide, group=self.group)
        return x.copy_(wide)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((self.size, *x.shape))
        dist.all_gather(list(out.unbind(0)), x, group=self.group)
        return out

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x.contiguous(), group=self.group, group_dst=dst)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        if x.is_contiguous():
            dist.recv(x, group=self.group, group_src=src)
            return x
        buf = x.contiguous()
        dist.recv(buf, group=self.group, group_src=src)
        return x.copy_(buf)

    def broadcast_object(self, obj, src=0):
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, group=self.group, group_src=src)
        return box[0]

    def all_gather_object(self, obj):
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self):
        dist.barrier(group=self.group)

    def split(self, color: int, key: int) -> GlooCommunicator:
        if self.group is not None:
            raise NotImplementedError("GlooCommunicator.split is only supported on the world communicator")
        entries = self.all_gather_object((color, key))
        mine = None
        for c in sorted({c for c, _ in entries}):
            ranks = sorted((r for r, (cc, _) in enumerate(entries) if cc == c), key=lambda r: (entries[r][1], r))
            # Every rank creates every group (torch.distributed's rule), and keeps its own.
            group = dist.new_group(ranks, timeout=_timeout(), backend="gloo")
            if c == color:
                mine = _SubGroup(group, ranks)
        return mine

    def abort(self, code: int = 1) -> None:
        """gloo cannot kill its peers: exit this process at once; the launcher
        (srun --kill-on-bad-exit, the Ray driver) takes the rest of the job down."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def close(self) -> None:
        if self.group is None and dist.is_initialized():
            dist.destroy_process_group()


class _SubGroup(GlooCommunicator):
    """A sub-group; group ranks follow the order `split` was given (by key)."""

    def __init__(self, group, ranks: list[int]):
        # new_group sorts ranks by global rank; we order by key, so translate explicitly.
        self.group = group
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = ranks.index(dist.get_rank())
        self._sorted = sorted(ranks)

    def _g(self, r: int) -> int:
        """Our group rank -> torch's group rank (its ranks are the sorted global ranks)."""
        return self._sorted.index(self.ranks[r])

    def send(self, x, dst):
        dist.send(x.contiguous(), group=self.group, group_dst=self._g(dst))

    def recv(self, x, src):
        buf = x if x.is_contiguous() else x.contiguous()
        dist.recv(buf, group=self.group, group_src=self._g(src))
        return x if buf is x else x.copy_(buf)

    def all_gather(self, x):
        got = GlooCommunicator.all_gather(self, x)  # in torch's (sorted) order
        return torch.stack([got[self._g(r)] for r in range(self.size)]) if self._sorted != self.ranks else got

    def broadcast_object(self, obj, src=0):
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, group=self.group, group_src=self._g(src))
        return box[0]

    def all_gather_object(self, obj):
        out = GlooCommunicator.all_gather_object(self, obj)
        return [out[self._g(r)] for r in range(self.size)]

    def split(self, color, key):
        raise NotImplementedError("GlooCommunicator.split is only supported on the world communicator")

    def close(self) -> None:
        pass


def _join(rank: int, world_size: int, master_addr: str, master_port: int) -> dist.TCPStore:
    """Every rank checks in at rank 0's store, then waits for the others: rank 0 says which ranks
    it still waits for, and every rank gives up after the join timeout naming them (gloo's own
    wait for a rank that never started is silent for its whole collective timeout)."""
    timeout = _join_timeout()
    store = dist.TCPStore(master_addr, master_port, world_size, rank == 0,
                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    store.set(f"dist_infer/joined/{rank}", socket.gethostname())
    started, reported = time.monotonic(), time.monotonic()
    while missing := _not_joined(store, rank, world_size):
        waited = time.monotonic() - started
        if waited > timeout + (0 if rank == 0 else 2 * JOIN_POLL_S):  # rank 0 first: its store closes after
            raise LaunchError(f"ranks {missing} of {world_size} never joined at {master_addr}:{master_port} within "
                              f"{timeout:.0f} s: start them (same MASTER_ADDR/MASTER_PORT/WORLD_SIZE, RANK 0.."
                              f"{world_size - 1}), or raise DIST_INFER_GLOO_JOIN_TIMEOUT if they start late.")
        if rank == 0 and time.monotonic() - reported >= JOIN_REPORT_S:
            log.info("waiting for ranks %s to join (%.0f of %.0f s)", missing, waited, timeout)
            reported = time.monotonic()
        time.sleep(JOIN_POLL_S)
    return store


def _not_joined(store: dist.TCPStore, rank: int, world_size: int) -> list[int]:
    try:
        return [r for r in range(world_size) if not store.check([f"dist_infer/joined/{r}"])]
    except RuntimeError as exc:  # rank 0 gave up (and named the missing ranks) or died
        raise LaunchError(f"rank {rank}: rank 0 closed the join before every rank of {world_size} arrived; its "
                          f"log names the ranks that never joined ({exc}).") from exc


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _pick_interface(master_addr: str) -> None:
    """Without GLOO_SOCKET_IFNAME gloo binds to the address its hostname resolves
    to, which on multi-NIC nodes (or nodes whose hostname does not resolve) is
    the wrong one or none: use the interface that routes to rank 0's node."""
    if os.environ.get("GLOO_SOCKET_IFNAME") or not sys.platform.startswith("linux"):
        return
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))  # UDP: no packet is sent, only a route is chosen
            local_ip = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
            if socket.inet_ntoa(packed[20:24]) == local_ip:
                os.environ["GLOO_SOCKET_IFNAME"] = name
                return
    except OSError:
        return


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
