"""`dist-infer launch` with launcher: mpirun — one host, and two hosts (network
namespaces, mpirun "ssh"-ing in through launch/netns_rsh.sh). Real mpirun,
real ranks; tokens must equal the single-process run."""

from __future__ import annotations

import sys

import pytest

from conftest import NETNS_NO_DNS_ENV

from .conftest import RANK_WRAPPER, TP, PP, launch, ok, rank_hosts, tokens, write_cluster


def test_mpirun_one_host(tmp_path, engine):
    cluster = write_cluster(tmp_path / "local.yaml", f"""
launcher: mpirun
engine: {engine.dir}
launch_dir: {tmp_path}
nodes: [{{host: localhost, slots: {TP * PP}}}]
mpirun: {{extra_args: [--oversubscribe]}}
env: {{OMP_NUM_THREADS: "1"}}
""")
    proc = ok(launch(cluster, engine.run_args, timeout=180))
    assert tokens(proc) == engine.reference
    assert (tmp_path / "local.hostfile").read_text() == f"localhost slots={TP * PP}\n"


@pytest.mark.slow
def test_mpirun_two_hosts(tmp_path, engine, two_hosts):
    h0, h1 = two_hosts.hosts
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    cluster = write_cluster(tmp_path / "two.yaml", f"""
launcher: mpirun
engine: {engine.dir}
launch_dir: {tmp_path}
command: [{RANK_WRAPPER}, {sys.executable}]
nodes:
  - {{host: {h0.addr}, slots: {TP}}}
  - {{host: {h1.addr}, slots: {TP}}}
mpirun:
  rsh_agent: launch/netns_rsh.sh
  extra_args: [--mca, btl_tcp_if_include, {two_hosts.subnet}, --mca, oob_tcp_if_include, {two_hosts.subnet}]
env: {{OMP_NUM_THREADS: "1", DIST_INFER_TEST_RANK_DIR: {ranks}}}
""")
    proc = ok(launch(cluster, engine.run_args, timeout=180,
                     env={"DIST_INFER_NETNS_HOSTS": two_hosts.netns_map(), **NETNS_NO_DNS_ENV}))
    assert tokens(proc) == engine.reference
    # TP groups inside a host, the pipeline across the two
    assert rank_hosts(ranks) == {0: h0.name, 1: h0.name, 2: h1.name, 3: h1.name}
