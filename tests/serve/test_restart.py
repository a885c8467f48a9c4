"""`dist-infer serve --restart 1 --launcher-cmd 'mpirun -n 2'`: the HTTP front-end and its
supervisor run the rank job (real mpirun, TP=2 tiny Llama) as a child. kill -9 of rank 0 in
the middle of concurrent streams (the official `openai` client): every stream (greedy and
seeded) ends with the answer of the same request without a fault, requests sent during the
restart are answered, the restart takes at most 60 s. Then kill -9 of the last rank finds no
restart left: the stream in flight gets an error and the server exits 1.
(The last rank's drill runs under Slurm: tests/launchers/test_slurm_restart.py.)"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import time

import httpx
import openai
import pytest

from conftest import _alive, mpirun_prefix
from . import drill
from .server import Server, descendants

pytestmark = pytest.mark.timeout(600)
RESTARTS = 1


@pytest.fixture(scope="module")
def supervised(tiny):
    engine, _ = tiny
    srv = Server(engine(2, 1), 1, "--served-model-name", "tiny", "--restart", str(RESTARTS), "--launcher-cmd",
                 shlex.join(mpirun_prefix(2)))
    yield srv.wait_healthy()
    srv.kill()


def target(srv: Server) -> drill.Target:
    return drill.Target(srv.url, lambda rank: os.kill(srv.rank_pid(rank), signal.SIGKILL),
                        lambda: srv.proc.poll() is None, srv.output)


def test_killed_rank0_restarts_and_every_stream_completes(supervised):
    restart_s = drill.run_drill(target(supervised), victim=0, seed=0)
    log = supervised.output()
    assert "process rank 0 with PID" in log and "restarting it from" in log, log[-3000:]
    print(f"mpirun, kill -9 of rank 0 mid {drill.STREAMS} streams: healthy again after {restart_s:.1f} s")


def test_no_restart_left_fails_the_streams_and_exits_1(supervised):
    """Kill the last rank until no restart is left (the test above used one): the last kill fails
    the stream in flight with an error event, and the server exits 1, leaving no process behind."""
    async def kill_until_it_fails() -> tuple[Exception, float, list[int]]:
        async with httpx.AsyncClient() as http:
            while True:
                await drill.until_health(http, target(supervised), 200)
                job = descendants(supervised.proc.pid)
                client = drill.client(supervised.url)
                stream = await client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=120,
                                                         stream=True, extra_body={"ignore_eos": True})
                await anext(aiter(stream))
                os.kill(supervised.rank_pid(1), signal.SIGKILL)
                killed = time.monotonic()
                try:
                    async for _ in stream:  # resumed after a restart; an error event once none is left
                        pass
                except openai.APIError as exc:
                    return exc, killed, job
                finally:
                    await client.close()

    error, killed, job = asyncio.run(kill_until_it_fails())
    code = supervised.proc.wait(timeout=60)
    took = time.monotonic() - killed
    log = supervised.output()
    assert code == 1, log[-3000:]
    assert f"--restart {RESTARTS} is used up" in str(error), error
    assert f"no restart left (--restart {RESTARTS}, all used)" in log, log[-3000:]
    assert log.count("restarting it from") == RESTARTS
    assert took < 30, took
    assert [p for p in job if _alive(p)] == []
    print(f"restarts used up: exit 1 {took:.1f} s after the last kill")
