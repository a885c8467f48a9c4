"""The one engine client: async, over rank 0's engine sockets. The HTTP
front-end and `dist_infer.LLM` both use it (one client, two faces).

Detokenization and stop strings run here, in the caller's process, not on
the thread that drives steps: a stop string ends the stream at once and
aborts the request in the engine.

Two ways to reach the engine:
- connected (`EngineClient(addresses)`): rank 0 bound the sockets; the client
  lives and dies with that engine (today's `serve`, `dist_infer.LLM`);
- bound (`EngineClient(None)`, then `bind(host)` per rank job): the client binds
  fresh sockets for each incarnation of the rank job under a supervisor
  (`serve --restart N`). Every accepted, unfinished request is kept with the
  tokens the engine sent for it; when the next engine is ready (its first
  heartbeat) each is submitted again as prompt + those tokens, asking only for
  the rest, so a stream continues where it stopped. Fresh sockets per
  incarnation mean nothing the old engine sent late can reach a resumed stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import zmq
import zmq.asyncio

from dist_infer.errors import DistInferError, RequestError
from dist_infer.scheduler import IncrementalDetokenizer
from dist_infer.workers.engine_loop import EngineAddresses, FrameSigner, engine_key
from dist_infer.workers.llm_engine import EngineStats, Request, RequestOutput

PING_S = 1.0  # a bound client tells a connected engine loop it is alive (engine_loop.FRONTEND_SILENCE_S)


class EngineDeadError(DistInferError):
    """The engine stopped answering (a rank died, or the job ended)."""

    exit_code = 1


class EngineDrainingError(DistInferError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    detok: IncrementalDetokenizer | None
    output_ids: list[int]
    request: Request                                 # as the caller asked (stop strings stay here)
    received: list[int] = field(default_factory=list)  # every token the engine sent, delivered or queued
    resumed_from: int = 0                            # len(received) when the current engine got the request
    engine_done: bool = False                        # the engine sent its last delta
    finished: bool = False                           # the caller got its last delta

    def engine_request(self) -> Request:
        """What the engine runs: the rest of the request, after the tokens already received."""
        r, done = self.request, len(self.received)
        if not done:
            return Request(r.prompt_ids, r.max_new_tokens, r.sampling, (), r.ignore_eos)
        # The prompt's logprobs went out with the first token; the seeded stream skips the draws made.
        sampling = replace(r.sampling, prompt_logprobs=None, resume_at=done)
        return Request(r.prompt_ids + self.received, r.max_new_tokens - done, sampling, (), r.ignore_eos)

    def rebase(self, out: RequestOutput) -> RequestOutput:
        """A resumed request's delta, counted as the original request's (usage stays the caller's)."""
        if self.resumed_from:
            out.num_prompt_tokens = len(self.request.prompt_ids)
            out.num_output_tokens += self.resumed_from
            out.queue_s = None
        return out


class EngineClient:
    def __init__(self, addresses: EngineAddresses | None, tokenizer=None, heartbeat_timeout_s: float = 5.0):
        self.addresses = addresses  # None: bound by this client, see bind()
        self.tokenizer = tokenizer
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stats: EngineStats | None = None
        self.draining = False
        self.restarting = False  # a supervisor is starting the rank job again: requests wait
        self.dead_reason: str | None = None
        self._last_heartbeat: float | None = None
        self._streams: dict[str, _Stream] = {}
        self._unsent: set[str] = set()  # accepted, not yet given to the current engine
        self._tasks: list[asyncio.Task] = []
        self._push = self._pull = None
        self._signer: FrameSigner | None = None  # signs and checks every frame (engine_loop.FrameSigner)
        self._bound = False

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        if self.addresses is not None:
            self._open(self.addresses, bind=False)

    def bind(self, host: str) -> EngineAddresses:
        """Fresh sockets on `host` (random ports) for the next rank job to connect to."""
        self._close_sockets()
        self._bound, self._last_heartbeat = True, None
        self.addresses = self._open(EngineAddresses(f"tcp://{host}:*", f"tcp://{host}:*"), bind=True)
        self._tasks.append(asyncio.create_task(self._ping()))
        return self.addresses

    def _open(self, addresses: EngineAddresses, bind: bool) -> EngineAddresses:
        self._signer = FrameSigner(engine_key(addresses, create=bind), "front-end")
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        if bind:
            addresses = EngineAddresses(_bind_random(self._push, addresses.requests),
                                        _bind_random(self._pull, addresses.outputs))
        else:
            self._push.connect(addresses.requests)
            self._pull.connect(addresses.outputs)
        self._tasks.append(asyncio.create_task(self._pump(self._pull)))
        return addresses

    def _close_sockets(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        self._push = self._pull = None

    async def wait_ready(self, timeout_s: float, alive=lambda: True) -> None:
        """Until the first heartbeat; `alive()` false (the engine process ended) gives up early."""
        deadline = time.monotonic() + timeout_s
        while self._last_heartbeat is None:
            if not alive() or time.monotonic() > deadline:
                raise EngineDeadError("the engine did not start (see its log above).")
            await asyncio.sleep(0.05)

    @property
    def ready(self) -> bool:
        """The current engine has spoken (bound: this incarnation; connected: ever)."""
        return self._last_heartbeat is not None

    @property
    def _can_submit(self) -> bool:
        # Connected: the socket queues until rank 0 reads, as it always did. Bound: only an
        # engine that has spoken is there to take a request (a bound PUSH with no peer refuses).
        return self.dead_reason is None and (self.ready or not self._bound)

    @property
    def healthy(self) -> bool:
        return (self.dead_reason is None and self._last_heartbeat is not None
                and time.monotonic() - self._last_heartbeat < self.heartbeat_timeout_s)

    def seconds_since_heartbeat(self) -> float | None:
        return None if self._last_heartbeat is None else time.monotonic() - self._last_heartbeat

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def _pump(self, pull) -> None:
        # A missing heartbeat makes the client unhealthy (/health 503, new requests 503) but
        # fails nothing: a long step is not a death. The process watching rank 0 calls
        # `engine_died` when the engine is really gone (or `engine_lost` before a restart).
        while True:
            message = self._signer.open(await pull.recv())
            if message is not None:  # a forged frame (FrameSigner warned) is never unpickled
                self._dispatch(message)

    async def _ping(self) -> None:
        while True:
            self._send(("ping",))
            await asyncio.sleep(PING_S)

    def engine_died(self, reason: str) -> None:
        if self.dead_reason is None:
            self.restarting = False
            self._fail_all(reason)

    def engine_lost(self) -> None:
        """The rank job is gone and a supervisor starts another: every unfinished request
        waits for the next engine (see bind() and _submit_unsent)."""
        self._close_sockets()  # nothing the lost engine still had in flight may count after this
        self.restarting = True
        self._last_heartbeat = None
        # The lost engine's last word may have been "draining": its launcher SIGTERMs the surviving ranks
        # when one dies. That was the old job's state, not the server's: requests wait for the next engine.
        self.draining = False
        self._unsent.update(rid for rid, s in self._streams.items() if not s.engine_done)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "heartbeat":
            self.stats, self.draining, self._last_heartbeat = message[1], message[2], time.monotonic()
            self.restarting = False
            self._submit_unsent()
        elif kind == "rejected":
            stream = self._streams.get(message[1])
            if stream is not None:
                stream.engine_done = True
                error = EngineDrainingError if "shutting down" in message[2] else RequestError
                stream.queue.put_nowait(error(message[2]))
        elif kind == "outputs":
            for out in message[1]:
                if (stream := self._streams.get(out.request_id)) is not None:
                    self._receive(stream, out)

    @staticmethod
    def _receive(stream: _Stream, out: RequestOutput) -> None:
        stream.received += out.new_token_ids
        stream.engine_done = stream.engine_done or out.finished
        stream.queue.put_nowait(stream.rebase(out))

    def _fail_all(self, reason: str) -> None:
        self.dead_reason = reason
        self._unsent.clear()
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(reason))

    def _send(self, message: tuple) -> bool:
        """False when no engine takes it now (none connected yet: bound sockets during a restart)."""
        if self._push is None:
            return False
        # An asyncio socket reports a NOBLOCK send's zmq.Again in the (already finished) future.
        sent = self._push.send(self._signer.seal(message), zmq.NOBLOCK)
        return not (sent.done() and sent.exception() is not None)

    def _submit_unsent(self) -> None:
        """Give the current engine every accepted request it has not got (new ones, or the
        unfinished ones of a lost engine). One it cannot take yet is tried at the next heartbeat."""
        if not self._can_submit:
            return
        for request_id in list(self._unsent):
            stream = self._streams.get(request_id)
            if stream is None or stream.engine_done:
                self._unsent.discard(request_id)
            elif self._send(("add", request_id, stream.engine_request())):
                stream.resumed_from = len(stream.received)
                self._unsent.discard(request_id)

    async def generate(self, request: Request, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's deltas (text filled in here). Leaving the iterator
        early (a client disconnect) aborts the request in the engine."""
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        if self.draining:
            raise EngineDrainingError("the server is shutting down")
        request_id = request_id or uuid.uuid4().hex
        detok = IncrementalDetokenizer(self.tokenizer, request.stop) if self.tokenizer is not None else None
        stream = _Stream(asyncio.Queue(), detok, [], request)
        self._streams[request_id] = stream
        # Stop strings are checked here; the engine sees none (it has no tokenizer).
        self._unsent.add(request_id)
        self._submit_unsent()
        try:
            while not stream.finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    stream.finished = True
                    raise item
                yield self._postprocess(request_id, stream, item)
        finally:
            self._streams.pop(request_id, None)
            self._unsent.discard(request_id)
            if not stream.finished:
                self.abort(request_id)

    def _postprocess(self, request_id: str, stream: _Stream, out: RequestOutput) -> RequestOutput:
        stream.output_ids += out.new_token_ids
        if stream.detok is not None:
            for token in out.new_token_ids:
                stream.detok.add(token)
            if stream.detok.stopped_at is not None and not out.finished:
                out.finished, out.finish_reason = True, "stop"
                self.abort(request_id)
            out.new_text = stream.detok.delta(out.finished)
        stream.finished = out.finished
        return out

    def abort(self, request_id: str) -> None:
        if self.dead_reason is None:
            self._send(("abort", request_id))

    def drain(self, timeout_s: float) -> None:
        self.draining = True
        self._send(("drain", timeout_s))

    def shutdown_engine(self) -> None:
        self._send(("shutdown",))

    async def close(self) -> None:
        self._close_sockets()
        self._ctx.term()


def _bind_random(sock, address: str) -> str:
    """Bind `tcp://HOST:*` to a free port; returns the address to connect to."""
    host = address.rsplit(":", 1)[0]
    port = sock.bind_to_random_port(host)
    return f"{host}:{port}"
