"""The restart drill of the fault matrix (tests/launchers/fault_matrix.py; mpirun, Slurm, Ray): concurrent
streams through the official `openai` client, a rank killed with SIGKILL in the middle of
them, requests sent while the engine restarts, every answer compared with the same request
sent before the fault."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import openai

VOCAB = 301           # the tiny test models' vocabulary
STREAMS = 12          # engines built with max batch 8: the others wait when the rank dies
NEW_TOKENS = 24
RESTART_LIMIT_S = 60  # issue #11's target
KILL_AT_CHUNKS = 4    # kill once half the streams have this many chunks
MODEL = "tiny"


@dataclass
class Target:
    url: str
    kill: Callable[[int], None]  # SIGKILL rank N of the current rank job
    alive: Callable[[], bool]    # the server process still runs
    output: Callable[[], str]    # its log so far, for failure messages


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 20))] for _ in range(n)]


def sampling(i: int) -> dict:
    """Even requests greedy, odd ones seeded sampling."""
    return dict(temperature=0) if i % 2 == 0 else dict(temperature=0.8, top_p=0.95, seed=1000 + i)


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)


async def complete(api, prompt: list[int], i: int) -> str:
    res = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS,
                                       extra_body={"ignore_eos": True}, **sampling(i))
    assert res.usage.prompt_tokens == len(prompt) and res.usage.completion_tokens == NEW_TOKENS
    return res.choices[0].text


async def references(url: str, batch: list[list[int]]) -> list[str]:
    """The run without a fault: each request through the same server before the kill."""
    api = client(url)
    texts = await asyncio.gather(*(complete(api, p, i) for i, p in enumerate(batch)))
    await api.close()
    return list(texts)


async def stream(api, prompt: list[int], i: int, chunks: list[int], progress: asyncio.Event) -> str:
    chunk_stream = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}, **sampling(i))
    parts = []
    async for chunk in chunk_stream:
        if chunk.usage is not None:  # usage stays the original request's, restart or not
            assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (len(prompt), NEW_TOKENS)
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            chunks[i] += 1
            if sum(c >= KILL_AT_CHUNKS for c in chunks) >= len(chunks) // 2:
                progress.set()
    return "".join(parts)


async def health(http: httpx.AsyncClient, url: str) -> tuple[int | None, dict | None]:
    try:
        r = await http.get(f"{url}/health", timeout=2)
    except httpx.HTTPError:
        return None, None
    return r.status_code, (r.json() if r.content else None)


async def until_health(http, target: Target, status: int, timeout: float = 120,
                       restarting: bool = False) -> dict | None:
    """Until /health answers `status` (and, with `restarting`, says so: a launcher may take some
    seconds to end the rest of a job, when the engine is silent but not yet known dead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = await health(http, target.url)
        if code == status and (not restarting or (body or {}).get("status") == "restarting"):
            return body
        assert target.alive(), f"the server exited:\n{target.output()[-4000:]}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"/health never answered {status} within {timeout}s:\n{target.output()[-4000:]}")


async def kill_mid_streams(target: Target, victim: int, batch: list[list[int]], during: list[list[int]]):
    """Streams running, rank `victim` killed, requests sent while it restarts.
    Returns (stream texts, texts of the requests sent during the restart, restart seconds:
    from the kill to /health 200 again)."""
    api, chunks, progress = client(target.url), [0] * len(batch), asyncio.Event()
    streams = [asyncio.create_task(stream(api, p, i, chunks, progress)) for i, p in enumerate(batch)]
    await asyncio.wait_for(progress.wait(), 120)
    target.kill(victim)
    killed = time.monotonic()
    async with httpx.AsyncClient() as http:
        await until_health(http, target, 503, restarting=True)
        late = [asyncio.create_task(complete(api, p, len(batch) + i)) for i, p in enumerate(during)]
        await until_health(http, target, 200)
    restart_s = time.monotonic() - killed
    texts = await asyncio.wait_for(asyncio.gather(*streams), 300)
    late_texts = await asyncio.wait_for(asyncio.gather(*late), 300)
    await api.close()
    return list(texts), list(late_texts), restart_s


def run_drill(target: Target, victim: int, seed: int, streams: int = STREAMS) -> float:
    """The whole drill; asserts every answer, returns the restart time."""
    batch, during = prompts(streams, seed), prompts(2, seed + 100)
    want = asyncio.run(references(target.url, batch + during))
    got, late, restart_s = asyncio.run(kill_mid_streams(target, victim, batch, during))
    assert got == want[:streams], "a stream's answer changed across the restart"
    assert late == want[streams:], "a request sent during the restart got another answer"
    assert restart_s <= RESTART_LIMIT_S, restart_s
    return restart_s
