"""The soak that scripts/soak.py (10 minutes, SmolLM2) and tests/serve/test_soak.py (60 s in CI)
share: many concurrent streams against a running `dist-infer serve`, every answer checked.

1. the reference: each prompt once, alone (greedy), through the same server;
2. a warm-up of the same load (allocators and caches reach their working size there), then the
   baseline: RSS, open file descriptors and threads of every server process;
3. the soak: `streams` concurrent streaming clients (the official `openai` client), each asking
   the prompts round-robin for `duration` seconds; every answer must equal its reference (no
   lost, cut or crossed responses);
4. after the load drains: the same resources against the baseline (growth is a leak), KV blocks
   in use (must be 0), and p99 latency per window (a drift is a failure: P99_DRIFT).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import httpx
import psutil
from openai import AsyncOpenAI

MODEL = "soak"
# A text prompt goes through the chat route (the model's template); token ids through completions.
Prompt = tuple[str | list[int], int]  # (prompt, max_tokens)
GROWTH_LIMITS = {"rss_mb": 64.0, "fds": 8, "threads": 4}  # per process, after the load drains
# p99 "stable": no window's p99 above this multiple of the median window's (+ slack for a
# loaded CI machine's scheduling noise on short windows).
P99_DRIFT, P99_SLACK_S = 2.0, 0.5


@dataclass
class Soak:
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds)
    requests: int = 0
    wrong: list[str] = field(default_factory=list)


async def ask(client: AsyncOpenAI, prompt: str | list[int], max_tokens: int) -> str:
    if isinstance(prompt, str):
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=max_tokens, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    return "".join([c.choices[0].text async for c in stream if c.choices])


def client_for(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=300, max_retries=0)


def _key(prompt: str | list[int]) -> str | tuple[int, ...]:
    return prompt if isinstance(prompt, str) else tuple(prompt)


async def reference(url: str, prompts: list[Prompt]) -> dict:
    """Each prompt alone, before any load: what every answer under load must equal."""
    client = client_for(url)
    answers = {_key(p): await ask(client, p, n) for p, n in prompts}
    await client.close()
    return answers


async def stream_worker(client: AsyncOpenAI, index: int, until: float, prompts: list[Prompt], expected: dict,
                        soak: Soak) -> None:
    turn = index
    while time.monotonic() < until:
        prompt, max_tokens = prompts[turn % len(prompts)]
        started = time.monotonic()
        text = await ask(client, prompt, max_tokens)
        soak.latencies.append((time.monotonic(), time.monotonic() - started))
        soak.requests += 1
        if text != expected[_key(prompt)]:
            soak.wrong.append(f"stream {index}: {str(prompt)[:40]!r} -> {text[:80]!r}, "
                              f"expected {expected[_key(prompt)][:80]!r}")
        turn += 1


async def soak_run(url: str, streams: int, duration: float, prompts: list[Prompt], expected: dict
                   ) -> tuple[Soak, float]:
    soak, start = Soak(), time.monotonic()
    client = client_for(url)
    await asyncio.gather(*(stream_worker(client, i, start + duration, prompts, expected, soak)
                           for i in range(streams)))
    await client.close()
    return soak, start


def server_processes(pid: int) -> list[psutil.Process]:
    """The Python processes below the server's launcher (ranks, front-end)."""
    return [p for p in psutil.Process(pid).children(recursive=True) if "python" in p.name().lower()]


def resources(procs: list[psutil.Process]) -> dict[int, dict[str, float]]:
    return {p.pid: {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads()}
            for p in procs if p.is_running()}


def kv_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("dist_infer:kv_cache_usage_perc"):
            return float(line.split()[-1])
    return float("nan")


def growth(before: dict, after: dict) -> list[str]:
    """Processes whose RSS, fds or threads grew past GROWTH_LIMITS (or that are gone)."""
    problems = [f"pid {pid}: gone after the soak" for pid in before if pid not in after]
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


def p99_drift(p99: list[float]) -> list[str]:
    """A window whose p99 is over P99_DRIFT x the median window's (+ P99_SLACK_S): latency drifted."""
    if len(p99) < 2:
        return ["fewer than 2 latency windows: make the run longer or the window shorter"]
    bound = P99_DRIFT * statistics.median(p99) + P99_SLACK_S
    return [f"window {i}: p99 {x:.2f} s over the bound {bound:.2f} s" for i, x in enumerate(p99) if x > bound]


def run_soak(url: str, server_pid: int, prompts: list[Prompt], streams: int, warmup: float, duration: float,
             window: float, settle_s: float = 2.0) -> dict:
    """The whole soak against a healthy server; a summary with `problems` (empty: every check held)."""
    expected = asyncio.run(reference(url, prompts))
    warm, _ = asyncio.run(soak_run(url, streams, warmup, prompts, expected))
    time.sleep(settle_s)
    before = resources(server_processes(server_pid))
    soak, start = asyncio.run(soak_run(url, streams, duration, prompts, expected))
    time.sleep(settle_s)  # the last requests' blocks are freed with the next plan
    after, kv_after = resources(server_processes(server_pid)), kv_usage(url)
    p99 = p99_windows(soak.latencies, start, window)
    problems = (warm.wrong[:5] + soak.wrong[:20] + growth(before, after) + p99_drift(p99)
                + ([f"KV blocks in use after the drain: {kv_after}"] if not kv_after == 0 else [])
                + ([] if soak.requests else ["no request finished"]))
    return dict(streams=streams, warmup_s=warmup, warmup_requests=warm.requests, duration_s=duration,
                requests=soak.requests, wrong=len(soak.wrong) + len(warm.wrong), kv_usage_after=kv_after,
                p99_latency_s_per_window=[round(x, 3) for x in p99],
                p50_latency_s=round(statistics.median(s for _, s in soak.latencies), 3) if soak.latencies else None,
                resources_before=before, resources_after=after, problems=problems)
