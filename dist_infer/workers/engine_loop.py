"""Rank 0's serving loop: requests arrive on a ZeroMQ socket, steps run, deltas go back.

The front-end (HTTP server or `dist_infer.LLM`) lives in another process, so
tokenization, JSON and SSE never stall a step. Two sockets: the front-end
PUSHes commands into `requests`, and PULLs step outputs and heartbeats from
`outputs`. Rank 0 binds them (local ipc sockets; its front-end is its child),
or, under a supervisor (`serve --restart N`), CONNECTS to the ones the
front-end bound: the front-end outlives this rank job, and the job's next
incarnation connects to the front-end's next pair of sockets. A connected
loop stops when the front-end falls silent (it pings every second), so a rank
job never outlives its supervisor for long.

Commands (pickled tuples): ("add", request_id, Request) | ("abort", request_id)
| ("drain", timeout_s) | ("shutdown",) | ("ping",)
| ("update_weights", update_id, engine_dir) (serve --enable-admin). Messages back:
("outputs", [RequestOutput]) | ("rejected", request_id, message)
| ("heartbeat", EngineStats, draining)
| ("weights", update_id, WeightsUpdated | None, error message | None).

While no request runs the loop blocks on the socket (no busy core) and sends
the other ranks an empty keepalive step every `keepalive_s`, so their wait for
the next plan never reaches a collective timeout.

Every frame is signed (FrameSigner: HMAC-SHA256 over the pickled message, checked
before anything is unpickled), because the sockets may be TCP (`serve --restart`
with `--control-host`) and unpickling is running code: a frame from anyone without
the key is dropped with a warning. The key (engine_key) never appears on a command
line: for ipc sockets it is a 0600 file beside them, for TCP the supervisor's
DIST_INFER_ENGINE_KEY, which the rank job inherits.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from dist_infer.errors import DistInferError, LaunchError, RequestError
from dist_infer.workers.llm_engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineAddresses:
    requests: str  # front-end -> engine
    outputs: str   # engine -> front-end

    @classmethod
    def in_directory(cls, directory: Path) -> EngineAddresses:
        return cls(f"ipc://{directory}/requests.sock", f"ipc://{directory}/outputs.sock")

    @classmethod
    def parse(cls, text: str) -> EngineAddresses:
        """`serve --connect REQUESTS,OUTPUTS` (what `joined` wrote)."""
        requests, _, outputs = text.partition(",")
        if not requests or not outputs:
            raise ValueError(f"expected two ZeroMQ addresses separated by a comma, got {text!r}")
        return cls(requests, outputs)

    def joined(self) -> str:
        return f"{self.requests},{self.outputs}"


ENGINE_KEY_ENV = "DIST_INFER_ENGINE_KEY"  # the TCP sockets' key, inherited by the rank job (never in argv)
KEY_FILE = "engine.key"                  # the ipc sockets' key, 0600, beside them


def engine_key(addresses: EngineAddresses, create: bool) -> bytes:
    """The key both ends of `addresses` sign with. ipc: a 0600 file in the sockets' directory
    (both ends are on this machine; either may come first). TCP: DIST_INFER_ENGINE_KEY, made here
    when `create` (the binding front-end, before it starts the rank job) and inherited by rank 0."""
    if addresses.requests.startswith("ipc://"):
        return _key_file(Path(addresses.requests.removeprefix("ipc://")).parent / KEY_FILE)
    if create and not os.environ.get(ENGINE_KEY_ENV):
        os.environ[ENGINE_KEY_ENV] = secrets.token_hex(32)
    if not os.environ.get(ENGINE_KEY_ENV):
        raise LaunchError(f"rank 0 has no {ENGINE_KEY_ENV}, the key of its supervisor's sockets: the launcher did not "
                          f"pass the supervisor's environment on. Forward it (mpirun -x {ENGINE_KEY_ENV}; srun "
                          "--export=ALL).")
    return os.environ[ENGINE_KEY_ENV].encode()


def engine_key_env() -> dict[str, str]:
    """{DIST_INFER_ENGINE_KEY: key} for a launcher that does not pass on this process's
    environment (Ray actors): the key is made first if this process has none."""
    engine_key(EngineAddresses("tcp://*", "tcp://*"), create=True)
    return {ENGINE_KEY_ENV: os.environ[ENGINE_KEY_ENV]}


def _key_file(path: Path) -> bytes:
    """Read the key, or create it atomically (a 0600 temp file linked into place: two ends
    starting together agree on one key). A file others could read or have written is refused."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_bytes(32))
        os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise LaunchError(f"{path} (the engine sockets' key) must belong to this user with mode 0600; remove it, "
                          "or use a private --ipc-dir.")
    return path.read_bytes()


class FrameSigner:
    """HMAC-SHA256 over each pickled message: seal() before a send, open() after a receive.
    open() checks the MAC before unpickling and returns None (with a warning) for a frame
    that was not made with the key, so a stranger on the port can neither run code nor
    inject requests."""

    MAC = 32  # bytes: [MAC | pickle]

    def __init__(self, key: bytes, side: str):
        self.key, self.side = key, side
        self.rejected = 0

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest()

    def seal(self, message: tuple) -> bytes:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        return self._mac(payload) + payload

    def open(self, frame: bytes) -> tuple | None:
        mac, payload = frame[:self.MAC], frame[self.MAC:]
        if hmac.compare_digest(mac, self._mac(payload)):
            return pickle.loads(payload)
        self.rejected += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:  # a flood must not flood the log too
            log.warning("%s: dropped an unauthenticated frame (%d bytes; %d so far): not signed with this "
                        "server's engine key", self.side, len(frame), self.rejected)
        return None


class LoopStats:
    """What the loop did since the last report: logged every `interval_s` while busy, so an
    operator sees step rate, the ranks' share of a step and the loop's own overhead."""

    interval_s = 10.0

    def __init__(self):
        self.since = time.monotonic()
        self.steps = self.tokens = 0
        self.loop_s = self.rank_s = 0.0

    def add(self, loop_s: float, tokens: int, rank_s: float) -> None:
        """One loop turn that ran a step: its wall time, the step's tokens and time on the ranks."""
        self.steps += 1
        self.loop_s += loop_s
        self.rank_s += rank_s
        self.tokens += tokens

    def due(self) -> bool:
        return self.steps > 0 and time.monotonic() - self.since >= self.interval_s

    def report(self, engine: LLMEngine) -> str:
        stats, n = engine.stats(), self.steps
        return (f"{n / (time.monotonic() - self.since):.1f} steps/s, {self.tokens / n:.0f} tokens/step, step "
                f"{1e3 * self.loop_s / n:.2f} ms (ranks {1e3 * self.rank_s / n:.2f} ms), running {stats.running}, "
                f"waiting {stats.waiting}, KV {100 * stats.kv_usage:.0f}%, prefix hits {100 * stats.prefix_hit_rate:.0f}%")


FRONTEND_SILENCE_S = 30.0  # a connected loop stops after this long without a word from its front-end


class EngineLoop:
    heartbeat_s = 0.5

    def __init__(self, engine: LLMEngine, addresses: EngineAddresses, keepalive_s: float = 30.0,
                 connect: bool = False):
        self.engine = engine
        self.keepalive_s = keepalive_s
        self.connected = connect
        self.signer = FrameSigner(engine_key(addresses, create=not connect), "engine loop")
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 1000)
        self.outbox.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow (but connected) front-end
        attach = (lambda s, a: s.connect(a)) if connect else (lambda s, a: s.bind(a))
        attach(self.inbox, addresses.requests)
        attach(self.outbox, addresses.outputs)
        self.drain_deadline: float | None = None
        self.stopping = False
        self._last_heartbeat = 0.0
        self._last_plan = time.monotonic()
        self._last_heard = time.monotonic()
        self.stats = LoopStats()

    def handle_signals(self, shutdown_timeout: float) -> None:
        """SIGTERM / SIGINT drain: refuse new requests, finish the running ones within the timeout."""
        def drain(signum, frame):
            log.info("%s: draining (at most %.0f s)", signal.Signals(signum).name, shutdown_timeout)
            self.start_drain(shutdown_timeout)
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. inside a Ray actor's task thread: the launcher owns the signals there
        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGINT, drain)

    def start_drain(self, timeout_s: float) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + timeout_s

    def run(self, should_stop=lambda: False) -> None:
        """Serve until shut down, drained, or `should_stop()` (e.g. the front-end died)."""
        while not self.stopping and not should_stop() and not self._frontend_gone():
            turn = time.monotonic()
            busy = self.engine.has_unfinished()
            self._receive(0 if busy else min(self.heartbeat_s, self.keepalive_s) * 1000)
            turn = turn if busy else time.monotonic()  # an idle wait is not step overhead
            if self.engine.has_unfinished():
                steps = self.engine.num_steps
                self._send(("outputs", self.engine.step()))
                self._last_plan = time.monotonic()
                if self.engine.num_steps > steps:
                    self.stats.add(self._last_plan - turn, *self.engine.step_times[-1])
            elif time.monotonic() - self._last_plan > self.keepalive_s:
                self.engine.keepalive()
                self._last_plan = time.monotonic()
            self._heartbeat()
            self._check_drain()
            self._report()
        self._heartbeat(force=True)

    def _frontend_gone(self) -> bool:
        """A connected loop whose supervisor died (kill -9, a lost node) must not serve nobody forever."""
        silent = time.monotonic() - self._last_heard
        if not self.connected or silent < FRONTEND_SILENCE_S:
            return False
        log.error("the front-end has been silent for %.0f s (its supervisor is gone): stopping", silent)
        return True

    def _report(self) -> None:
        if self.stats.due():
            log.info("engine: %s", self.stats.report(self.engine))
            self.stats = LoopStats()

    def _receive(self, timeout_ms: float) -> None:
        if not self.inbox.poll(timeout_ms):
            return
        while True:
            try:
                message = self.signer.open(self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if message is not None:  # a forged frame is neither run nor counted as the front-end's word
                self._last_heard = time.monotonic()
                self._handle(message)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self._add(message[1], message[2])
        elif kind == "abort":
            self.engine.abort(message[1])
        elif kind == "drain":
            self.start_drain(message[1])
        elif kind == "shutdown":
            self.stopping = True
        elif kind == "update_weights":
            self._update_weights(message[1], message[2])

    def _update_weights(self, update_id: str, directory: str) -> None:
        """Between steps: the step in flight is finished (its tokens go out first), every rank
        swaps in the new weights (all or none), and the next step runs on them."""
        self._send(("outputs", self.engine.finish_in_flight()))
        try:
            done = self.engine.update_weights(Path(directory))
        except DistInferError as exc:
            log.warning("weight update from %s refused: %s", directory, exc)
            self._send(("weights", update_id, None, str(exc)))
            return
        self._send(("weights", update_id, done, None))

    def _add(self, request_id: str, request) -> None:
        if self.drain_deadline is not None:
            self._send(("rejected", request_id, "the server is shutting down"))
            return
        try:
            self.engine.add_request(request_id, request)
        except RequestError as exc:
            self._send(("rejected", request_id, str(exc)))

    def _check_drain(self) -> None:
        if self.drain_deadline is None:
            return
        if not self.engine.has_unfinished():
            self.stopping = True
        elif time.monotonic() > self.drain_deadline:
            ids = list(self.engine.requests)
            log.warning("shutdown timeout: aborting %d unfinished requests", len(ids))
            self._send(("outputs", [self.engine.abort_output(i) for i in ids]))
            self.stopping = True

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_heartbeat >= self.heartbeat_s:
            self._send(("heartbeat", self.engine.stats(), self.drain_deadline is not None or self.stopping))
            self._last_heartbeat = now

    def _send(self, message: tuple) -> None:
        if message[0] == "outputs" and not message[1]:
            return
        try:
            self.outbox.send(self.signer.seal(message), zmq.NOBLOCK)
        except zmq.Again:  # no front-end connected (yet): nobody to tell; the engine loop must not block
            pass

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.outbox.close()
        self.ctx.term()
