"""The fault matrix under mpirun (tests/launchers/fault_matrix.py): `dist-infer launch -- serve
--restart N` with a TP=1 x PP=3 tiny Llama, on this machine and on two network-namespace hosts
(ranks 0-1 on n0, rank 2 on n1; mpirun reaches n1 through launch/netns_rsh.sh)."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import NETNS_NO_DNS_ENV
from serve.conftest import tiny  # noqa: F401 (the tiny engines the serve tests build)
from serve.server import free_port

from . import fault_matrix as fm
from .conftest import write_cluster

pytestmark = pytest.mark.timeout(900)


def mpirun_yaml(tmp_path, engine, nodes: str, extra: str = "", env: str = "") -> object:
    return write_cluster(tmp_path / "mpirun.yaml", f"""
launcher: mpirun
engine: {engine}
launch_dir: {tmp_path}
nodes: {nodes}
mpirun: {{{extra}}}
env: {{OMP_NUM_THREADS: "1"{env}}}
""")


def serve_mpirun(tmp_path, tiny_engine, hosts=None) -> fm.Cell:  # noqa: F811
    engine = fm.copy_engine(tiny_engine, tmp_path)
    port, env = free_port(), {}
    if hosts is None:
        cluster = mpirun_yaml(tmp_path, engine, "[{host: localhost, slots: 3}]", "extra_args: [--oversubscribe]")
    else:
        h0, h1 = hosts.hosts
        cluster = mpirun_yaml(tmp_path, engine, f"[{{host: {h0.addr}, slots: 2}}, {{host: {h1.addr}, slots: 1}}]",
                              f"rsh_agent: launch/netns_rsh.sh, extra_args: [--mca, btl_tcp_if_include, "
                              f"{hosts.subnet}, --mca, oob_tcp_if_include, {hosts.subnet}]")
        env = {"DIST_INFER_NETNS_HOSTS": hosts.netns_map(), **NETNS_NO_DNS_ENV}
    log = tmp_path / "launch.log"
    proc = fm.start_launch(cluster, log, port, "127.0.0.1", env)
    cell = fm.Cell("mpirun", "two hosts" if hosts else "one host", f"http://127.0.0.1:{port}", proc, log, engine,
                   fm.command_rank_pid(engine), fm.host_namer(hosts))
    cell.stop = lambda: os.kill(proc.pid, signal.SIGTERM)
    return cell


@pytest.fixture(params=["one host", "two hosts"])
def topology(request):
    if request.param == "one host":
        return None
    return request.getfixturevalue("two_hosts")


def test_mpirun_restart_faults(tmp_path, tiny, topology, request):  # noqa: F811
    cell = serve_mpirun(tmp_path, tiny[0](1, 3), topology)
    try:
        fm.run_restart_faults(fm.wait_up(cell), request)
    finally:
        fm.end(cell)


def test_mpirun_corrupt_engine_file_at_restart(tmp_path, tiny, topology, request):  # noqa: F811
    fm.skip_unless_every_fault(topology is not None)
    cell = serve_mpirun(tmp_path, tiny[0](1, 3), topology)
    try:
        fm.corrupt_engine_file_at_restart(cell, request)
    finally:
        fm.end(cell)
