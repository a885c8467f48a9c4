"""Serving a TP=2 x PP=2 tiny Llama (with SmolLM2's tokenizer, so text works)
whose KV pool is too small for its traffic: concurrent requests never cross
streams, preemption still gives the right tokens, prefix-cache hits equal
misses, a disconnect frees its request; then a killed rank and an idle server."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from conftest import hf_greedy, run_cli
from .conftest import VOCAB
from .server import Server

pytestmark = pytest.mark.timeout(900)
POOL = 40  # blocks of 4 tokens: room for ~2 of the 32 requests below at once


@pytest.fixture(scope="module")
def server(tiny):
    engine, _ = tiny
    srv = Server(engine(2, 2), 4, "--served-model-name", "tiny", "--num-kv-blocks", str(POOL),
                 "--max-num-batched-tokens", "32").wait_healthy()
    yield srv
    srv.kill()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_32_concurrent_requests_under_preemption_get_their_own_answers(server, tiny, tokenizer):
    _, model = tiny
    prompts = _prompts(32)
    lengths = [4 + (i * 7) % 40 for i in range(32)]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)

    async def one(i):
        kw = dict(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                  extra_body={"ignore_eos": True})
        if i % 2:
            chunks = await client.completions.create(**kw, stream=True)
            return "".join([c.choices[0].text async for c in chunks if c.choices])
        return (await client.completions.create(**kw)).choices[0].text

    async def all_at_once():
        return await asyncio.gather(*(one(i) for i in range(32)))

    got = asyncio.run(all_at_once())
    want = [_text(tokenizer, hf_greedy(model, p, n)) for p, n in zip(prompts, lengths)]
    assert got == want
    assert server.metric("dist_infer:num_preemptions") > 0  # the pool was too small: preemption happened
    assert server.health() == 200


def test_prefix_cache_hits_equal_misses(server, tiny, tokenizer):
    _, model = tiny
    shared = _prompts(1, seed=5)[0][:8] * 3  # 24 tokens = 6 full blocks
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    before = server.metric("dist_infer:prefix_cache_hit_rate")
    outs = []
    for suffix in ([7, 8, 9], [10, 11], [7, 8, 9]):
        res = client.completions.create(model="tiny", prompt=shared + suffix, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        outs.append(res.choices[0].text)
    time.sleep(1.5)  # engine gauges arrive with its heartbeats (every 0.5 s)
    assert server.metric("dist_infer:prefix_cache_hit_rate") > before
    refs = [_text(tokenizer, hf_greedy(model, shared + s, 12)) for s in ([7, 8, 9], [10, 11])]
    assert outs == [refs[0], refs[1], refs[0]]


def test_prompt_logprobs_across_chunks_and_stages(server, tiny):
    """echo + logprobs on a 60-token prompt: prefilled in two chunks (budget 32), sampled on
    the last pipeline stage and sent to rank 0; equal to transformers' log-softmax."""
    import torch

    _, model = tiny
    prompt = _prompts(1, seed=9)[0] * 3
    prompt = prompt[:60] if len(prompt) >= 60 else (prompt * 4)[:60]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 0,
                                                        "echo": True, "logprobs": 2}, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    want = [ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == 60
    assert max(abs(g - w) for g, w in zip(lp["token_logprobs"][1:], want)) < 1e-3
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"][1:])  # keyed by text: two ids may share one


def test_disconnect_frees_the_request(server):
    before = server.metric("dist_infer:generation_tokens_total")
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 120, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and (server.metric("dist_infer:num_requests_running") or
                                           server.metric("dist_infer:kv_cache_usage_perc")):
        time.sleep(0.2)
    assert server.metric("dist_infer:num_requests_running") == 0
    assert server.metric("dist_infer:kv_cache_usage_perc") == 0
    time.sleep(1)
    generated = server.metric("dist_infer:generation_tokens_total") - before
    assert generated < 100, generated  # stopped long before its 120 tokens


def test_killed_rank_turns_health_503_and_ends_the_job(tiny):
    engine, _ = tiny
    srv = Server(engine(2, 1), 2, "--served-model-name", "tiny").wait_healthy()
    try:
        victim = next(p for p in srv.pids if _is_rank(p, 1))
        killed = time.monotonic()
        import os

        os.kill(victim, signal.SIGKILL)
        saw_503 = None
        while time.monotonic() - killed < 5 and saw_503 is None:
            if srv.health() == 503:
                saw_503 = time.monotonic() - killed
            time.sleep(0.1)
        assert saw_503 is not None, f"/health never answered 503 within 5 s:\n{srv.output()}"
        code = srv.proc.wait(timeout=15)
        took = time.monotonic() - killed
        assert code != 0 and took < 10, (code, took)
        assert "rank 1" in srv.output()
        assert srv.orphans() == []
    finally:
        srv.kill()


def _is_rank(pid: int, rank: int) -> bool:
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return False
    return f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and b"dist_infer" in open(f"/proc/{pid}/cmdline", "rb").read()


def test_idle_server_outlives_the_collective_timeout(tiny):
    """gloo ranks with a 4 s collective timeout and a 3 s step watchdog, idle for 9 s: the
    empty keepalive steps keep them inside the collective timeout, the watchdog's beacons
    flow while they wait, and the next request is answered."""
    from .server import free_port

    engine, _ = tiny
    env = {"DIST_INFER_COMM": "gloo", "DIST_INFER_GLOO_TIMEOUT": "4", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    srv = Server(engine(2, 1), 2, "--served-model-name", "tiny", "--keepalive", "1", "--step-timeout", "3",
                 env=env).wait_healthy()
    try:
        time.sleep(9)
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200, srv.output()
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        srv.kill()


def test_serve_through_a_cluster_file(tiny, tmp_path):
    """`dist-infer launch --cluster FILE -- serve ...` (launcher: mpirun) serves, and a
    SIGTERM to rank 0 drains the whole job to exit 0."""
    import subprocess
    import sys

    from conftest import REPO
    from .server import descendants, free_port

    engine, _ = tiny
    port = free_port()
    cluster = tmp_path / "local.yaml"
    cluster.write_text(f"""
launcher: mpirun
engine: {engine(2, 1)}
launch_dir: {tmp_path}
nodes: [{{host: localhost, slots: 2}}]
mpirun: {{extra_args: [--oversubscribe]}}
env: {{OMP_NUM_THREADS: "1"}}
""")
    srv = Server.__new__(Server)  # reuse the helpers on a job started another way
    srv.port, srv.url, srv.pids = port, f"http://127.0.0.1:{port}", []
    srv.log_path = tmp_path / "launch.log"
    srv.log = open(srv.log_path, "w")
    srv.proc = subprocess.Popen([sys.executable, "-m", "dist_infer", "launch", "--cluster", str(cluster), "--",
                                 "serve", "--port", str(port), "--served-model-name", "tiny"],
                                stdout=srv.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        srv.wait_healthy()
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        _, rank0 = srv.frontend_and_rank0()
        assert srv.stop(signal.SIGTERM, 60, pid=rank0) == 0, srv.output()
        assert srv.orphans() == [] and not descendants(srv.proc.pid)
    finally:
        srv.kill()


@pytest.mark.parametrize("args,words", [(["--port", "0"], "--port"), (["--max-queue", "-1"], "--max-queue"),
                                        (["--num-kv-blocks", "3"], "--num-kv-blocks"),
                                        (["--max-num-batched-tokens", "2"], "max batch size")])
def test_bad_serve_knobs_refused_before_loading(tiny, args, words):
    engine, _ = tiny
    proc = run_cli("serve", "--engine", str(engine(2, 1)), *args, world=2, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr
