"""A two-node Ray cluster: the head in one namespace host, a worker in the
other; `ray job submit` from outside. Each pipeline stage's TP ranks are
packed on one node, the two stages land on different nodes."""

from __future__ import annotations

import pytest

from conftest import NETNS_NO_DNS_ENV

from .conftest import PP, TP, launch, ok, tokens
from .daemons import RayCluster
from .test_ray import _ray_installed, rank_nodes, ray_daemon_env, ray_yaml  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def ray_two(tmp_path_factory, two_hosts):
    # TP CPUs per node: a stage fits on a node, two stages do not. Both nodes (and the job's
    # driver and rank actors they start) run on the namespace hosts: no DNS waits.
    with ray_daemon_env(**NETNS_NO_DNS_ENV):
        cluster = RayCluster(tmp_path_factory.mktemp("ray2"), list(two_hosts.hosts), cpus=[TP, TP])
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_ray_job_submit_two_hosts(tmp_path, engine, ray_two, two_hosts):
    cluster = ray_yaml(tmp_path, engine, f"address: '{ray_two.job_url}', submit: true")
    proc = ok(launch(cluster, engine.run_args, timeout=300))
    assert tokens(proc) == engine.reference
    h0, h1 = two_hosts.hosts
    nodes = rank_nodes(proc.stdout + proc.stderr)
    assert len(nodes) == TP * PP, nodes
    stages = [set(nodes[stage * TP:(stage + 1) * TP]) for stage in range(PP)]
    assert all(len(s) == 1 for s in stages), f"a TP group spans nodes: {nodes}"
    assert set.union(*stages) == {h0.addr, h1.addr}, f"the stages share a node: {nodes}"
