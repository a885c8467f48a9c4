"""The fault matrix (issue #11): one supervised `dist-infer launch ... -- serve --restart N` per
(launcher, topology) receives the faults in sequence, each while streams from the official
`openai` client are in flight, and every stream's answer must equal the same request's answer
before the fault (tests/serve/drill.py):

    kill -9 of rank 0, of a middle rank, of the last rank   -> restart; streams continue
    SIGSTOP of a rank                                       -> the step watchdog names it; restart
    SIGTERM to the launcher (scancel --signal=TERM: Slurm)  -> drain: streams finish, exit 0
    a corrupted engine file found at restart (2nd server)   -> no retry: the stream gets an error
                                                               naming the file and the fix, exit 2

Each fault writes its row (what the user sees, how long it took) to out/fault_matrix.json,
merged across tests; scripts/fault_matrix_table.py renders the table in docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from conftest import REPO, flip_middle_bytes
from serve import drill
from serve.server import rank_pids

from .conftest import wait_healthy

MATRIX_JSON = REPO / "out" / "fault_matrix.json"
STEP_TIMEOUT_S = 5      # the step watchdog's limit in these jobs (decode steps take milliseconds)
RESTARTS = 10           # more than the faults one server receives
STREAMS = 6             # concurrent streams per fault (engine max batch 8)
SUPERVISOR_LINE = re.compile(r"^.*WARNING dist_infer\.supervisor: (.*restarting it from.*)$", re.M)


@dataclass
class Cell:
    """One supervised server: a `dist-infer launch` process and how to find its ranks."""
    launcher: str                         # mpirun | slurm | ray
    topology: str                         # one host | two hosts
    url: str
    proc: subprocess.Popen
    log_path: Path
    engine: Path                          # this server's own engine copy (the corrupt fault edits it)
    rank_pid: Callable[[int], int]        # rank -> pid of the current incarnation
    host_of: Callable[[int], str]         # pid -> host name (namespace) it runs in
    world: int = 3
    stop: Callable[[], None] = lambda: None  # SIGTERM "from the scheduler"
    timings: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def target(self, sig: int) -> drill.Target:
        return drill.Target(self.url, lambda rank: os.kill(self.rank_pid(rank), sig),
                            lambda: self.proc.poll() is None, lambda: self.log()[-6000:])


def copy_engine(engine: Path, into: Path) -> Path:
    out = into / engine.name
    shutil.copytree(engine, out)
    return out


def start_launch(cluster: Path, log_path: Path, port: int, host: str, env: dict | None = None,
                 prefix: list[str] | None = None) -> subprocess.Popen:
    """`dist-infer launch --cluster FILE -- serve --restart N` in its own session."""
    cmd = [*(prefix or []), sys.executable, "-m", "dist_infer", "launch", "--cluster", str(cluster), "--", "serve",
           "--restart", str(RESTARTS), "--step-timeout", str(STEP_TIMEOUT_S), "--host", host, "--port", str(port),
           "--served-model-name", drill.MODEL]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_up(cell: Cell) -> Cell:
    started = time.monotonic()
    wait_healthy(cell.url, cell.proc, cell.log_path)
    cell.timings["start_s"] = time.monotonic() - started
    return cell


def end(cell: Cell) -> None:
    """Whatever a failed test left running: the launch's session, then the ranks by pid."""
    if cell.proc.poll() is None:
        os.killpg(cell.proc.pid, signal.SIGKILL)
        cell.proc.wait()
    for pid in engine_pids(cell.engine):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- where the ranks are ---------------------------------------------------------------------------------

def engine_pids(engine: Path) -> list[int]:
    """Processes whose command line names this engine (the ranks of mpirun/srun jobs, wherever their
    namespace: one pid space)."""
    words = f"--engine {engine} ".encode()
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and words in _cmdline(int(p.name))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") + b" "
    except OSError:
        return b""


def command_rank_pid(engine: Path) -> Callable[[int], int]:
    def find(rank: int) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = rank_pids(engine_pids(engine))
            if rank in found:
                return found[rank]
            time.sleep(0.2)
        raise AssertionError(f"no rank {rank} of {engine} found")
    return find


def host_namer(hosts) -> Callable[[int], str]:
    """pid -> the name of the namespace host it runs in ('this machine' for the root namespace)."""
    inodes = {os.stat(f"/run/netns/{h.netns}").st_ino: h.name for h in (hosts.hosts if hosts else [])}

    def name(pid: int) -> str:
        link = os.readlink(f"/proc/{pid}/ns/net")  # "net:[INODE]"
        return inodes.get(int(link[5:-1]), "this machine")
    return name


# ---- the faults ------------------------------------------------------------------------------------------

def kill_rank(cell: Cell, rank: int, seed: int, request) -> None:
    """kill -9 of `rank` mid streams: the job restarts, every stream completes with its answer."""
    host = cell.host_of(cell.rank_pid(rank))
    seen = len(cell.log())
    restart_s = drill.run_drill(cell.target(signal.SIGKILL), victim=rank, seed=seed, streams=STREAMS)
    line = supervisor_line(cell, seen)
    assert rank_named(cell.launcher, line, rank), line
    fault = "kill -9 of rank 0" if rank == 0 else \
        "kill -9 of the last rank" if rank == cell.world - 1 else "kill -9 of a middle rank"
    record(cell, fault, request, rank=rank, host=host, seconds=restart_s, until="/health 200 again",
           sees=f"{STREAMS}/{STREAMS} streams and 2 requests sent during the restart complete, equal to the "
                f"reference; /health 503 `restarting` meanwhile", log_line=line)


def stop_rank(cell: Cell, rank: int, seed: int, request) -> None:
    """SIGSTOP of `rank` mid streams: the step watchdog names it within the step timeout, the job
    ends and restarts (the stopped process is killed with it)."""
    pid = cell.rank_pid(rank)
    host = cell.host_of(pid)
    seen = len(cell.log())
    restart_s = drill.run_drill(cell.target(signal.SIGSTOP), victim=rank, seed=seed, streams=STREAMS)
    line = supervisor_line(cell, seen)
    assert "step watchdog" in line and f"rank {rank} (on " in line and f"pid {pid})" in line, line
    assert cell.launcher != "mpirun" or cell.topology == "one host" or f"on {host}," in line, (host, line)
    record(cell, "SIGSTOP of a rank", request, rank=rank, host=host, seconds=restart_s, until="/health 200 again",
           sees=f"{STREAMS}/{STREAMS} streams complete, equal to the reference; the watchdog fires after "
                f"--step-timeout {STEP_TIMEOUT_S} s, then /health 503 `restarting`", log_line=line)


def sigterm_launcher(cell: Cell, seed: int, request) -> None:
    """SIGTERM to the launcher with streams in flight: it drains (every stream finishes with its
    answer, new requests get 503) and exits 0."""
    batch = drill.prompts(STREAMS, seed)
    want = asyncio.run(drill.references(cell.url, batch))
    got, code, took = asyncio.run(_streams_through(cell, batch))
    assert got == want, "a stream's answer changed during the drain"
    assert code == 0, cell.log()[-4000:]
    record(cell, "SIGTERM to the launcher", request, seconds=took, until="exit", exit_code=code,
           sees=f"drain: the {STREAMS} streams in flight finish, equal to the reference; then exit 0",
           log_line=_last(cell.log(), ("drain", "exit code 0")))


async def _streams_through(cell: Cell, batch: list[list[int]]) -> tuple[list[str], int, float]:
    api, chunks, progress = drill.client(cell.url), [0] * len(batch), asyncio.Event()
    streams = [asyncio.create_task(drill.stream(api, p, i, chunks, progress)) for i, p in enumerate(batch)]
    while min(chunks) < 2:  # every stream admitted and under way: a request after the signal gets 503
        assert not any(t.done() for t in streams), "a stream ended before the signal"
        await asyncio.sleep(0.05)
    signalled = time.monotonic()
    cell.stop()
    texts = await asyncio.wait_for(asyncio.gather(*streams), 120)
    code = await asyncio.to_thread(cell.proc.wait, 120)
    await api.close()
    return list(texts), code, time.monotonic() - signalled


def corrupt_then_kill(cell: Cell, rank_file: int, victim: int, request) -> None:
    """Corrupt rank `rank_file`'s engine file, then kill -9 `victim` mid stream: the restart finds the
    file corrupt and exits 2; the supervisor does not retry what would fail the same way: the stream
    gets an error naming the file and the fix, and the server exits 2."""
    path = cell.engine / f"rank{rank_file}" / "weights.safetensors"
    flip_middle_bytes(path)
    error, took = asyncio.run(_stream_until_error(cell, victim))
    code = cell.proc.wait(timeout=120)
    log = cell.log()
    message = str(error)
    assert code == 2, log[-4000:]
    assert str(path) in message and "corrupt" in message and "Rebuild the engine" in message, message
    assert "a restart would fail the same way" in log and log.count("restarting it from") == 1, log[-4000:]
    assert [p for p in engine_pids(cell.engine) if _alive(p)] == [], "a rank outlived the server"
    record(cell, "corrupted engine file found at restart", request, seconds=took, until="exit",
           exit_code=code, sees=f"the stream in flight ends with an error event `{_short(message)}`; "
                                "no retry; exit 2", log_line=_last(log, ("a restart would fail the same way",)))


async def _stream_until_error(cell: Cell, victim: int) -> tuple[Exception, float]:
    api = drill.client(cell.url)
    stream = await api.completions.create(model=drill.MODEL, prompt=[5, 6, 7], max_tokens=120, stream=True,
                                          extra_body={"ignore_eos": True})
    await anext(aiter(stream))
    os.kill(cell.rank_pid(victim), signal.SIGKILL)
    killed = time.monotonic()
    try:
        async for _ in stream:
            pass
    except openai.APIError as exc:
        await asyncio.to_thread(cell.proc.wait, 120)
        return exc, time.monotonic() - killed
    finally:
        await api.close()
    raise AssertionError(f"the stream finished although the engine cannot restart:\n{cell.log()[-4000:]}")


def _alive(pid: int) -> bool:
    from conftest import _alive as alive

    return alive(pid)


# ---- what the user saw -----------------------------------------------------------------------------------

def supervisor_line(cell: Cell, since: int) -> str:
    found = SUPERVISOR_LINE.findall(cell.log()[since:])
    assert found, cell.log()[-4000:]
    return found[0]


def rank_named(launcher: str, line: str, rank: int) -> bool:
    """How each launcher names the killed rank in the line the supervisor logs, or how the ranks'
    watchdog does (`rank R (on HOST, pid P) died: its lifeline ...`), whichever came first."""
    by_launcher = {"mpirun": f"process rank {rank} with PID", "slurm": f"task {rank}: Killed",
                   "ray": f"rank {rank}'s actor died"}[launcher]
    return by_launcher in line or (f"rank {rank} (on " in line and "died: its lifeline" in line)


def _last(log: str, words: tuple[str, ...]) -> str:
    lines = [line for line in log.splitlines() if any(w in line for w in words)]
    return lines[-1].split(": ", 1)[-1] if lines else ""


def _clean(text: str, cell: Cell) -> str:
    """Paths of this run out of a row: the engine directory is ENGINE."""
    return text.replace(str(cell.engine), "ENGINE")


def _short(text: str, n: int = 400) -> str:
    return text if len(text) <= n else text[:n] + "..."


def record(cell: Cell, fault: str, request, seconds: float, until: str, sees: str, log_line: str,
           rank: int | None = None, host: str | None = None, exit_code: int | None = None) -> None:
    """Merge this row into out/fault_matrix.json (keyed by launcher, topology and fault)."""
    row = dict(launcher=cell.launcher, topology=cell.topology, fault=fault, rank=rank, host=host,
               seconds=round(seconds, 1), until=until, exit_code=exit_code, user_sees=_clean(sees, cell),
               log_line=_short(_clean(log_line, cell).split("; restarting it from")[0]), test=request.node.nodeid,
               measured=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    MATRIX_JSON.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(MATRIX_JSON.read_text()) if MATRIX_JSON.exists() else []
    rows = [r for r in rows if (r["launcher"], r["topology"], r["fault"]) != (cell.launcher, cell.topology, fault)]
    MATRIX_JSON.write_text(json.dumps(rows + [row], indent=1) + "\n")
    print(f"{cell.launcher}, {cell.topology}: {fault}: {seconds:.1f} s to {until}")


def full_matrix() -> bool:
    """CI time is short: CI runs on one host the kills of rank 0 and of the last rank (a middle
    rank dies the same way), SIGSTOP and the drain; on two hosts the kill of a rank on the second
    host and the drain across hosts. The whole matrix, every fault on every topology, runs with
    DIST_INFER_FAULT_MATRIX=full (docs/RELIABILITY.md)."""
    return os.environ.get("DIST_INFER_FAULT_MATRIX", "").lower() == "full"


def run_restart_faults(cell: Cell, request) -> None:
    """The faults a server survives, in sequence: kill -9 of rank 0, a middle and the last rank,
    then SIGSTOP of rank 2 (on the second host when there are two); then SIGTERM ends it. CI runs
    the subset full_matrix() names."""
    last, restarts = cell.world - 1, 1
    if cell.topology == "one host" or full_matrix():
        kill_rank(cell, 0, seed=1, request=request)
        restarts += 1
    if full_matrix():
        kill_rank(cell, 1, seed=2, request=request)
        restarts += 1
    kill_rank(cell, last, seed=3, request=request)
    if cell.topology == "one host" or full_matrix():
        stop_rank(cell, 2, seed=4, request=request)
        restarts += 1
    assert log_count(cell, "restarting it from") == restarts, cell.log()[-8000:]  # one restart per fault
    sigterm_launcher(cell, seed=5, request=request)


def corrupt_engine_file_at_restart(cell: Cell, request) -> None:
    corrupt_then_kill(wait_up(cell), rank_file=cell.world - 1, victim=1, request=request)


def skip_unless_every_fault(two_hosts: bool) -> None:
    """The corrupt file is found by each rank's own check, whatever the topology: on two hosts it
    runs in the full matrix only (CI time)."""
    if two_hosts and not full_matrix():
        pytest.skip("two hosts: DIST_INFER_FAULT_MATRIX=full runs it (the same per-rank file check as "
                    "on one host; CI time)")


def log_count(cell: Cell, words: str) -> int:
    return cell.log().count(words)
