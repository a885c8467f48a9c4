"""`dist-infer launch` with launcher: ray on a one-node Ray cluster started here
(`ray start --head`, own temp dir and ports, stopped by process group):
`ray job submit` and a driver started by `launch`; rank actors in a
placement group, a gloo world between them. (The per-step control overhead
against mpirun is measured by scripts/ray_overhead.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys

import pytest

from conftest import REPO
from .conftest import NEW_TOKENS, PP, TP, launch, ok, require, tokens, wait_healthy, write_cluster
from .daemons import RayCluster, free_port

try:
    import ray
except ImportError:
    ray = None


@pytest.fixture(autouse=True)
def _ray_installed():
    require(None if ray is not None else 'Ray is not installed: pip install "ray[default]"')

STEPS_RE = re.compile(r"(\d+) tokens in (\d+) steps \(at most \d+ in flight\), ([\d.]+) s")


@contextlib.contextmanager
def ray_daemon_env(**env: str):
    """The environment `ray start` gets (RayCluster passes on this process's). On SIGTERM a Ray
    node drains for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) before it stops, so
    RayCluster.stop() used to wait out its 10 s grace for each cluster: nothing here needs
    that drain (the jobs have ended), so it is off."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **env}.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    with ray_daemon_env():
        cluster = RayCluster(tmp_path_factory.mktemp("ray"), [None], cpus=[TP * PP])
    yield cluster
    cluster.stop()


def ray_yaml(tmp_path, engine, ray_opts: str):
    """For `ray job submit` the head finds its Python only through the job's runtime_env:
    `ray.python` names a command that exists only in a directory that runtime_env's PATH
    adds, so the job fails if the launcher drops either."""
    if "submit: true" in ray_opts:
        bin_dir = tmp_path / "head-bin"
        bin_dir.mkdir(exist_ok=True)
        python = bin_dir / "ditest-python"
        python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        path = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        ray_opts += f", python: ditest-python, runtime_env: {{env_vars: {{PATH: '{path}'}}}}"
    return write_cluster(tmp_path / "ray.yaml", f"""
launcher: ray
engine: {engine.dir}
ray: {{{ray_opts}, timeout_s: 200}}
env: {{OMP_NUM_THREADS: "1"}}
""")


def rank_nodes(output: str) -> list[str]:
    """The driver's log line: which node each rank's actor landed on."""
    found = re.search(r"ranks on nodes (\[[^\]]*\])", output)
    assert found, output[-3000:]
    return json.loads(found.group(1).replace("'", '"'))


BENCH_TOKENS = 48  # steps per run of the overhead comparison


def bench_args(engine) -> list[str]:
    """engine.run_args with BENCH_TOKENS new tokens instead of NEW_TOKENS."""
    args = [a if a != str(NEW_TOKENS) else str(BENCH_TOKENS) for a in engine.run_args]
    assert args != engine.run_args
    return args


def assert_reference_tokens(proc, engine, what: str) -> None:
    """Greedy decoding: a longer run's first NEW_TOKENS tokens are the single-process reference."""
    assert [t[:NEW_TOKENS] for t in tokens(proc)] == engine.reference, what


@pytest.fixture(scope="module")
def job_submit_run(tmp_path_factory, engine, ray_local):
    """`ray job submit` (ray.submit: true) of a 48-step generation."""
    tmp_path = tmp_path_factory.mktemp("ray-submit")
    cluster = ray_yaml(tmp_path, engine, f"address: '{ray_local.job_url}', submit: true")
    return ok(launch(cluster, bench_args(engine), timeout=240))


def test_ray_job_submit_one_node(engine, job_submit_run):
    proc = job_submit_run
    assert_reference_tokens(proc, engine, "ray job submit")
    assert "succeeded" in proc.stdout  # ray job submit's verdict
    assert len(set(rank_nodes(proc.stdout + proc.stderr))) == 1


def steps_per_s(proc) -> float:
    """The generation's steps/s from the run's summary line (scripts/ray_overhead.py compares them)."""
    m = STEPS_RE.findall(proc.stdout + proc.stderr)
    assert m, (proc.stdout + proc.stderr)[-3000:]
    _, steps, seconds = m[-1]
    return int(steps) / float(seconds)


def test_ray_driver_started_by_launch(tmp_path, engine, ray_local):
    """A driver started by `dist-infer launch` (ray.submit: false) on the running cluster: the
    rank actors reproduce the single-process tokens. (Ray's per-step overhead against mpirun
    is a benchmark: scripts/ray_overhead.py.)"""
    cluster = ray_yaml(tmp_path, engine, f"address: '{ray_local.gcs_address}', submit: false")
    proc = ok(launch(cluster, bench_args(engine), timeout=240))
    assert_reference_tokens(proc, engine, "ray driver")
    assert steps_per_s(proc) > 0 and len(set(rank_nodes(proc.stdout + proc.stderr))) == 1


def test_ray_serve_answers_and_drains(tmp_path, engine, ray_local):
    """`-- serve` under Ray actors: rank 0's actor starts the HTTP front-end; SIGTERM to the
    front-end drains the engine, the ranks return and the driver exits 0."""
    import signal
    import subprocess

    import httpx

    port = free_port()
    cluster = ray_yaml(tmp_path, engine, f"address: '{ray_local.gcs_address}', submit: false")
    log_path, url = tmp_path / "launch.log", f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dist_infer", "launch", "--cluster", str(cluster), "--", "serve",
                             "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        wait_healthy(url, proc, log_path)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        frontend = subprocess.run(["pgrep", "-f", f"dist_infer.serve.api_server.*--port {port}"],
                                  capture_output=True, text=True).stdout.split()
        assert len(frontend) == 1, frontend
        os.kill(int(frontend[0]), signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_rank_actors_compile_with_the_cpus_they_hold():
    """Ray shows each rank actor one GPU and pins no CPUs: its Triton compile workers are the
    CPUs it asked for (at most the engine's cap), unless the job's env says otherwise."""
    from dist_infer.engine.kernel_compile import MAX_WORKERS, WORKERS_ENV
    from dist_infer.launchers.ray_driver import rank_env

    assert rank_env({}, 4) == {WORKERS_ENV: "4"}
    assert rank_env({}, 0.5) == {WORKERS_ENV: "1"}
    assert rank_env({"A": "b"}, 64) == {WORKERS_ENV: str(MAX_WORKERS), "A": "b"}
    assert rank_env({WORKERS_ENV: "0"}, 4) == {WORKERS_ENV: "0"}
