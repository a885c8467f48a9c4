"""Step watchdog: a rank that stops making progress ends the job within `--step-timeout`,
named with its host, instead of leaving the others in a collective until NCCL's or
gloo's own timeout (10-30 minutes).

Beside the data plane, every rank runs a beacon thread that tells rank 0 twice a
second over ZeroMQ that it is alive and how many steps it has finished; rank 0
publishes the same to the others. Rank 0 fails the job when
- a rank's beacons stop for step_timeout: it is stopped (SIGSTOP), dead, or its
  node's network is cut; or
- a step has run for step_timeout while every rank still beacons: a collective that
  never completes; the ranks that have not finished the step are named.
The other ranks fail on their own only when rank 0 falls silent (a little later than
rank 0 would, so that rank 0's diagnosis comes first when it can be made).

A rank that dies (kill -9, a crash) is named at once, not after the step timeout: each
rank also holds a plain TCP "lifeline" to rank 0, which a dying process's kernel closes.
A lifeline that closes without a goodbye (sent at a normal exit) is logged as
`rank R (on HOST, pid P) died: ...` before the launcher tears the job down; without it,
a peer on another host that notices the broken data-plane socket first may abort the job
(OpenMPI: "process rank 2 ... calling abort") and nothing would name the rank that died.

Failing means: log the reason, then exit this process with EXIT_STEP_TIMEOUT. The
launcher (mpirun, srun --kill-on-bad-exit, the Ray driver) ends the other ranks, and
a server's front-end sees rank 0 go: /health answers 503 and it exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import zmq

from dist_infer.comm.base import Communicator
from dist_infer.errors import RankLostError

log = logging.getLogger(__name__)

EXIT_STEP_TIMEOUT = 3
BEACON_INTERVAL_S = 0.5
DEFAULT_STEP_TIMEOUT_S = {"cuda": 30.0, "cpu": 600.0}  # CPU steps of a large prompt can take minutes
# How gloo (torch.distributed) reports a peer that vanished mid-collective.
LOST_PEER_WORDS = ("Connection closed", "Connection reset", "Broken pipe", "Connection refused", "Timed out")
GOODBYE = b"bye"  # on a lifeline at a normal exit: its close is no death
# Called with the failure's message just before a failing watchdog ends its process: where the
# process's own log dies with it (a Ray actor's, returned only when its task ends), a launcher
# registers a hook that leaves the message where its driver finds it.
last_words_hooks: list = []


def default_step_timeout(device: str) -> float:
    return DEFAULT_STEP_TIMEOUT_S["cuda" if device.startswith("cuda") else "cpu"]


@dataclass
class StepProgress:
    """What a rank's step loop reports: steps finished, and since when it is inside one."""

    done: int = 0
    since: float | None = None  # monotonic start of the step in progress
    in_flight: int = 0  # steps begun and not ended (rank 0 queues one ahead: async scheduling)

    def begin(self) -> None:
        if not self.in_flight:
            self.since = time.monotonic()
        self.in_flight += 1

    def end(self) -> None:
        """A step done; the one queued behind it (if any) starts now on the device."""
        self.done += 1
        self.in_flight -= 1
        self.since = time.monotonic() if self.in_flight else None


@dataclass
class _Peer:
    host: str
    pid: int
    seen: float = field(default_factory=time.monotonic)
    done: int = 0


def _local_addresses() -> list[str]:
    """Every IPv4 address of this host: a peer connects to all of them and keeps the ones that answer."""
    try:
        import psutil
        found = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    except Exception:  # no psutil or no interfaces readable: the hostname's address and loopback
        found = {socket.gethostbyname(socket.gethostname())}
    return sorted(found | {"127.0.0.1"})


class StepWatchdog:
    """One per rank; `start` is collective (rank 0 sends its endpoints to the others)."""

    def __init__(self, world: Communicator, progress: StepProgress, step_timeout_s: float):
        self.world = world
        self.progress = progress
        self.timeout = step_timeout_s
        self.ctx = zmq.Context()
        self.me = (socket.gethostname(), os.getpid())
        self.peers: dict[int, _Peer] = {}
        self.failed = threading.Event()
        self.lifelines: dict[socket.socket, int | None] = {}  # socket -> the rank at its other end
        self.listener: socket.socket | None = None               # rank 0: where lifelines come in
        self.leaving = False  # this rank said goodbye: a lifeline that closes now is its peer answering

    def start(self) -> None:
        endpoints = self._bind() if self.world.rank == 0 else None
        endpoints = self.world.broadcast_object(endpoints)
        if self.world.rank != 0:
            self._connect(*endpoints[:2])
            self._lifeline_to_rank0(endpoints[2])
        atexit.register(self._goodbye)
        threading.Thread(target=self._run, daemon=True, name="step-watchdog").start()

    def _bind(self) -> tuple[list[str], list[str], list[tuple[str, int]]]:
        """Rank 0: beacons come in on `inbox`, rank 0's own go out on `outbox`, lifelines on `listener`."""
        self.inbox = self.ctx.socket(zmq.PULL)
        self.outbox = self.ctx.socket(zmq.PUB)
        addresses = _local_addresses()
        in_port = self.inbox.bind_to_random_port("tcp://*")
        out_port = self.outbox.bind_to_random_port("tcp://*")
        self.listener = socket.create_server(("", 0), backlog=max(16, self.world.size))
        life_port = self.listener.getsockname()[1]
        return ([f"tcp://{a}:{in_port}" for a in addresses], [f"tcp://{a}:{out_port}" for a in addresses],
                [(a, life_port) for a in addresses])

    def _lifeline_to_rank0(self, addresses: list[tuple[str, int]]) -> None:
        """The first of rank 0's addresses that answers; none: the beacons alone watch rank 0."""
        for address in addresses:
            try:
                sock = socket.create_connection(address, timeout=2)
            except OSError:
                continue
            sock.sendall(struct.pack("!i", self.world.rank))
            self.lifelines[sock] = 0
            return

    def _connect(self, to_rank0: list[str], from_rank0: list[str]) -> None:
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.IMMEDIATE, 1)  # only to addresses that connected: the ones that reach rank 0
        self.outbox.setsockopt(zmq.SNDHWM, 4)
        self.inbox = self.ctx.socket(zmq.SUB)
        self.inbox.setsockopt(zmq.SUBSCRIBE, b"")
        for a in to_rank0:
            self.outbox.connect(a)
        for a in from_rank0:
            self.inbox.connect(a)
        self.peers[0] = _Peer("rank 0's host", -1)

    def _run(self) -> None:
        while not self.failed.is_set():
            self._beacon()
            self._receive()
            problem = self._check()
            if problem:
                self._fail(problem)
            self._watch_lifelines(BEACON_INTERVAL_S)

    def _watch_lifelines(self, timeout: float) -> None:
        """Wait up to `timeout` for lifeline news: a rank connecting (rank 0), a goodbye, or a death."""
        watched = list(self.lifelines) + ([self.listener] if self.listener else [])
        if not watched:
            time.sleep(timeout)
            return
        ready, _, _ = select.select(watched, [], [], timeout)
        for sock in ready:
            if sock is self.listener:
                self._accept_lifeline()
            else:
                self._read_lifeline(sock)

    def _accept_lifeline(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(2)
        try:
            self.lifelines[conn] = struct.unpack("!i", conn.recv(4))[0]
        except (OSError, struct.error):
            conn.close()

    def _read_lifeline(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(16)
        except OSError:
            data = b""
        rank = self.lifelines.pop(sock)
        sock.close()
        if not data.startswith(GOODBYE) and not self.failed.is_set() and not self.leaving:
            peer = self.peers.get(rank, _Peer("unknown host", -1))
            where = f"on {peer.host}, pid {peer.pid}" if peer.pid >= 0 else f"on {peer.host}"
            log.error("rank %d (%s) died: its lifeline to rank %d closed without a goodbye (killed, or it "
                      "crashed); the job ends.", rank, where, self.world.rank)

    def _goodbye(self) -> None:
        """A normal exit (atexit): the lifelines close, but no one died. (Rank 0 closes its end when
        it reads the goodbye; the thread watching this end must not take that for rank 0's death.)"""
        self.leaving = True
        for sock in list(self.lifelines):
            try:
                sock.sendall(GOODBYE)
            except OSError:
                pass

    def _beacon(self) -> None:
        message = (self.world.rank, *self.me, self.progress.done)
        try:
            self.outbox.send(pickle.dumps(message), zmq.NOBLOCK)
        except zmq.Again:  # not connected (yet) or rank 0 not reading: the beacon is simply lost
            pass

    def _receive(self) -> None:
        while self.inbox.poll(0):
            rank, host, pid, done = pickle.loads(self.inbox.recv())
            self.peers[rank] = _Peer(host, pid, time.monotonic(), done)

    def _check(self) -> str | None:
        if self.world.rank == 0:
            return self._silent_rank(self.timeout) or self._stuck_step()
        return self._silent_rank(self.timeout + 4 * BEACON_INTERVAL_S)  # leave rank 0 time to name the culprit

    def _silent_rank(self, limit: float) -> str | None:
        expected = range(1, self.world.size) if self.world.rank == 0 else [0]
        now = time.monotonic()
        for rank in expected:
            peer = self.peers.setdefault(rank, _Peer("unknown host", -1))
            if now - peer.seen > limit:
                where = f"on {peer.host}, pid {peer.pid}" if peer.pid >= 0 else f"on {peer.host}"
                return (f"rank {rank} ({where}) has sent no heartbeat for {now - peer.seen:.0f} s: it is stopped, "
                        "dead, or its node is cut off from the network")
        return None

    def _stuck_step(self) -> str | None:
        since, step = self.progress.since, self.progress.done + 1
        if since is None or time.monotonic() - since <= self.timeout:
            return None
        silent = self._silent_rank(3 * BEACON_INTERVAL_S)  # stopped mid-step: the step's culprit
        if silent:
            return f"step {step} has not finished after {time.monotonic() - since:.0f} s, and {silent}"
        behind = sorted(r for r, p in self.peers.items() if p.done < step)
        names = ", ".join(f"rank {r} ({self.peers[r].host}, pid {self.peers[r].pid})" for r in behind)
        return (f"step {step} has not finished after {time.monotonic() - since:.0f} s although every rank is alive; "
                f"still inside it: {names or 'rank 0 only'} (a collective that never completes: check the "
                "NCCL/network logs of those ranks)")

    def silent_peers(self) -> list[str]:
        """After a collective broke: wait a few beacons, then name the peers that fell silent."""
        quiet = 3 * BEACON_INTERVAL_S
        time.sleep(quiet + BEACON_INTERVAL_S)  # the thread keeps receiving meanwhile
        now = time.monotonic()
        return [f"rank {r} ({p.host}, pid {p.pid})" for r, p in sorted(self.peers.items()) if now - p.seen > quiet]

    def _fail(self, problem: str) -> None:
        self.failed.set()
        words = f"step watchdog (--step-timeout {self.timeout:.0f} s): {problem}. Ending the job."
        log.error("%s", words)
        for hook in last_words_hooks:
            try:
                hook(words)
            except Exception:  # the exit below matters more than the message
                pass
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_STEP_TIMEOUT)


@contextmanager
def naming_lost_ranks(watchdog: StepWatchdog | None, rank: int) -> Iterator[None]:
    """A gloo collective that breaks because a peer died raises a bare RuntimeError that names
    no rank: turn it into a RankLostError that names the ranks whose beacons stopped."""
    try:
        yield
    except RuntimeError as exc:
        if watchdog is None or not any(w in str(exc) for w in LOST_PEER_WORDS):
            raise
        lost = watchdog.silent_peers()
        who = (f"{', '.join(lost)} stopped answering (died, or its node is cut off)" if lost else
               "a peer's connection broke; rank 0's log names the lost rank")
        raise RankLostError(f"rank {rank}: {who}, so the job ends. ({exc})".strip()) from exc
