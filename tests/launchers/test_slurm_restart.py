"""`dist-infer launch --cluster slurm.yaml -- serve --restart 1` against real Slurm daemons:
the batch shell runs the front-end and its supervisor, which runs the ranks as an `srun`
step. kill -9 of the last rank in the middle of concurrent streams: the supervisor runs the
step again in the same allocation and every stream completes with its fault-free answer;
then `scancel --signal=TERM` drains the new step and the job ends 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from serve import drill
from serve.conftest import tiny  # noqa: F401 (the TP=2 tiny engine the serve tests build)
from serve.server import free_port, rank_pids

from .conftest import require, wait_healthy, write_cluster
from .daemons import SlurmCluster

JOB = "direstart"


@pytest.fixture(autouse=True)
def _slurm_installed():
    require(None if shutil.which("slurmctld") and shutil.which("sbatch")
            else "Slurm is not installed: run scripts/ci_system_deps.sh")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, two_hosts):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-restart"), two_hosts)
    yield cluster
    cluster.stop()


def job_ranks(engine: Path) -> dict[int, int]:
    """rank -> pid of this test's ranks (children of slurmstepd, not of the test)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    mine = [pid for pid in pids if _cmdline_has(pid, f"--engine {engine} ".encode())]
    return rank_pids(mine)


def _cmdline_has(pid: int, words: bytes) -> bool:
    try:
        return words in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False


def test_slurm_srun_step_restarts_and_every_stream_completes(tmp_path, tiny, slurm):  # noqa: F811
    engine = tiny[0](2, 1)
    port, env = free_port(), {**os.environ, **slurm.env}
    cluster = write_cluster(tmp_path / "slurm.yaml", f"""
launcher: slurm
engine: {engine}
launch_dir: {tmp_path}
slurm: {{partition: local, nodes: 1, ntasks_per_node: 2, ranks: srun, mpi: pmix, time: "00:05:00",
        job_name: {JOB}, cpus_per_task: 1, setup: "source {sys.prefix}/bin/activate"}}
env: {{OMP_NUM_THREADS: "1"}}
""")
    log_path, url = tmp_path / "launch.log", f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dist_infer", "launch", "--cluster", str(cluster), "--", "serve",
                             "--restart", "1", "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
                             "tiny"], stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True, env=env)
    try:
        wait_healthy(url, proc, log_path)
        target = drill.Target(url, lambda rank: os.kill(job_ranks(engine)[rank], signal.SIGKILL),
                              lambda: proc.poll() is None, log_path.read_text)
        restart_s = drill.run_drill(target, victim=1, seed=7)
        log = log_path.read_text()
        assert "restarting it from" in log and "srun" in log, log[-3000:]
        print(f"Slurm (srun step), kill -9 of rank 1 mid {drill.STREAMS} streams: healthy again after "
              f"{restart_s:.1f} s")
        jobs = slurm.cmd("squeue", "-h", "-o", "%i", "-n", JOB).stdout.split()
        assert len(jobs) == 1, jobs
        drained = time.monotonic()
        slurm.cmd("scancel", "--signal=TERM", jobs[0])  # the step's tasks: rank 0 drains, the job ends 0
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
        print(f"scancel --signal=TERM: the supervised job ended 0 after {time.monotonic() - drained:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["scancel", "-n", JOB], env=env)
