"""Supervised restart (`dist-infer serve --restart N`): the HTTP front-end outlives the rank job.

    dist-infer serve --restart N ...     this process: HTTP front-end + Supervisor
        └─ rank job (mpirun | srun | Ray actors | one rank): `serve --engine-only --connect ADDRS`
             rank 0's engine loop connects to the sockets the front-end bound

The supervisor starts the rank job and watches it. When the job dies (it exits
non-zero: a rank was killed, the step watchdog ended it) or rank 0's heartbeats
stop for twice the step timeout (then it kills the job), it logs what died
and starts the job again from the same engine directory, at most N times. While
it does, /health answers 503 "restarting" and requests are accepted and wait; the
EngineClient re-submits every unfinished request to the new engine, so streams
continue where they stopped. With no restart left the server fails as an
unsupervised one does: outstanding requests get an error, the process exits 1.

A rank job that ends with exit code 0 was shut down on purpose (a drain, e.g.
`scancel --signal=TERM`): the front-end then ends too. The first start is not
retried: if the job never served, a restart would only repeat its error. Nor is a
restart whose job exits 2 (dist_infer's bad-input code: a corrupt or missing engine
file, say) before its engine is ready: the next start would read the same input, so
the waiting requests fail with that error and the front-end exits 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from dist_infer.client import EngineClient
from dist_infer.errors import DistInferError
from dist_infer.workers.engine_loop import EngineAddresses

log = logging.getLogger("dist_infer.supervisor")

KILL_GRACE_S = 3.0  # SIGTERM to the job's process group, then SIGKILL
# Rank 0 silent this many step timeouts: a hang. A stopped worker also silences rank 0 (it waits in
# a collective), but the ranks' own step watchdog, which names the rank and host, fires after one
# step timeout: the supervisor leaves it time to do so and end the job.
HANG_FACTOR = 2
# Lines of a dying job that say what died, first one wins (later ones are consequences):
# the step watchdog, a rank that lost its peer, mpirun/prterun, srun.
CAUSE_WORDS = ("step watchdog", "stopped answering", "noticed that process rank", "srun: error:", "died:")
BAD_INPUT_EXIT = 2   # DistInferError.exit_code: the job refused its input (engine files, flags)
ERROR_MARK = " ERROR "  # a rank's log line at level ERROR: "[rank 0] 12:00:00 ERROR dist_infer.cli: MESSAGE"


class RankJob(Protocol):
    async def wait(self) -> int: ...        # the job's exit code (negative: killed by that signal)
    def cause(self) -> str | None: ...      # what its output said died, if anything
    async def kill(self) -> None: ...


StartJob = Callable[[EngineAddresses], Awaitable[RankJob]]


class FirstStartFailed(Exception):
    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.code = code


@dataclass
class RestartPolicy:
    restarts: int                # N of --restart N
    step_timeout_s: float        # rank 0 silent HANG_FACTOR x this long: the job hangs (kill, restart)
    start_timeout_s: float       # a (re)started job must have its engine ready within this
    engine: str = ""             # for the log lines


class CommandJob:
    """A rank job started by a command line (mpirun, srun, or one rank directly), in its own
    process group, so that killing it takes every local process of the job and never us.
    Its output goes to our stderr; the first line that says what died is kept."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self._cause: str | None = None
        self._error: str | None = None  # the first ERROR line's message: what a failed start refused
        self._reader = asyncio.create_task(self._forward())

    @classmethod
    async def start(cls, argv: list[str], env: dict | None = None) -> CommandJob:
        log.info("starting the rank job: %s", " ".join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, process_group=0, env=env, limit=1 << 20)
        return cls(proc)

    async def _forward(self) -> None:
        unfinished = False  # the cause's sentence may go on in the next line (mpirun wraps at 72 columns)
        while line := await _read_line(self.proc.stdout):
            text = line.decode(errors="replace")
            sys.stderr.write(text)
            if unfinished and _continues(text):
                self._cause = f"{self._cause} {text.strip()}"
            unfinished = False
            if self._cause is None and any(w in text for w in CAUSE_WORDS):
                self._cause = error_message(text) or text.strip()  # a rank's log line without its prefix
                unfinished = not self._cause.endswith((".", ")"))
            elif self._error is None:
                self._error = error_message(text)

    async def wait(self) -> int:
        code = await self.proc.wait()
        # An orphan of the job may hold the pipe open: the output gets a moment, not forever.
        await asyncio.wait({self._reader}, timeout=2)
        return code

    def cause(self) -> str | None:
        """A job that refused its input (exit 2) is explained by its error line; any other failure
        by the line naming what died (a rank aborting may make its peers report it dead)."""
        if self.proc.returncode == BAD_INPUT_EXIT and self._error:
            return self._error
        return self._cause or self._error

    async def kill(self) -> None:
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), KILL_GRACE_S)
        except asyncio.TimeoutError:
            pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


def error_message(line: str) -> str | None:
    """MESSAGE of a rank's "[rank R] TIME ERROR LOGGER: MESSAGE" line, else None."""
    if ERROR_MARK not in line:
        return None
    _, _, rest = line.partition(ERROR_MARK)
    logger, sep, message = rest.partition(": ")
    return message.strip() if sep and " " not in logger else None


def _continues(line: str) -> bool:
    """A wrapped sentence's next line, not a line of its own ("[rank 1] ...", "srun: ...")."""
    words = line.split()
    return bool(words) and not words[0].startswith(("[", "---")) and not words[0].endswith(":")


async def _read_line(stream: asyncio.StreamReader) -> bytes:
    try:
        return await stream.readline()
    except ValueError:  # a line over the limit: pass it on in pieces
        return await stream.read(1 << 16)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(code: int, cause: str | None) -> str:
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
           else f"exited with code {code}")
    return f"the rank job {how}" + (f" ({cause})" if cause else "")


@dataclass
class Supervisor:
    client: EngineClient
    start_job: StartJob
    control_host: str            # where the ranks reach this process's sockets
    policy: RestartPolicy
    used: int = 0
    stopping: bool = False
    restart_times: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.job: RankJob | None = None
        self._ended: asyncio.Future | None = None

    async def start(self) -> None:
        """The first rank job, until its engine is ready (FirstStartFailed otherwise)."""
        failure = await self._launch()
        if failure is not None:
            code = self._ended.result() if self._ended.done() else 1
            raise FirstStartFailed(failure, code if code > 0 else 1)

    async def run(self) -> int:
        """Watch the job and restart it when it fails; 0 when it ended on purpose, 1 when no
        restart was left (every waiting request has then failed)."""
        failure = await self._until_failure()
        while failure is not None:
            if self.used >= self.policy.restarts:
                return self._give_up(failure)
            failure = await self._restart(failure)
            if failure is None:
                failure = await self._until_failure()
            elif self._refused_its_input():
                return self._stop_on_bad_input(failure)
        return 0

    async def _launch(self) -> str | None:
        """Fresh sockets, a new job connecting to them; None once its engine is ready, else why not."""
        addresses = self.client.bind(self.control_host)
        try:
            self.job = await self.start_job(addresses)
        except DistInferError as exc:  # e.g. the Ray actors could not be placed: a failed start
            self._ended = asyncio.get_running_loop().create_future()
            self._ended.set_result(exc.exit_code)
            return f"the rank job did not start: {exc}"
        self._ended = asyncio.ensure_future(self.job.wait())
        return await self._until_ready()

    async def _until_ready(self) -> str | None:
        deadline = time.monotonic() + self.policy.start_timeout_s
        while not self.client.ready:
            if self._ended.done():
                return describe_exit(self._ended.result(), self.job.cause()) + " before its engine was ready"
            if self.stopping or time.monotonic() > deadline:
                await self.job.kill()
                return None if self.stopping else \
                    f"the rank job's engine was not ready within {self.policy.start_timeout_s:.0f} s (killed it)"
            await asyncio.sleep(0.1)
        return None

    async def _until_failure(self) -> str | None:
        """Until the job ends (None: on purpose) or hangs (then it is killed)."""
        while not self._ended.done():
            silent = self.client.seconds_since_heartbeat()
            if silent is not None and silent > HANG_FACTOR * self.policy.step_timeout_s and not self.stopping:
                await self.job.kill()
                said = self.job.cause()  # e.g. the ranks' watchdog named a stopped rank, and the launcher was slow
                return (f"rank 0 sent no heartbeat for {silent:.0f} s ({HANG_FACTOR} x --step-timeout "
                        f"{self.policy.step_timeout_s:g} s): killed the rank job" + (f" ({said})" if said else ""))
            await asyncio.wait({self._ended}, timeout=0.5)
        code = self._ended.result()
        return None if code == 0 or self.stopping else describe_exit(code, self.job.cause())

    async def _restart(self, failure: str) -> str | None:
        self.used += 1
        log.warning("%s; restarting it from %s (restart %d of %d); %d requests wait for it", failure,
                    self.policy.engine, self.used, self.policy.restarts, self.client.num_streams)
        self.client.engine_lost()
        started = time.monotonic()
        failure = await self._launch()
        if failure is None and not self.stopping:
            self.restart_times.append(time.monotonic() - started)
            log.info("rank job restarted: engine ready %.1f s after the restart began (restart %d of %d); "
                     "resuming %d requests", self.restart_times[-1], self.used, self.policy.restarts,
                     self.client.num_streams)
        return failure

    def _refused_its_input(self) -> bool:
        """The restarted job exited 2 before its engine was ready: it refused its input (a corrupt
        engine file, say), which every further start would read again."""
        return self._ended is not None and self._ended.done() and self._ended.result() == BAD_INPUT_EXIT

    def _stop_on_bad_input(self, failure: str) -> int:
        log.error("%s; a restart would fail the same way (fix the input, then start the server again): "
                  "failing %d requests and exiting %d", failure, self.client.num_streams, BAD_INPUT_EXIT)
        self.client.engine_died(f"the engine cannot restart: {failure}")
        return BAD_INPUT_EXIT

    def _give_up(self, failure: str) -> int:
        log.error("%s; no restart left (--restart %d, all used): failing %d requests and exiting 1", failure,
                  self.policy.restarts, self.client.num_streams)
        self.client.engine_died(f"the engine failed and --restart {self.policy.restarts} is used up: {failure}")
        return 1

    def drain(self) -> None:
        """The front-end drains (SIGTERM): the job ends with the engine's own drain; a job that is
        only starting is stopped, and the requests waiting for it fail (503)."""
        self.stopping = True
        if not self.client.ready:
            self.client.engine_died("the server is shutting down (it was restarting the engine)")

    async def finish(self, timeout_s: float) -> None:
        """After the front-end stopped: give the job `timeout_s` to end by itself, then kill it."""
        self.stopping = True
        if self._ended is None or self._ended.done():
            return
        self.client.shutdown_engine()
        done, _ = await asyncio.wait({self._ended}, timeout=timeout_s)
        if not done:
            log.warning("the rank job did not end within %.0f s of the shutdown: killing it", timeout_s)
            await self.job.kill()
