"""`dist-infer launch` with launcher: slurm against real daemons started here:
a private munged, slurmctld, and slurmd on this machine (partition `local`)
plus one slurmd per namespace host (partition `two`). The launcher fills
launch/sbatch.template.sh and submits it with `sbatch --wait`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from conftest import NETNS_NO_DNS_ENV, REPO, free_port

from .conftest import PP, RANK_WRAPPER, TP, launch, ok, rank_hosts, tokens, wait_healthy, write_cluster


def slurm_yaml(tmp_path, engine, slurm_opts: str, ranks_dir=None, command=None) -> str:
    """The job finds this venv through slurm.setup (the launcher names no local path itself);
    rank commands default to `python3 -m dist_infer` on the activated PATH."""
    if ranks_dir:
        command = [str(RANK_WRAPPER), sys.executable]
    extra_env = f", DIST_INFER_TEST_RANK_DIR: {ranks_dir}" if ranks_dir else ""
    return write_cluster(tmp_path / "slurm.yaml", f"""
launcher: slurm
engine: {engine.dir}
launch_dir: {tmp_path}
{f"command: {json.dumps(command)}" if command else ""}
slurm: {{{slurm_opts}, time: "00:05:00", job_name: ditest, cpus_per_task: 1,
        setup: "source {sys.prefix}/bin/activate"}}
env: {{OMP_NUM_THREADS: "1"{extra_env}}}
""")


@pytest.mark.parametrize("opts", ["ranks: srun, mpi: pmix", "ranks: mpirun, mpirun_args: [--bind-to, none]",
                                  "ranks: srun, mpi: none"],
                         ids=["srun-pmix", "mpirun-in-allocation", "srun-gloo"])
def test_slurm_one_node(tmp_path, engine, slurm, opts):
    cluster = slurm_yaml(tmp_path, engine, f"partition: local, nodes: 1, ntasks_per_node: {TP * PP}, {opts}")
    proc = ok(launch(cluster, engine.run_args, timeout=240, env=slurm.env))
    assert tokens(proc) == engine.reference
    script = (tmp_path / "slurm.sbatch").read_text()
    assert "#SBATCH --partition=local" in script and "#SBATCH --cpus-per-task=1" in script
    assert "DIST_INFER=(python3 -m dist_infer)" in script  # found through slurm.setup on the node


def test_slurm_serve_prints_url(tmp_path, engine, slurm):
    """`-- serve`: the job announces rank 0's node address and the port before the
    ranks start (the ranks here just echo their arguments instead of serving)."""
    cluster = slurm_yaml(tmp_path, engine, f"partition: two, nodes: 2, ntasks_per_node: {TP}, mpi: none",
                         command=["/bin/echo", "rank-args:"])
    proc = ok(launch(cluster, ["serve", "--port", "8123"], timeout=120, env=slurm.env))
    h0 = slurm.hosts.hosts[0]
    out = proc.stdout
    assert f"dist_infer: serving at http://{h0.addr}:8123" in out, out
    assert out.index("serving at") < out.index("rank-args: serve --engine")


@pytest.mark.slow
@pytest.mark.parametrize("opts", ["ranks: srun, mpi: pmix", "ranks: srun, mpi: none"], ids=["srun-pmix", "srun-gloo"])
def test_slurm_two_hosts(tmp_path, engine, slurm, opts):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    cluster = slurm_yaml(tmp_path, engine, f"partition: two, nodes: 2, ntasks_per_node: {TP}, {opts}", ranks)
    # The job (sbatch passes on the submitting environment) runs on the namespace hosts: no DNS waits.
    proc = ok(launch(cluster, engine.run_args, timeout=240, env={**slurm.env, **NETNS_NO_DNS_ENV}))
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


def test_slurm_serve_answers_and_scancel_drains(tmp_path, engine, slurm):
    """A real `serve` job under sbatch/srun: it answers over HTTP at the URL it prints, and
    `scancel --signal=TERM` (SIGTERM to every task) drains it to a clean exit 0."""
    port = free_port()
    env = {**os.environ, **slurm.env}
    cluster = slurm_yaml(tmp_path, engine, f"partition: local, nodes: 1, ntasks_per_node: {TP * PP}, "
                                           "ranks: srun, mpi: pmix")
    cmd = [sys.executable, "-m", "dist_infer", "launch", "--cluster", str(cluster), "--", "serve", "--host",
           "127.0.0.1", "--port", str(port), "--served-model-name", "tiny"]
    log_path, url = tmp_path / "launch.log", f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True, env=env)
    try:
        wait_healthy(url, proc, log_path)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert f"serving at {url}" in log_path.read_text()
        jobs = subprocess.run(["squeue", "-h", "-o", "%i", "-n", "ditest"], capture_output=True, text=True,
                              env=env).stdout.split()
        assert len(jobs) == 1, jobs
        subprocess.run(["scancel", "--signal=TERM", jobs[0]], check=True, env=env)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["scancel", "-n", "ditest"], env=env)
