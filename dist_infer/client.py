"""The one engine client: async, over rank 0's engine sockets. The HTTP
front-end and `dist_infer.LLM` both use it (one client, two faces).

Detokenization and stop strings run here, in the caller's process, not on
the thread that drives steps: a stop string ends the stream at once and
aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq
import zmq.asyncio

from dist_infer.errors import DistInferError, RequestError
from dist_infer.scheduler import IncrementalDetokenizer
from dist_infer.workers.engine_loop import EngineAddresses
from dist_infer.workers.llm_engine import EngineStats, Request, RequestOutput


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
    finished: bool = False


class EngineClient:
    def __init__(self, addresses: EngineAddresses, tokenizer=None, heartbeat_timeout_s: float = 5.0):
        self.addresses = addresses
        self.tokenizer = tokenizer
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stats: EngineStats | None = None
        self.draining = False
        self.dead_reason: str | None = None
        self._last_heartbeat: float | None = None
        self._streams: dict[str, _Stream] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self.addresses.requests)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.connect(self.addresses.outputs)
        self._task = asyncio.create_task(self._pump())

    async def wait_ready(self, timeout_s: float, alive=lambda: True) -> None:
        """Until the first heartbeat; `alive()` false (the engine process ended) gives up early."""
        deadline = time.monotonic() + timeout_s
        while self._last_heartbeat is None:
            if not alive() or time.monotonic() > deadline:
                raise EngineDeadError("the engine did not start (see its log above).")
            await asyncio.sleep(0.05)

    @property
    def healthy(self) -> bool:
        return (self.dead_reason is None and self._last_heartbeat is not None
                and time.monotonic() - self._last_heartbeat < self.heartbeat_timeout_s)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def _pump(self) -> None:
        # A missing heartbeat makes the client unhealthy (/health 503, new requests 503) but
        # fails nothing: a long step is not a death. The process watching rank 0 calls
        # `engine_died` when the engine is really gone.
        while True:
            self._dispatch(pickle.loads(await self._pull.recv()))

    def engine_died(self, reason: str) -> None:
        if self.dead_reason is None:
            self._fail_all(reason)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "heartbeat":
            self.stats, self.draining, self._last_heartbeat = message[1], message[2], time.monotonic()
        elif kind == "rejected":
            stream = self._streams.get(message[1])
            if stream is not None:
                error = EngineDrainingError if "shutting down" in message[2] else RequestError
                stream.queue.put_nowait(error(message[2]))
        elif kind == "outputs":
            for out in message[1]:
                if (stream := self._streams.get(out.request_id)) is not None:
                    stream.queue.put_nowait(out)

    def _fail_all(self, reason: str) -> None:
        self.dead_reason = reason
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(reason))

    def _send(self, message: tuple) -> None:
        self._push.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), zmq.NOBLOCK)

    async def generate(self, request: Request, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's deltas (text filled in here). Leaving the iterator
        early (a client disconnect) aborts the request in the engine."""
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        if self.draining:
            raise EngineDrainingError("the server is shutting down")
        request_id = request_id or uuid.uuid4().hex
        detok = IncrementalDetokenizer(self.tokenizer, request.stop) if self.tokenizer is not None else None
        stream = _Stream(asyncio.Queue(), detok, [])
        self._streams[request_id] = stream
        # Stop strings are checked here; the engine sees none (it has no tokenizer).
        self._send(("add", request_id, Request(request.prompt_ids, request.max_new_tokens, request.sampling, (),
                                               request.ignore_eos)))
        try:
            while not stream.finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    stream.finished = True
                    raise item
                yield self._postprocess(request_id, stream, item)
        finally:
            self._streams.pop(request_id, None)
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
        if self._task is not None:
            self._task.cancel()
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()
