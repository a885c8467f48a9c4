"""The fault matrix under Ray (tests/launchers/fault_matrix.py): `dist-infer launch --cluster
ray.yaml -- serve --restart N` with a TP=1 x PP=3 tiny Llama; the Ray driver runs the front-end
and its supervisor, the ranks are actors in the job's placement groups (one per stage), and each
restart creates new rank actors in the same groups. One host: a one-node cluster. Two
network-namespace hosts: a node on each (2 CPUs each, so the three stages span both), the
driver on the head's host."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import NETNS_NO_DNS_ENV
from serve.conftest import tiny  # noqa: F401 (the tiny engines the serve tests build)
from serve.server import free_port

from . import fault_matrix as fm
from .conftest import write_cluster
from .daemons import RayCluster
from .test_ray import _ray_installed, ray_daemon_env  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.timeout(900)
PIDS = re.compile(r"ranks on nodes \[[^\]]*\], pids \[([\d, ]+)\]")


def stop_quickly(cluster: RayCluster) -> None:
    """`ray start --block` ends in ~2 s on SIGINT (it takes 10 s of SIGTERM): CI time is short.
    Every node gets it at once (its whole process group), and all share one 10 s wait."""
    for _, proc in cluster.daemons.procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 10
    for _, proc in cluster.daemons.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    cluster.stop()


@pytest.fixture(scope="module", params=["one host", "two hosts"])
def ray_cell_cluster(request, tmp_path_factory):
    hosts = request.getfixturevalue("two_hosts") if request.param == "two hosts" else None
    with ray_daemon_env(**(NETNS_NO_DNS_ENV if hosts else {})):
        cluster = RayCluster(tmp_path_factory.mktemp("ray-faults"), list(hosts.hosts) if hosts else [None],
                             cpus=[2, 2] if hosts else [3])
    yield cluster, hosts
    stop_quickly(cluster)


def current_pids(log: str) -> list[int]:
    """The rank actors' pids the driver logged for the current incarnation of the job."""
    found = PIDS.findall(log)
    assert found, log[-3000:]
    return [int(p) for p in found[-1].split(",")]


def serve_ray(tmp_path, tiny_engine, ray_cluster: RayCluster, hosts) -> fm.Cell:  # noqa: F811
    engine = fm.copy_engine(tiny_engine, tmp_path)
    cluster = write_cluster(tmp_path / "ray.yaml", f"""
launcher: ray
engine: {engine}
ray: {{address: '{ray_cluster.gcs_address}', submit: false}}
env: {{OMP_NUM_THREADS: "1"}}
""")
    port, log = free_port(), tmp_path / "launch.log"
    host = hosts.hosts[0].addr if hosts else "127.0.0.1"
    prefix = hosts.hosts[0].prefix(uts=False) if hosts else None  # the driver on the head's host
    proc = fm.start_launch(cluster, log, port, "0.0.0.0" if hosts else host,
                           NETNS_NO_DNS_ENV if hosts else None, prefix)
    cell = fm.Cell("ray", "two hosts" if hosts else "one host", f"http://{host}:{port}", proc, log, engine,
                   lambda rank: current_pids(log.read_text())[rank], fm.host_namer(hosts))
    cell.stop = lambda: os.kill(proc.pid, signal.SIGTERM)
    return cell


def test_ray_restart_faults(tmp_path, tiny, ray_cell_cluster, request):  # noqa: F811
    cluster, hosts = ray_cell_cluster
    cell = serve_ray(tmp_path, tiny[0](1, 3), cluster, hosts)
    try:
        fm.wait_up(cell)
        first = set(current_pids(cell.log()))
        fm.run_restart_faults(cell, request)
        assert first.isdisjoint(current_pids(cell.log()))  # new actors, in the same placement groups
        if hosts:
            nodes = re.findall(r"ranks on nodes \[([^\]]*)\]", cell.log())[-1]
            assert all(h.addr in nodes for h in hosts.hosts), nodes
    finally:
        fm.end(cell)


def test_ray_corrupt_engine_file_at_restart(tmp_path, tiny, ray_cell_cluster, request):  # noqa: F811
    fm.skip_unless_every_fault(ray_cell_cluster[1] is not None)
    cluster, hosts = ray_cell_cluster
    cell = serve_ray(tmp_path, tiny[0](1, 3), cluster, hosts)
    try:
        fm.corrupt_engine_file_at_restart(cell, request)
    finally:
        fm.end(cell)
