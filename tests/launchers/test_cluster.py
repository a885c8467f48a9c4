"""Cluster files: validation with clear errors, and `dist-infer launch --dry-run`
for each example in clusters/ (no daemons needed)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dist_infer.errors import LaunchError
from dist_infer.launchers import ClusterConfigError, load_cluster, plan_launch

from .conftest import launch, ok, write_cluster

EXAMPLES = sorted((REPO / "clusters").glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"local.yaml", "slurm.yaml", "ray.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    cluster = load_cluster(path)
    assert cluster.launcher in ("mpirun", "slurm", "ray")
    assert cluster.mapping().world_size >= 1


def test_dry_run_local(tmp_path):
    proc = ok(launch(REPO / "clusters" / "local.yaml", ["run", "--prompt", "Hi there"], dry_run=True, timeout=60))
    lines = proc.stdout.splitlines()
    assert "localhost slots=3" in lines
    argv = shlex.split(lines[-1])
    assert Path(argv[0]).name == "mpirun" and argv[1:3] == ["-n", "3"]
    hostfile = argv[argv.index("--hostfile") + 1]
    assert hostfile.endswith("local.hostfile")
    assert "OMP_NUM_THREADS=1" in argv and "--oversubscribe" in argv
    i = argv.index("-m")
    assert argv[i - 1] == sys.executable and argv[i + 1:i + 3] == ["dist_infer", "run"]
    assert argv[argv.index("--engine") + 1] == str(REPO / "out/quickstart/engine")
    assert argv[-2:] == ["--prompt", "Hi there"]


def test_dry_run_slurm():
    proc = ok(launch(REPO / "clusters" / "slurm.yaml", ["--prompt", "Hi"], dry_run=True, timeout=60))
    out = proc.stdout
    lines = out.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --ntasks=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=00:30:00", "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=8",
                 "source /shared/venv/bin/activate", "DIST_INFER=(python3 -m dist_infer)", "RANKS=srun",
                 "SRUN_MPI=pmix", "export NCCL_NVLS_ENABLE=0"):
        assert line in lines or any(x.startswith(line + " ") for x in lines), line
    # Per-task GPUs replace the per-node request (asking both can contradict on real clusters).
    assert "--gpus-per-node" not in out
    # The setup runs before any rank starts, and with -u off (activate scripts read unset variables).
    i = lines.index("source /shared/venv/bin/activate")
    assert lines[i - 1] == "set +u" and lines[i + 1] == "set -u" and i < lines.index("esac")
    assert not re.search(r"@[A-Z_]+@", out.split("#SBATCH --job-name")[1])  # every field filled
    assert "run --engine " + str(REPO / "out/engine") + " --prompt Hi --device cuda" in out
    assert "serving at" not in out  # only for `serve`
    assert out.splitlines()[-1].startswith("# then: wait for the job")
    argv = shlex.split(out.splitlines()[-2])
    assert argv[:2] == ["sbatch", "--parsable"] and argv[2].endswith("slurm.sbatch")


def _sbatch_script(tmp_path, text: str, args: list[str]) -> tuple[str, object]:
    plan = plan_launch(load_cluster(write_cluster(tmp_path / "s.yaml", text)), args)
    (script,) = plan.files.values()
    return script, plan


def test_slurm_script_has_no_path_of_this_machine(tmp_path):
    """The batch job runs on compute nodes: without `setup`/`command` in the cluster file
    the script must not name this machine's Python or venv, and asks for no GPUs on CPU."""
    script, _ = _sbatch_script(tmp_path, "launcher: slurm\nparallel: {tp: 2}\nengine: e\n", ["run"])
    assert sys.executable not in script and sys.prefix not in script
    assert str(Path(sys.executable).parent) not in script  # nor its mpirun
    assert "DIST_INFER=(python3 -m dist_infer)" in script
    assert "mpirun -n \"$SLURM_NTASKS\"" in script
    for absent in ("--gpus-per-task", "--cpus-per-task", "set +u", "serving at"):
        assert absent not in script, absent


def test_slurm_gpus_and_cpus_per_task(tmp_path):
    script, _ = _sbatch_script(tmp_path, "launcher: slurm\nparallel: {tp: 4}\nengine: e\ngpus_per_node: 8\n"
                                         "slurm: {gpus_per_task: 2, cpus_per_task: 6, setup: [module load cuda, "
                                         "source /v/bin/activate], nodes: 1}\ncommand: [dist-infer]\n", ["run"])
    lines = script.splitlines()
    for line in ("#SBATCH --gpus-per-task=2", "#SBATCH --cpus-per-task=6", "#SBATCH --ntasks=4",
                 "module load cuda", "source /v/bin/activate"):
        assert line in lines, line
    assert lines.index("module load cuda") + 1 == lines.index("source /v/bin/activate")
    assert "DIST_INFER=(dist-infer)" in script
    with pytest.raises(ClusterConfigError, match=r"4 ranks per node x slurm.gpus_per_task=2 = 8 GPUs.*use more slurm.nodes"):
        _sbatch_script(tmp_path, "launcher: slurm\nparallel: {tp: 4}\nengine: e\ngpus_per_node: 4\n"
                                 "slurm: {gpus_per_task: 2}\n", ["run"])


@pytest.mark.parametrize("args,url,echo", [
    (["serve"], "http://<rank 0 node>:8000", 'echo "dist_infer: serving at http://$MASTER_ADDR:8000" >&2'),
    (["serve", "--port", "9001", "--host", "0.0.0.0"], "http://<rank 0 node>:9001",
     'echo "dist_infer: serving at http://$MASTER_ADDR:9001" >&2'),
    (["serve", "--port=9002", "--host", "api.example"], "http://api.example:9002",
     'echo "dist_infer: serving at http://api.example:9002" >&2'),
], ids=["default", "wildcard-host", "host"])
def test_slurm_serve_url(tmp_path, args, url, echo):
    script, plan = _sbatch_script(tmp_path, "launcher: slurm\nparallel: {tp: 2}\nengine: e\n", args)
    assert plan.serving == url and f"# dist_infer: serving at {url}" in plan.render()
    lines = script.splitlines()
    # After rank 0's node address is known, before any rank starts.
    assert lines.index(echo) > next(i for i, x in enumerate(lines) if x.startswith("export MASTER_ADDR="))
    assert lines.index(echo) < next(i for i, x in enumerate(lines) if x.strip().startswith("srun "))


def test_serve_url_mpirun_and_port_check(tmp_path):
    c = load_cluster(write_cluster(tmp_path / "m.yaml", "launcher: mpirun\nengine: e\nparallel: {tp: 2}\n"
                                                        "nodes: [{host: n1, slots: 1}, {host: n2, slots: 1}]\n"))
    assert plan_launch(c, ["serve", "--port", "8100"]).serving == "http://n1:8100"
    assert plan_launch(c, ["run"]).serving is None
    with pytest.raises(ClusterConfigError, match="the port must be a number from 1 to 65535"):
        plan_launch(c, ["serve", "--port", "http"])


def test_dry_run_slurm_serve_cli():
    proc = ok(launch(REPO / "clusters" / "slurm.yaml", ["serve", "--port", "9001"], dry_run=True, timeout=60))
    assert proc.stdout.splitlines()[1] == "# dist_infer: serving at http://<rank 0 node>:9001"
    assert 'echo "dist_infer: serving at http://$MASTER_ADDR:9001" >&2' in proc.stdout.splitlines()


def test_dry_run_ray():
    proc = ok(launch(REPO / "clusters" / "ray.yaml", ["run", "--prompt", "Hi"], dry_run=True, timeout=60))
    argv = shlex.split(proc.stdout.splitlines()[-1])
    assert Path(argv[0]).name == "ray" and argv[1:5] == ["job", "submit", "--address", "http://127.0.0.1:8265"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env == {"env_vars": {"NCCL_NVLS_ENABLE": "0", "PYTHONPATH": "/shared/dist_infer"}}
    driver = argv[argv.index("--") + 1:]
    # The driver runs on the head: its Python, not this machine's.
    assert driver[:3] == ["python3", "-m", "dist_infer.launchers.ray_driver"]
    assert sys.executable not in argv
    for flag, value in (("--tp", "2"), ("--pp", "2"), ("--gpus-per-rank", "1"), ("--env", "NCCL_NVLS_ENABLE=0")):
        assert driver[driver.index(flag) + 1] == value
    rank_args = driver[driver.index("--") + 1:]
    assert rank_args == ["run", "--engine", str(REPO / "out/engine"), "--prompt", "Hi", "--device", "cuda"]


def test_dry_run_ray_driver_mode(tmp_path):
    c = write_cluster(tmp_path / "r.yaml", "launcher: ray\nengine: e\nparallel: {tp: 1, pp: 3}\n"
                                           "ray: {submit: false, address: 'head:6379'}\n")
    argv = plan_launch(load_cluster(c), ["run", "--prompt", "x"]).argv
    assert argv[1:3] == ["-m", "dist_infer.launchers.ray_driver"]
    assert argv[argv.index("--address") + 1] == "head:6379" and argv[argv.index("--pp") + 1] == "3"


def test_ray_runtime_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").mkdir()
    c = write_cluster(tmp_path / "r.yaml", "launcher: ray\nengine: e\nparallel: {tp: 1}\nenv: {A: '1', B: '2'}\n"
                                           "ray: {python: /opt/py/bin/python -X utf8, runtime_env: {working_dir: code, "
                                           "excludes: [out], env_vars: {B: '3'}, pip: [rich]}}\n")
    argv = plan_launch(load_cluster(c), ["run"]).argv
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    # Relative paths are this machine's (ray job submit uploads them); the file's env_vars win over env.
    assert runtime_env == {"working_dir": str(tmp_path / "code"), "excludes": ["out"], "pip": ["rich"],
                           "env_vars": {"A": "1", "B": "3"}}
    driver = argv[argv.index("--") + 1:]
    assert driver[:5] == ["/opt/py/bin/python", "-X", "utf8", "-m", "dist_infer.launchers.ray_driver"]


def test_workers_do_not_import_launchers_or_cli():
    """Layering: the rank actors are launcher code; workers never reach back up."""
    import ast

    for path in (REPO / "dist_infer" / "workers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("dist_infer.launchers", "dist_infer.cli")), f"{path}: imports {name}"
    assert not (REPO / "dist_infer" / "workers" / "ray_actors.py").exists()
    from dist_infer.launchers.ray_actors import RankActor  # importable without Ray

    assert RankActor.__module__ == "dist_infer.launchers.ray_actors"


def test_engine_json_sizes_the_job(tmp_path, engine):
    c = write_cluster(tmp_path / "c.yaml", f"launcher: mpirun\nengine: {engine.dir}\n"
                                           "nodes: [{host: a, slots: 2}, {host: b, slots: 2}]\n")
    plan = plan_launch(load_cluster(c), ["run", "--prompt", "x"])
    assert plan.argv[1:3] == ["-n", "4"] and list(plan.files.values()) == ["a slots=2\nb slots=2\n"]
    bad = write_cluster(tmp_path / "bad.yaml", f"launcher: mpirun\nengine: {engine.dir}\nparallel: {{tp: 4}}\n"
                                               "nodes: [{host: a, slots: 4}]\n")
    with pytest.raises(ClusterConfigError, match="built for tp=2 pp=2"):
        plan_launch(load_cluster(bad), ["run"])


BAD = [
    ("launcher: mpirun\nnodes: [{host: a}]\nparallel: {tp: 1}\nengin: x\n", "unknown key 'engin'. Did you mean 'engine'"),
    ("launcher: slurmm\n", "launcher 'slurmm' is not supported; use one of mpirun, slurm, ray (did you mean 'slurm'?)"),
    ("engine: x\n", "launcher is required"),
    ("- a\n- b\n", "the file must be a mapping"),
    ("launcher: mpirun\nparallel: {tp: 2}\n", "launcher: mpirun needs `nodes:`"),
    ("launcher: mpirun\nparallel: {tp: 0}\nnodes: [{host: a}]\n", "parallel.tp must be an integer >= 1, got 0"),
    ("launcher: mpirun\nparallel: {tp: 2}\nnodes: [{host: a, slots: two}]\n", "nodes[0].slots must be an integer"),
    ("launcher: mpirun\nparallel: {tp: 2}\nnodes: [{slots: 2}]\n", "nodes[0].host is required"),
    ("launcher: mpirun\nparallel: {tp: 2}\nnodes: [{host: a}, {host: a}]\n", "nodes lists a host twice"),
    ("launcher: mpirun\nparallel: {tp: 2}\nnodes: [{host: a}]\nslurm: {nodes: 2}\n",
     "`slurm` is for launcher: slurm, but this file says launcher: mpirun"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {mpi: openmpi}\n", "slurm.mpi must be one of pmix, pmi2, none, got 'openmpi'"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {ranks: mpirun, mpi: pmix}\n", "Remove slurm.mpi"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {nodez: 2}\n", "unknown key 'slurm.nodez'. Did you mean 'nodes'"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {wait: maybe}\n", "slurm.wait must be true or false"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {address: 'head:6379'}\n", "talks to the job server, an http:// URL"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {submit: false, address: 'http://h:8265'}\n", "use HEAD:6379 or auto"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {cpus_per_rank: -1}\n", "ray.cpus_per_rank must be a positive number"),
    ("launcher: ray\nparallel: {tp: 2}\nenv: [A, B]\n", "env must be a mapping"),
    ("launcher: ray\nparallel: {tp: 2}\nenv: {1BAD: x}\n", "env name '1BAD' is not a valid"),
    ("launcher: ray\nparallel: {tp: 2}\ngpus_per_node: -1\n", "gpus_per_node must be an integer >= 0"),
    ("launcher: ray\nparallel: [2]\n", "parallel must be a mapping"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {gpus_per_task: 1}\n",
     "slurm.gpus_per_task=1 asks for GPUs but gpus_per_node is 0, so the ranks would run on CPU; set gpus_per_node"),
    ("launcher: slurm\nparallel: {tp: 2}\ngpus_per_node: 2\nslurm: {gpus_per_task: 4}\n",
     "slurm.gpus_per_task=4 is more than gpus_per_node=2"),
    ("launcher: slurm\nparallel: {tp: 2}\ngpus_per_node: 2\nslurm: {gpus_per_task: 0}\n",
     "slurm.gpus_per_task must be an integer >= 1, got 0"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {cpus_per_task: four}\n", "slurm.cpus_per_task must be an integer >= 1"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {setup: {source: x}}\n", "slurm.setup must be a shell line or a list"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {setup: '  '}\n", "slurm.setup is empty"),
    ("launcher: slurm\nparallel: {tp: 2}\nslurm: {gpu_per_task: 1}\n",
     "unknown key 'slurm.gpu_per_task'. Did you mean 'gpus_per_task'"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {runtime_env: {workdir: .}}\n",
     "unknown key 'ray.runtime_env.workdir'. Did you mean 'working_dir'"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {runtime_env: [a]}\n", "ray.runtime_env must be a mapping"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {runtime_env: {working_dir: /nonexistent/code}}\n",
     "ray.runtime_env.working_dir '/nonexistent/code' does not exist here"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {runtime_env: {env_vars: {A: [1]}}}\n",
     "ray.runtime_env.env_vars.A must be a string or number"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {runtime_env: {config: {when: 2024-01-01}}}\n",
     "ray.runtime_env must hold only strings, numbers, lists and mappings"),
    ("launcher: ray\nparallel: {tp: 2}\nray: {python: ''}\n", "ray.python is empty"),
    ("launcher: mpirun\nparallel: {tp: 2}\nnodes: [{host: a, slots: 1}]\n", None),  # valid file, but see below
    ("launcher: mpirun\nparallel: {tp: 1}\nnodes: {host: a}\n", "nodes must be a list"),
    ("launcher: [mpirun\n", "is not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_cluster_files(tmp_path, text, message):
    path = write_cluster(tmp_path / "bad.yaml", text)
    if message is None:
        cluster = load_cluster(path)
        with pytest.raises(ClusterConfigError, match="the nodes have 1 slots but the engine needs 2 ranks"):
            plan_launch(cluster, ["run", "--engine", str(tmp_path / "none")])
        return
    with pytest.raises(ClusterConfigError) as info:
        load_cluster(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert isinstance(info.value, LaunchError)


def test_plan_errors(tmp_path):
    slurm = write_cluster(tmp_path / "s.yaml", "launcher: slurm\nparallel: {tp: 2, pp: 2}\n"
                                               "slurm: {nodes: 3}\nengine: e\n")
    with pytest.raises(ClusterConfigError, match=r"nodes=3 x ntasks_per_node=2 = 6 tasks, but the engine needs exactly 4"):
        plan_launch(load_cluster(slurm), ["run"])
    no_size = write_cluster(tmp_path / "n.yaml", "launcher: ray\nengine: /nonexistent/engine\n")
    with pytest.raises(ClusterConfigError, match="does not exist .no engine.json., so the world size is unknown"):
        plan_launch(load_cluster(no_size), ["run"])
    no_engine = write_cluster(tmp_path / "m.yaml", "launcher: ray\nparallel: {tp: 1}\n")
    with pytest.raises(ClusterConfigError, match="no engine: add `engine: DIR`"):
        plan_launch(load_cluster(no_engine), ["run", "--prompt", "x"])
    with pytest.raises(ClusterConfigError, match="use one of run, serve, build, bench"):
        plan_launch(load_cluster(no_engine), ["generate"])
    with pytest.raises(ClusterConfigError, match="does not exist"):
        load_cluster(tmp_path / "missing.yaml")


def test_cli_bad_slurm_key_is_one_clear_line(tmp_path):
    path = write_cluster(tmp_path / "bad.yaml", "launcher: slurm\nparallel: {tp: 2}\nslurm: {cpus_per_task: 0}\n")
    proc = launch(path, ["run", "--prompt", "x"], dry_run=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}: slurm.cpus_per_task must be an integer >= 1, got 0" in proc.stderr


def test_cli_bad_cluster_is_one_clear_line(tmp_path):
    path = write_cluster(tmp_path / "bad.yaml", "launcher: mpirun\nparallel: {tp: 2}\nnodes: [{host: a}]\nslurn: {}\n")
    proc = launch(path, ["run", "--prompt", "x"], dry_run=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}: unknown key 'slurn'. Did you mean 'slurm'?" in proc.stderr
