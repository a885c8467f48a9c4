"""What one client can take from the HTTP front-end: limits on body size, on the time
to send a request, and on open connections.

Without them a single client can take the server down: a 10 GB body is read into
memory, a slow-loris client (a few header bytes every few seconds) holds its
connection forever (uvicorn's h11 protocol has no timeout before the first request
arrives), and thousands of idle sockets exhaust the process's file descriptors.

    DIST_INFER_HTTP_MAX_BODY_BYTES   larger bodies get 413            (default 16 MiB)
    DIST_INFER_HTTP_READ_TIMEOUT_S   a request's head and body must   (default 30 s)
                                     arrive within this, else 408 and the connection closes
    DIST_INFER_HTTP_MAX_CONNECTIONS  beyond this, new requests get 503 (default 8192,
                                     capped by the file-descriptor limit)

Idle kept-alive connections close after uvicorn's timeout_keep_alive (5 s).
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dist_infer.serve")

FDS_KEPT_FOR_THE_PROCESS = 256  # engine sockets, log files, the tokenizer: never given to clients


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 16 * 2**20
    read_timeout_s: float = 30.0
    max_connections: int = 8192
    keep_alive_s: int = 5

    @classmethod
    def from_env(cls) -> HttpLimits:
        env, default = os.environ, cls()
        return cls(int(env.get("DIST_INFER_HTTP_MAX_BODY_BYTES", default.max_body_bytes)),
                   float(env.get("DIST_INFER_HTTP_READ_TIMEOUT_S", default.read_timeout_s)),
                   int(env.get("DIST_INFER_HTTP_MAX_CONNECTIONS", default.max_connections)))

    def connections_that_fit(self) -> int:
        """max_connections, lowered to what the file-descriptor limit allows (raised to its hard cap first)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.max_connections + FDS_KEPT_FOR_THE_PROCESS
        if soft != resource.RLIM_INFINITY and soft < wanted:
            soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        fit = self.max_connections if soft == resource.RLIM_INFINITY else soft - FDS_KEPT_FOR_THE_PROCESS
        if fit < self.max_connections:
            log.warning("the file-descriptor limit (%d) allows %d connections, not %d: raise `ulimit -n`",
                        soft, fit, self.max_connections)
        return max(fit, 16)


# ---- body size ------------------------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: a declared Content-Length over the limit gets 413 before any byte is
    read; a chunked body is read up to the limit (the routes parse it whole anyway) and
    refused with 413 once it passes it. `error_body(status, message)` gives the JSON body."""

    def __init__(self, app, max_bytes: int, error_body):
        self.app, self.max_bytes, self.error_body = app, max_bytes, error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, f"the request body is {int(declared)} bytes, over the "
                                            f"{self.max_bytes}-byte limit; send a smaller request")
        first = await self._read_body(receive)
        if first is None:
            return await self._refuse(send, f"the request body passed the {self.max_bytes}-byte limit; "
                                            "send a smaller request")
        return await self.app(scope, self._replay(first, receive), send)

    async def _read_body(self, receive) -> dict | None:
        """The whole body as one message (or the disconnect that came instead); None past the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body"):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    @staticmethod
    def _replay(first: dict, receive):
        """`first`, then the client's later messages (a disconnect, while an answer streams)."""
        pending = [first]

        async def replayed():
            return pending.pop() if pending else await receive()

        return replayed

    async def _refuse(self, send, message: str) -> None:
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": self.error_body(413, message)})


# ---- time to send a request -------------------------------------------------------------------------------

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request, head and body:
    it starts when the connection opens (or the previous response ends) and is not
    reset by each byte, so a slow-loris client is cut off like a silent one."""

    read_timeout_s = HttpLimits.read_timeout_s

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._arm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_deadline()  # the next request on a kept-alive connection gets its own

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _cancel_deadline(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return  # the request arrived whole: a long answer has no deadline here
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(TIMEOUT_RESPONSE)  # no response under way: say why we hang up
        log.debug("closing a connection that did not send its request within %.0f s", self.read_timeout_s)
        self.transport.close()


def deadline_protocol(read_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with this deadline."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_timeout_s": read_timeout_s})
