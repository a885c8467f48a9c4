"""The Supervisor's decisions, in milliseconds, against scripted rank jobs and a stand-in for
the EngineClient: a hang (no heartbeat) is killed and restarted, a job that exits 0 ended on
purpose, restarts are counted (failed starts too) and, when used up, every request fails;
a first start that fails is not retried, nor a restart that refused its input (exit 2);
a rank's ERROR line is what a CommandJob reports as the cause when nothing else is named."""

from __future__ import annotations

import asyncio
import time

import pytest

from dist_infer.serve.supervisor import CommandJob, FirstStartFailed, RestartPolicy, Supervisor, describe_exit
from dist_infer.workers.engine_loop import EngineAddresses


class Client:
    """What the Supervisor uses of the EngineClient; `heartbeat()` plays the engine's."""

    def __init__(self):
        self.last: float | None = None
        self.lost = 0
        self.died: str | None = None
        self.num_streams = 3

    def bind(self, host: str) -> EngineAddresses:
        self.last = None
        return EngineAddresses(f"tcp://{host}:1", f"tcp://{host}:2")

    def heartbeat(self) -> None:
        self.last = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.last is not None

    def seconds_since_heartbeat(self) -> float | None:
        return None if self.last is None else time.monotonic() - self.last

    def engine_lost(self) -> None:
        self.lost += 1

    def engine_died(self, reason: str) -> None:
        self.died = reason

    def shutdown_engine(self) -> None:
        pass


class Job:
    """A rank job that becomes ready (heartbeats) or exits, as scripted."""

    def __init__(self, client: Client, exit_code: int | None = None, ready: bool = True, beats: bool = True):
        self.client, self.killed = client, False
        self.ended = asyncio.get_running_loop().create_future()
        if ready:
            client.heartbeat()
        if exit_code is not None:
            self.ended.set_result(exit_code)
        self._beating = asyncio.create_task(self._beat()) if beats else None

    async def _beat(self) -> None:
        while not self.ended.done():
            self.client.heartbeat()
            await asyncio.sleep(0.02)

    def exit(self, code: int) -> None:
        self.ended.set_result(code)

    async def wait(self) -> int:
        return await self.ended

    def cause(self) -> str | None:
        return "rank 1 (on host, pid 7) has sent no heartbeat" if self.ended.done() else None

    async def kill(self) -> None:
        self.killed = True
        if not self.ended.done():
            self.ended.set_result(-9)


def supervisor(client: Client, jobs: list, restarts: int = 2, step_timeout: float = 0.3) -> Supervisor:
    started = []

    async def start_job(addresses):
        job = jobs[len(started)](client)
        started.append(job)
        return job

    sup = Supervisor(client, start_job, "127.0.0.1", RestartPolicy(restarts, step_timeout, 5.0, "ENGINE"))
    sup.started = started
    return sup


def test_a_hang_is_killed_and_restarted_then_an_exit_0_ends_it():
    async def scenario():
        client = Client()
        sup = supervisor(client, [lambda c: Job(c, beats=False), lambda c: Job(c)])
        await sup.start()  # ready, then silent: a hang
        verdict = asyncio.create_task(sup.run())
        while len(sup.started) < 2:
            await asyncio.sleep(0.01)
        assert sup.started[0].killed and client.lost == 1
        sup.started[1].exit(0)  # a drain ended the new job
        return await asyncio.wait_for(verdict, 5), sup

    code, sup = asyncio.run(scenario())
    assert code == 0 and sup.used == 1 and len(sup.restart_times) == 1


def test_failed_restarts_count_and_when_used_up_every_request_fails():
    async def scenario():
        client = Client()
        # exit 1 before ready: a crash while loading (perhaps a node's hiccup), worth another try
        sup = supervisor(client, [lambda c: Job(c), lambda c: Job(c, exit_code=1, ready=False),
                                  lambda c: Job(c, exit_code=1, ready=False)])
        await sup.start()
        verdict = asyncio.create_task(sup.run())
        sup.started[0].exit(3)
        return await asyncio.wait_for(verdict, 5), sup, client

    code, sup, client = asyncio.run(scenario())
    assert code == 1 and sup.used == 2 and len(sup.started) == 3
    assert "--restart 2 is used up" in client.died and "before its engine was ready" in client.died


def test_a_first_start_that_fails_is_not_retried():
    async def scenario():
        sup = supervisor(Client(), [lambda c: Job(c, exit_code=2, ready=False)])
        with pytest.raises(FirstStartFailed) as failed:
            await sup.start()
        return failed.value, sup

    failed, sup = asyncio.run(scenario())
    assert failed.code == 2 and len(sup.started) == 1 and "exited with code 2" in str(failed)


def test_exit_descriptions_name_the_signal_and_the_cause():
    assert describe_exit(-9, None) == "the rank job was killed by SIGKILL"
    assert describe_exit(3, "step watchdog: rank 2 (on n1, pid 5) has sent no heartbeat") == \
        "the rank job exited with code 3 (step watchdog: rank 2 (on n1, pid 5) has sent no heartbeat)"


class BadInputJob(Job):
    """A restart that loads a corrupt engine file: the ranks log why and exit 2 before ready."""

    def __init__(self, client: Client):
        super().__init__(client, exit_code=2, ready=False)

    def cause(self) -> str | None:
        return "engine rank 1: /e/rank1/weights.safetensors is corrupt (sha256 ...). Rebuild the engine"


def test_a_restart_that_refuses_its_input_is_not_retried():
    """Exit 2 before the engine is ready (a corrupt engine file found at restart): every further
    start would read the same file, so the supervisor stops with restarts left, fails the waiting
    requests with the job's own message (the file and the fix) and returns 2."""
    async def scenario():
        client = Client()
        sup = supervisor(client, [lambda c: Job(c), BadInputJob, lambda c: Job(c)], restarts=5)
        await sup.start()
        verdict = asyncio.create_task(sup.run())
        sup.started[0].exit(-9)
        return await asyncio.wait_for(verdict, 5), sup, client

    code, sup, client = asyncio.run(scenario())
    assert code == 2 and sup.used == 1 and len(sup.started) == 2
    assert client.died.startswith("the engine cannot restart: the rank job exited with code 2")
    assert "rank1/weights.safetensors is corrupt" in client.died and "Rebuild the engine" in client.died


def test_command_job_names_the_first_error_line_when_nothing_else_is_named():
    """A real child process: its first "[rank R] TIME ERROR LOGGER: MESSAGE" line is the cause
    (without the prefix); a launcher's line naming what died wins over it."""
    async def job_cause(script: str) -> tuple[int, str | None]:
        job = await CommandJob.start(["sh", "-c", script])
        return await job.wait(), job.cause()

    error = "echo '[rank 0] 01:02:03 ERROR dist_infer.cli: engine rank 1: F is corrupt. Rebuild the engine'"
    assert asyncio.run(job_cause(f"echo '[rank 0] 01:02:03 INFO x: fine'; {error}; exit 2")) == \
        (2, "engine rank 1: F is corrupt. Rebuild the engine")
    killed = "echo 'srun: error: n1: task 3: Killed'"
    assert asyncio.run(job_cause(f"{error}; {killed}; exit 137"))[1] == "srun: error: n1: task 3: Killed"


def test_command_job_joins_a_wrapped_cause_but_not_mpiruns_rule():
    """mpirun wraps its sentence at 72 columns (the next line continues it); the rule of dashes
    that closes its box is not part of it."""
    async def job_cause(script: str) -> str | None:
        job = await CommandJob.start(["sh", "-c", script])
        await job.wait()
        return job.cause()

    wrapped = "echo 'prterun noticed that process rank 1 with PID 7 on node n0 exited on'; echo 'signal 9 (Killed).'"
    assert asyncio.run(job_cause(f"{wrapped}; exit 137")) == \
        "prterun noticed that process rank 1 with PID 7 on node n0 exited on signal 9 (Killed)."
    unended = "echo '[rank 2] 01:02:03 ERROR dist_infer.workers.watchdog: rank 1 (on n0, pid 7) died: its lifeline'"
    assert asyncio.run(job_cause(f"{unended}; echo '-----------'; exit 14")) == \
        "rank 1 (on n0, pid 7) died: its lifeline"
