"""`dist-infer launch --cluster ray.yaml -- serve --restart 1` on a one-node Ray cluster
started here: the Ray driver runs the front-end and its supervisor; the ranks are actors in
the job's placement group. kill -9 of rank 0's actor process in the middle of concurrent
streams: the driver creates new rank actors in the same placement group, every stream
completes with its fault-free answer; then SIGTERM to the driver drains it to exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from serve import drill
from serve.conftest import tiny  # noqa: F401 (the TP=2 tiny engine the serve tests build)
from serve.server import free_port

from .conftest import require, wait_healthy, write_cluster
from .daemons import RayCluster

try:
    import ray
except ImportError:
    ray = None

PIDS = re.compile(r"ranks on nodes \[[^\]]*\], pids \[([\d, ]+)\]")


@pytest.fixture(autouse=True)
def _ray_installed():
    require(None if ray is not None else 'Ray is not installed: pip install "ray[default]"')


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray-restart"), [None], cpus=[2])
    yield cluster
    # `ray start --block` ends in ~2 s on SIGINT (it takes 10 s of SIGTERM): CI time is short.
    for _, proc in cluster.daemons.procs:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    cluster.stop()


def current_pids(log: str) -> list[int]:
    """The rank actors' pids the driver logged for the current incarnation of the job."""
    found = PIDS.findall(log)
    assert found, log[-3000:]
    return [int(p) for p in found[-1].split(",")]


def test_ray_actors_restart_in_their_placement_group(tmp_path, tiny, ray_cluster):  # noqa: F811
    engine = tiny[0](2, 1)
    port = free_port()
    cluster = write_cluster(tmp_path / "ray.yaml", f"""
launcher: ray
engine: {engine}
ray: {{address: '{ray_cluster.gcs_address}', submit: false}}
env: {{OMP_NUM_THREADS: "1"}}
""")
    log_path, url = tmp_path / "launch.log", f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dist_infer", "launch", "--cluster", str(cluster), "--", "serve",
                             "--restart", "1", "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
                             "tiny"], stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)
    try:
        wait_healthy(url, proc, log_path)
        first = current_pids(log_path.read_text())
        target = drill.Target(url, lambda rank: os.kill(current_pids(log_path.read_text())[rank], signal.SIGKILL),
                              lambda: proc.poll() is None, log_path.read_text)
        restart_s = drill.run_drill(target, victim=0, seed=11)
        log = log_path.read_text()
        assert "rank 0's actor died" in log and "restarting it from" in log, log[-3000:]
        assert set(current_pids(log)).isdisjoint(first)  # new actors
        print(f"Ray, kill -9 of rank 0's actor mid {drill.STREAMS} streams: healthy again after {restart_s:.1f} s")
        drained = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
        print(f"SIGTERM to the driver: exit 0 after {time.monotonic() - drained:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
