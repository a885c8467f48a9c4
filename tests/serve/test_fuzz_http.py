"""A real `dist-infer serve` (one rank, a random-weight tiny Llama with SmolLM2's
tokenizer) against hostile clients, over real sockets:

- schemathesis requests from the server's own OpenAPI schema (a bounded number
  here; scripts/fuzz_http.py sends >= 10,000): never a 5xx;
- an oversized body (declared, or chunked without a length): 413, nothing read;
- slow-loris and silent clients: cut off after the read timeout (408);
- thousands of idle connections: the server still answers, and sheds them;
and after all of it /health is 200."""

from __future__ import annotations

import resource
import socket
import sys
import time

import httpx
import openai
import pytest

from conftest import REPO
from .server import Server

sys.path.insert(0, str(REPO / "scripts"))
import fuzz_http  # noqa: E402  (scripts/fuzz_http.py: the same fuzzer as the 10,000-request run)

pytestmark = pytest.mark.timeout(300)
READ_TIMEOUT_S = 2.0
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    engine = fuzz_http.build_tiny_engine(tmp_path_factory.mktemp("fuzz"))
    srv = Server(engine, 1, "--served-model-name", fuzz_http.MODEL_NAME,
                 env={"DIST_INFER_HTTP_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
                      "DIST_INFER_HTTP_MAX_BODY_BYTES": str(MAX_BODY)}).wait_healthy()
    yield srv
    assert srv.health() == 200, srv.output()  # everything below left it healthy
    srv.kill()


def test_schemathesis_finds_no_5xx(server):
    result = fuzz_http.fuzz(server.url, examples=8)
    assert result.total > 60 and result.num_5xx == 0, result.server_errors
    assert result.statuses[200] > 0 and server.health() == 200


def test_openai_client_still_served(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model=fuzz_http.MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def _raw(port: int, data: bytes, read: bool = True, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_all(s) if read else b""


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_oversized_body_declared_gets_413_without_reading_it(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 * 2**30}\r\n\r\n").encode()
    started = time.monotonic()
    reply = _raw(server.port, head + b'{"model": "tiny", "prompt": "')  # and never the other 10 GB
    assert reply.startswith(b"HTTP/1.1 413") and b"over the 262144-byte limit" in reply, reply[:300]
    assert time.monotonic() - started < READ_TIMEOUT_S  # answered at once, not after a timeout


def test_oversized_chunked_body_gets_413(server):
    r = httpx.post(f"{server.url}/v1/completions", content=iter([b'{"prompt": "' + b"a" * 65536] * 8),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_slow_loris_and_silent_clients_are_cut_off(server):
    silent = socket.create_connection(("127.0.0.1", server.port))
    slow = socket.create_connection(("127.0.0.1", server.port))
    started, head = time.monotonic(), b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
    slow.settimeout(READ_TIMEOUT_S * 4)
    with pytest.raises(OSError):  # the server hangs up while we are still "typing" the header
        for byte in head:
            slow.sendall(bytes([byte]))
            time.sleep(0.1)
    silent.settimeout(READ_TIMEOUT_S * 4)
    assert _read_all(silent).startswith(b"HTTP/1.1 408")
    assert READ_TIMEOUT_S - 0.5 < time.monotonic() - started < READ_TIMEOUT_S * 3
    assert server.health() == 200


def test_thousands_of_idle_connections(server):
    count = _fd_room(3000)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(count)]
    try:
        assert server.health() == 200  # still answering with them all open
        time.sleep(READ_TIMEOUT_S + 1)
        for s in idle[::100]:  # and it sheds them once their read timeout passes
            assert _read_all(s).startswith(b"HTTP/1.1 408")
    finally:
        for s in idle:
            s.close()
    assert server.health() == 200


def _fd_room(wanted: int) -> int:
    """Raise this process's descriptor limit for the client sockets; fewer if the hard cap is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + 200 if hard == resource.RLIM_INFINITY else min(wanted + 200, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return min(wanted, target - 200)
