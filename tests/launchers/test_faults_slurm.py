"""The fault matrix under Slurm (tests/launchers/fault_matrix.py), against real daemons started
here: `dist-infer launch --cluster slurm.yaml -- serve --restart N`; the batch shell runs the
front-end and its supervisor, which runs the ranks as an `srun` step and runs the step again in
the same allocation when it fails. One host: partition `local`, a TP=1 x PP=3 tiny Llama. Two
network-namespace hosts: partition `two`, TP=2 x PP=2 (Slurm puts the same number of tasks on
each node), ranks 0-1 on n0 (with the front-end), 2-3 on n1. SIGTERM is what `scancel
--signal=TERM` sends to the step's tasks (plain `scancel` would mark the job CANCELLED)."""

from __future__ import annotations

import sys

import pytest

from conftest import NETNS_NO_DNS_ENV
from serve.conftest import tiny  # noqa: F401 (the tiny engines the serve tests build)
from serve.server import free_port

from . import fault_matrix as fm
from .conftest import write_cluster
from .daemons import SlurmCluster

pytestmark = pytest.mark.timeout(900)


def serve_slurm(tmp_path, tiny, slurm, two: bool, job: str) -> fm.Cell:  # noqa: F811
    engine = fm.copy_engine(tiny[0](2, 2) if two else tiny[0](1, 3), tmp_path)
    nodes = "partition: two, nodes: 2, ntasks_per_node: 2" if two else "partition: local, nodes: 1, ntasks_per_node: 3"
    cluster = write_cluster(tmp_path / "slurm.yaml", f"""
launcher: slurm
engine: {engine}
launch_dir: {tmp_path}
slurm: {{{nodes}, ranks: srun, mpi: pmix, time: "00:15:00", job_name: {job}, cpus_per_task: 1,
        setup: "source {sys.prefix}/bin/activate"}}
env: {{OMP_NUM_THREADS: "1"}}
""")
    port, host = free_port(), slurm.hosts.hosts[0].addr if two else "127.0.0.1"
    env = {**slurm.env, **(NETNS_NO_DNS_ENV if two else {})}
    proc = fm.start_launch(cluster, tmp_path / "launch.log", port, "0.0.0.0" if two else host, env)
    cell = fm.Cell("slurm", "two hosts" if two else "one host", f"http://{host}:{port}", proc,
                   tmp_path / "launch.log", engine, fm.command_rank_pid(engine), fm.host_namer(slurm.hosts),
                   world=4 if two else 3)
    cell.stop = lambda: slurm.cmd("scancel", "--signal=TERM", job_id(slurm, job))
    return cell


def job_id(slurm: SlurmCluster, job: str) -> str:
    jobs = slurm.cmd("squeue", "-h", "-o", "%i", "-n", job).stdout.split()
    assert len(jobs) == 1, jobs
    return jobs[0]


@pytest.mark.parametrize("two", [False, True], ids=["one host", "two hosts"])
def test_slurm_restart_faults(tmp_path, tiny, slurm, two, request):  # noqa: F811
    cell = serve_slurm(tmp_path, tiny, slurm, two, "difaults")
    try:
        fm.run_restart_faults(fm.wait_up(cell), request)
    finally:
        fm.end(cell)
        slurm.cmd("scancel", "-n", "difaults", check=False)


@pytest.mark.parametrize("two", [False, True], ids=["one host", "two hosts"])
def test_slurm_corrupt_engine_file_at_restart(tmp_path, tiny, slurm, two, request):  # noqa: F811
    fm.skip_unless_every_fault(two)
    cell = serve_slurm(tmp_path, tiny, slurm, two, "dicorrupt")
    try:
        fm.corrupt_engine_file_at_restart(cell, request)
    finally:
        fm.end(cell)
        slurm.cmd("scancel", "-n", "dicorrupt", check=False)
