"""A real `dist-infer serve` job under a real `mpirun`, for the tests: started,
waited for on /health, and stopped with the exit and orphan checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import REPO, _alive, free_port, mpirun_prefix


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), so a test can check none outlives the job."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Server:
    def __init__(self, engine: Path, world: int, *args: str, env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dist_infer", "serve", "--engine", str(engine), "--port", str(self.port), *args]
        if world > 1:
            cmd = mpirun_prefix(world) + [a for v in (env or {}) for a in ("-x", v)] + cmd
        self.log_path = log or Path(f"/tmp/dist-infer-serve-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.pids: list[int] = []

    def wait_healthy(self, timeout: float = 240) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.pids = descendants(self.proc.pid)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise AssertionError(f"server not healthy within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-6000:]

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60, pid: int | None = None) -> int:
        """Signal `pid` (default: the job's launcher), wait for the job; returns its exit code."""
        if self.proc.poll() is None:
            os.kill(pid or self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout}s of {signal.Signals(sig).name}:\n"
                                 f"{self.output()}")
        return self.proc.returncode

    def frontend_and_rank0(self) -> tuple[int, int]:
        """(front-end pid, its parent: rank 0) among the job's processes."""
        for pid in descendants(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if "dist_infer.serve.api_server" in cmdline:
                return pid, ppid
        raise AssertionError("no front-end process found")

    def orphans(self) -> list[int]:
        time.sleep(0.5)
        return [p for p in self.pids if _alive(p)]

    def rank_pid(self, rank: int) -> int:
        """The pid of rank `rank` of the job's (current) ranks."""
        found = rank_pids(descendants(self.proc.pid))
        assert rank in found, f"no rank {rank} among the job's processes {found}:\n{self.output()}"
        return found[rank]

    def kill(self) -> None:
        self.pids += descendants(self.proc.pid) if self.proc.poll() is None else []  # a restarted job's too
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


RANK_VARS = (b"OMPI_COMM_WORLD_RANK", b"SLURM_PROCID", b"PMIX_RANK")
LAUNCHERS = ("mpirun", "prterun", "orterun", "mpiexec", "srun")


def rank_pids(pids: list[int]) -> dict[int, int]:
    """rank -> pid of the dist_infer rank processes among `pids` (from their launcher's variables)."""
    found = {}
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        rank = next((env[v] for v in RANK_VARS if v in env), None)
        tool = Path(cmdline.split(b"\0")[0].decode()).name
        supervisor = b"\0--restart\0" in cmdline  # may carry a launcher's rank variables (a batch shell's)
        if b"dist_infer" in cmdline and tool not in LAUNCHERS and not supervisor and rank is not None:
            found[int(rank)] = pid
    return found
