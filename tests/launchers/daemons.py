"""Real daemons for the launcher tests, started and stopped by the tests:
a private munged + slurmctld + one slurmd per host, and Ray clusters.

Every daemon runs in the foreground of its own session; stopping means
SIGTERM, then SIGKILL, to that process group (never `ray stop`, which would
stop every Ray on the machine). Logs stay in the run directory and are shown
when something does not come up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port

from .hosts import Host, TwoHosts

VENV_BIN = Path(sys.executable).parent


class Daemons:
    """Processes started in their own sessions, stopped by process group."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        f = open(log, "ab")
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
        f.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self, logs: dict[str, Path]) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                log = logs.get(name)
                text = log.read_text()[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{text}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(what: str, ready, timeout: float, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready within {timeout:.0f}s\n{on_fail()}")


# ---------------------------------------------------------------- Slurm

SLURM_CONF = """\
ClusterName=dici
SlurmctldHost={ctld_name}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={run}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={run}/state
SlurmdSpoolDir={run}/spool/%n
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.%n.pid
SlurmctldLogFile={run}/log/slurmctld.log
SlurmdLogFile={run}/log/slurmd.%n.log
TmpFS={run}/tmp/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
KillWait=5
InactiveLimit=0
{nodes}
PartitionName=local Nodes={local} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
PartitionName=two Nodes={two} MaxTime=INFINITE State=UP OverSubscribe=YES
"""
NODE = "NodeName={name} NodeAddr={addr} CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN"


class SlurmCluster:
    """munged + slurmctld on this machine; slurmd `local` on this machine
    (partition `local`) and one slurmd per namespace host (partition `two`)."""

    def __init__(self, run: Path, hosts: TwoHosts, cpus: int = 4):
        self.run, self.hosts = run, hosts
        self.daemons = Daemons()
        self.conf = run / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.local = socket.gethostname().split(".")[0]  # PMIx (srun --mpi=pmix) needs NodeName == hostname
        for d in ("state", "spool", "log", "tmp", "munge"):
            (run / d).mkdir(parents=True, exist_ok=True)
        for name in [self.local] + [h.name for h in hosts.hosts]:
            (run / "spool" / name).mkdir(exist_ok=True)
            (run / "tmp" / name).mkdir(exist_ok=True)
        nodes = [NODE.format(name=self.local, addr=hosts.gateway, cpus=cpus)]
        nodes += [NODE.format(name=h.name, addr=h.addr, cpus=cpus) for h in hosts.hosts]
        self.conf.write_text(SLURM_CONF.format(
            ctld_name=socket.gethostname(), ctld_addr=hosts.gateway, ctld_port=free_port(), slurmd_port=free_port(),
            run=run, nodes="\n".join(nodes), local=self.local, two=",".join(h.name for h in hosts.hosts)))
        self.logs = {"munged": run / "log" / "munged.log", "slurmctld": run / "log" / "slurmctld.out"}
        try:
            self._start()
        except Exception:
            self.stop()
            raise

    def _start(self) -> None:
        run, munge = self.run, self.run / "munge"
        munge.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.daemons.start("munged", ["/usr/sbin/munged", "-F", "-f", f"--socket={munge}/munge.sock",
                                      f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                                      f"--seed-file={munge}/seed", f"--log-file={munge}/munged.log"],
                           self.logs["munged"])
        wait_for("munged", lambda: (munge / "munge.sock").exists(), 20, lambda: self.logs["munged"].read_text())
        self.daemons.start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], self.logs["slurmctld"],
                           self.env)
        slurmd = lambda name: ["slurmd", "-D", "-N", name, "-f", str(self.conf)]
        self.logs["slurmd-local"] = run / "log" / "slurmd-local.out"
        self.daemons.start("slurmd-local", slurmd(self.local), self.logs["slurmd-local"], self.env)
        for h in self.hosts.hosts:
            name = f"slurmd-{h.name}"
            self.logs[name] = run / "log" / f"{name}.out"
            # per-node gloo interface: the ranks of a job inherit slurmd's environment
            self.daemons.start(name, h.prefix() + slurmd(h.name), self.logs[name],
                               {**self.env, "GLOO_SOCKET_IFNAME": h.ifname})
        wait_for("Slurm nodes idle", self._all_idle, 60, self._diagnose)

    def _all_idle(self) -> bool:
        self.daemons.check_alive(self.logs)
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return len(states) == 1 + len(self.hosts.hosts) and all(s == "idle" for s in states.values())

    def _diagnose(self) -> str:
        parts = [self.cmd("sinfo", "-N", "-l", check=False).stdout]
        for name, log in self.logs.items():
            if log.exists():
                parts.append(f"--- {name}\n{log.read_text()[-1500:]}")
        return "\n".join(parts)

    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check,
                              env={**os.environ, **self.env})

    def stop(self) -> None:
        self.daemons.stop()


# ---------------------------------------------------------------- Ray

class RayCluster:
    """A Ray head (and optionally workers), each `ray start --block` in its own
    session with its own --temp-dir and ports. hosts: where each node runs
    (None: this machine's namespace)."""

    def __init__(self, run: Path, nodes: list[Host | None], cpus: list[int]):
        self.run = run
        self.daemons = Daemons()
        self.logs: dict[str, Path] = {}
        self.head_host = nodes[0]
        self.head_ip = nodes[0].addr if nodes[0] else None
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        ray = str(VENV_BIN / "ray")
        try:
            for i, (host, n) in enumerate(zip(nodes, cpus)):
                temp = Path(f"/tmp/dir{os.getpid()}-{i}")  # Ray's socket paths must stay short
                shutil.rmtree(temp, ignore_errors=True)
                temp.mkdir(parents=True)
                self._temps = getattr(self, "_temps", []) + [temp]
                args = [ray, "start", "--block", f"--num-cpus={n}", "--num-gpus=0", "--disable-usage-stats",
                        f"--temp-dir={temp}", "--object-store-memory=80000000",
                        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                        f"--runtime-env-agent-port={free_port()}",
                        f"--min-worker-port={20000 + 2000 * i}", f"--max-worker-port={20999 + 2000 * i}"]
                if host:
                    args.append(f"--node-ip-address={host.addr}")
                if i == 0:
                    args += ["--head", f"--port={self.gcs_port}", "--dashboard-host=0.0.0.0",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
                else:
                    args.append(f"--address={self.gcs_address}")
                env = {"RAY_DEDUP_LOGS": "0"}
                if host:
                    env["GLOO_SOCKET_IFNAME"] = host.ifname
                name = f"ray-{i}"
                self.logs[name] = run / f"{name}.log"
                self.daemons.start(name, (host.prefix(uts=False) if host else []) + args, self.logs[name], env)
                if i == 0:
                    wait_for("Ray head", self._head_up, 90, lambda: self.logs["ray-0"].read_text()[-3000:])
            wait_for(f"{len(nodes)} Ray nodes", lambda: self._alive_nodes() >= len(nodes), 90,
                     lambda: "\n".join(p.read_text()[-2000:] for p in self.logs.values()))
        except Exception:
            self.stop()
            raise

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip or self._local_ip()}:{self.gcs_port}"

    @property
    def job_url(self) -> str:
        return f"http://{self.head_ip or '127.0.0.1'}:{self.dashboard_port}"

    def _local_ip(self) -> str:
        # Ray binds the GCS to the machine's address (it replaces 127.0.0.1)
        import ray._private.services as services

        return services.get_node_ip_address()

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.job_url + path, timeout=3) as r:
                return r.read()
        except OSError:
            return None

    def _head_up(self) -> bool:
        self.daemons.check_alive(self.logs)
        return self._get("/api/version") is not None

    def _alive_nodes(self) -> int:
        """Nodes whose `ray start` finished (it prints this once its raylet joined the GCS)."""
        self.daemons.check_alive(self.logs)
        return sum("Ray runtime started" in p.read_text(errors="replace") for p in self.logs.values())

    def stop(self) -> None:
        self.daemons.stop()
        for temp in getattr(self, "_temps", []):
            shutil.rmtree(temp, ignore_errors=True)
