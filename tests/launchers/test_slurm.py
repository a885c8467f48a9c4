"""`dist-infer launch` with launcher: slurm against real daemons started here:
a private munged, slurmctld, and slurmd on this machine (partition `local`)
plus one slurmd per namespace host (partition `two`). The launcher fills
launch/sbatch.template.sh and submits it with `sbatch --wait`."""

from __future__ import annotations

import shutil
import sys

import pytest

from .conftest import PP, RANK_WRAPPER, TP, launch, ok, rank_hosts, require, tokens, write_cluster
from .daemons import SlurmCluster



@pytest.fixture(autouse=True)
def _slurm_installed():
    require(None if shutil.which("slurmctld") and shutil.which("sbatch")
            else "Slurm is not installed: run scripts/ci_system_deps.sh")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, two_hosts):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), two_hosts)
    yield cluster
    cluster.stop()


def slurm_yaml(tmp_path, engine, slurm_opts: str, ranks_dir=None) -> str:
    command = f"command: [{RANK_WRAPPER}, {sys.executable}]\n" if ranks_dir else ""
    extra_env = f", DIST_INFER_TEST_RANK_DIR: {ranks_dir}" if ranks_dir else ""
    return write_cluster(tmp_path / "slurm.yaml", f"""
launcher: slurm
engine: {engine.dir}
launch_dir: {tmp_path}
{command}slurm: {{{slurm_opts}, time: "00:05:00", job_name: ditest}}
env: {{OMP_NUM_THREADS: "1"{extra_env}}}
""")


@pytest.mark.parametrize("opts", ["ranks: srun, mpi: pmix", "ranks: mpirun, mpirun_args: [--bind-to, none]",
                                  "ranks: srun, mpi: none"],
                         ids=["srun-pmix", "mpirun-in-allocation", "srun-gloo"])
def test_slurm_one_node(tmp_path, engine, slurm, opts):
    cluster = slurm_yaml(tmp_path, engine, f"partition: local, nodes: 1, ntasks_per_node: {TP * PP}, {opts}")
    proc = ok(launch(cluster, engine.run_args, timeout=240, env=slurm.env))
    assert tokens(proc) == engine.reference
    assert "#SBATCH --partition=local" in (tmp_path / "slurm.sbatch").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("opts", ["ranks: srun, mpi: pmix", "ranks: srun, mpi: none"], ids=["srun-pmix", "srun-gloo"])
def test_slurm_two_hosts(tmp_path, engine, slurm, opts):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    cluster = slurm_yaml(tmp_path, engine, f"partition: two, nodes: 2, ntasks_per_node: {TP}, {opts}", ranks)
    proc = ok(launch(cluster, engine.run_args, timeout=240, env=slurm.env))
    assert tokens(proc) == engine.reference
    h0, h1 = (h.name for h in slurm.hosts.hosts)
    assert rank_hosts(ranks) == {0: h0, 1: h0, 2: h1, 3: h1}


def test_slurm_wrong_mpi_plugin_is_refused(tmp_path, engine, slurm):
    """OpenMPI under `srun --mpi=pmi2` does not fail by itself: every rank starts
    alone with MPI size 1. dist_infer must refuse and name the right flag."""
    cluster = slurm_yaml(tmp_path, engine, f"partition: local, nodes: 1, ntasks_per_node: {TP * PP}, "
                                           "ranks: srun, mpi: pmi2")
    proc = launch(cluster, engine.run_args, timeout=240, env=slurm.env)
    assert proc.returncode != 0
    assert "Slurm started 4 tasks but MPI sees a world of 1" in proc.stdout
    assert "Use `srun --mpi=pmix` for OpenMPI" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert '"output_ids"' not in proc.stdout
