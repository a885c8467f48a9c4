"""Fuzz a real `dist-infer serve` from its own OpenAPI schema with schemathesis.

Every operation of /openapi.json gets requests that fit the schema (positive) and
requests that break it (negative: wrong types, missing fields, out-of-range
values), until --requests have been sent. Passes when no response is a 5xx and
the server is still healthy at the end. By default it serves a random-weight
tiny Llama with the embedded SmolLM2 tokenizer (built here in seconds).

    .venv/bin/python scripts/fuzz_http.py --requests 10000
    .venv/bin/python scripts/fuzz_http.py --url http://127.0.0.1:8000   # an already running server

tests/serve/test_fuzz_http.py runs `fuzz()` with a few requests per operation in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny"


@dataclass
class FuzzResult:
    statuses: Counter = field(default_factory=Counter)   # HTTP status -> count
    per_operation: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # "METHOD PATH -> 5xx: body" (a few kept)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def num_5xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def fuzz(base_url: str, examples: int, seed: int = 0, result: FuzzResult | None = None) -> FuzzResult:
    """One round: each operation, in each generation mode, gets up to `examples` requests."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as fixed_seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    result = result or FuzzResult()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    for operation in (r.ok() for r in schema.get_all_operations()):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @fixed_seed(seed)  # reproducible; each round a different stream
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case):
                _send_one(case, base_url, operation.label, result)

            try:
                send()
            except Unsatisfiable:  # nothing to break: an operation without parameters has no negative cases
                pass
    return result


def _send_one(case, base_url: str, label: str, result: FuzzResult) -> None:
    _aim_at_the_model(case)
    try:
        response = case.call(base_url=base_url, timeout=60)
    except requests.RequestException as exc:  # e.g. a header value requests itself refuses to send
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            raise AssertionError(f"{label}: the server did not answer: {exc}") from exc
        return
    result.statuses[response.status_code] += 1
    result.per_operation[label] += 1
    if response.status_code >= 500 and len(result.server_errors) < 20:
        result.server_errors.append(f"{label} -> {response.status_code}: {response.text[:300]} "
                                    f"(body sent: {str(case.body)[:300]})")


def _aim_at_the_model(case) -> None:
    """Most random model names get a 404 before anything else is looked at: name the served
    model in 3 requests of 4, so that the rest of the body reaches validation and the engine."""
    if random.random() < 0.75:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL_NAME
        if case.path_parameters and "name" in case.path_parameters:
            case.path_parameters["name"] = MODEL_NAME


# ---- a server to fuzz ------------------------------------------------------------------------------------


def build_tiny_engine(directory: Path) -> Path:
    """A random-weight tiny Llama with SmolLM2's tokenizer: text prompts and chat work."""
    from dist_infer.config import BuildConfig
    from dist_infer.engine.random_engine import build_random_engine

    return build_random_engine("tiny-llama", directory / "engine", build=BuildConfig(max_batch_size=8, max_seq_len=128))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: Path, port: int, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dist_infer", "serve", "--engine", str(engine), "--port", str(port),
           "--served-model-name", MODEL_NAME]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if healthy(url):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the server was not healthy within {timeout} s")


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="stop after at least this many requests")
    p.add_argument("--examples", type=int, default=200, help="requests per operation and mode in one round")
    p.add_argument("--url", help="fuzz this running server instead of starting one")
    p.add_argument("--out", default=str(REPO / "out" / "fuzz_http.json"), help="where the counts are written")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = None, args.url
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(build_tiny_engine(Path(tmp)), port, Path(tmp) / "server.log")
        try:
            if proc is not None:
                wait_healthy(url, proc)
            result, started, seed = FuzzResult(), time.monotonic(), 0
            while result.total < args.requests:
                fuzz(url, args.examples, seed, result)
                seed += 1
                print(f"round {seed}: {result.total} requests, {result.num_5xx} x 5xx", flush=True)
            alive = healthy(url)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
        summary = {"requests": result.total, "5xx": result.num_5xx, "healthy_after": alive, "rounds": seed,
                   "seconds": round(time.monotonic() - started, 1), "statuses": dict(sorted(result.statuses.items())),
                   "per_operation": dict(result.per_operation), "server_errors": result.server_errors}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if result.num_5xx == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
