"""Cluster file -> the real launch: an mpirun command line with a hostfile, an
sbatch script, or a Ray job (`ray job submit` or a local Ray driver).

`plan_launch` only computes (no side effects), so `--dry-run` prints exactly
what `launch` then runs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_infer.config import Mapping
from dist_infer.launchers.cluster import ClusterConfig, ClusterConfigError

REPO = Path(__file__).resolve().parents[2]
SBATCH_TEMPLATE = REPO / "launch" / "sbatch.template.sh"
SUBCOMMANDS = ("run", "serve", "build", "bench")
SERVE_PORT = 8000                   # `dist-infer serve`'s default --port
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")  # bind addresses, not addresses a client can reach
# Batch jobs and the Ray head run on other machines: they find dist_infer on their own
# PATH (after slurm.setup / the runtime_env), never at this machine's venv path.
REMOTE_RANK_COMMAND = ("python3", "-m", "dist_infer")


@dataclass
class LaunchPlan:
    launcher: str
    argv: list[str]                                      # the command `launch` runs
    world_size: int
    files: dict[Path, str] = field(default_factory=dict)  # written before argv runs (hostfile, batch script)
    output: Path | None = None                            # Slurm: the job's output file (%j = job id)
    wait: bool = False                                    # Slurm: wait for the job, print its output
    serving: str | None = None                            # `serve`: the URL the server listens on
    supervised: bool = False                              # `serve --restart N`: argv runs the front-end

    def render(self) -> str:
        lines = [f"# {self.launcher}: {self.world_size} ranks"]
        if self.serving:
            lines.append(f"# dist_infer: serving at {self.serving}")
        for path, text in self.files.items():
            lines += [f"# --- {path}", text.rstrip("\n"), f"# --- end of {path}"]
        lines.append(shlex.join(self.argv))
        if self.wait:
            lines.append(f"# then: wait for the job (scontrol show job ID) and print {self.output}")
        return "\n".join(lines) + "\n"

    def write_files(self) -> None:
        for path, text in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if text.startswith("#!"):
                path.chmod(0o755)


def rank_command(cluster: ClusterConfig, default: tuple[str, ...] | None = None) -> list[str]:
    """How one rank starts dist_infer: the cluster's `command`, else `default`, else this
    Python (mpirun: the hosts share this machine's install, as mpirun itself assumes)."""
    if cluster.command:
        return list(cluster.command)
    return list(default) if default else [sys.executable, "-m", "dist_infer"]


def serve_address(run_args: list[str]) -> tuple[str | None, int] | None:
    """For `serve`: (host a client should use, or None for rank 0's node; port).
    None for other sub-commands."""
    sub = _subcommand(run_args)
    if sub != "serve":
        return None
    port = _flag_value(run_args, "--port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ClusterConfigError(f"`serve --port {port}`: the port must be a number from 1 to 65535 "
                                 f"(default {SERVE_PORT}).")
    host = _flag_value(run_args, "--host")
    return (None if host is None or host in WILDCARD_HOSTS else host), int(port) if port else SERVE_PORT


def _subcommand(run_args: list[str]) -> str | None:
    """The sub-command in the ranks' args (after global flags such as --log-level L)."""
    i = 0
    while i < len(run_args) and run_args[i].startswith("-"):
        i += 1 if "=" in run_args[i] else 2
    return run_args[i] if i < len(run_args) else None


def dist_infer_args(cluster: ClusterConfig, args: list[str], log_level: str | None = None) -> tuple[list[str], str | None]:
    """The `run|serve ...` arguments every rank gets, with --engine (from the
    cluster file) and --device cuda (GPU clusters) added when not given.
    Returns (args, engine)."""
    args = list(args)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0].startswith("-"):
        args = ["run", *args]
    if args[0] not in SUBCOMMANDS:
        raise ClusterConfigError(f"`dist-infer launch ... -- {args[0]}`: the ranks run a dist-infer sub-command; "
                                 f"use one of {', '.join(SUBCOMMANDS)} (e.g. `-- run --prompt Hi`).")
    if args[0] in ("run", "serve") and _flag_value(args, "--engine") is None:
        if not cluster.engine:
            raise ClusterConfigError(f"{cluster.path}: no engine: add `engine: DIR` to the cluster file or pass "
                                     "`-- run --engine DIR ...`.")
        args[1:1] = ["--engine", cluster.engine]
    # Ranks may start in another directory (Ray workers, batch jobs): paths are made absolute.
    for flag in ("--engine", "--prompts-file", "--checkpoint", "--out"):
        _absolute(args, flag)
    engine = _flag_value(args, "--engine")
    if cluster.gpus_per_node and args[0] in ("run", "serve") and _flag_value(args, "--device") is None:
        args += ["--device", "cuda"]
    if log_level:
        args = ["--log-level", log_level, *args]
    return args, engine


def _absolute(args: list[str], flag: str) -> None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args) and args[i + 1] != "-":
            args[i + 1] = str(Path(args[i + 1]).absolute())
        elif a.startswith(flag + "=") and a != flag + "=-":
            args[i] = f"{flag}={Path(a.split('=', 1)[1]).absolute()}"


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def plan_launch(cluster: ClusterConfig, args: list[str], log_level: str | None = None) -> LaunchPlan:
    """log_level: passed on to every rank (`dist-infer --log-level L launch ...`)."""
    run_args, engine = dist_infer_args(cluster, args, log_level)
    mapping = cluster.mapping(engine)
    builder = {"mpirun": _plan_mpirun, "slurm": _plan_slurm, "ray": _plan_ray}[cluster.launcher]
    return builder(cluster, mapping, run_args)


def _launch_dir(cluster: ClusterConfig) -> Path:
    return Path(cluster.launch_dir).absolute()


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def mpirun_binary(configured: str | None = None) -> str:
    if configured:
        return configured
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else (shutil.which("mpirun") or "mpirun")


# ----------------------------------------------------------------- mpirun

def _plan_mpirun(cluster: ClusterConfig, mapping: Mapping, run_args: list[str]) -> LaunchPlan:
    n = mapping.world_size
    opts = cluster.mpirun
    slots = sum(node.slots for node in cluster.nodes)
    if slots < n and "--oversubscribe" not in opts.extra_args:
        raise ClusterConfigError(
            f"{cluster.path}: the nodes have {slots} slots but the engine needs {n} ranks "
            f"(tp={mapping.tp} x pp={mapping.pp}); add nodes or slots, or add --oversubscribe to "
            "mpirun.extra_args to run several ranks per slot.")
    if cluster.gpus_per_node:
        over = [node.host for node in cluster.nodes if node.slots > cluster.gpus_per_node]
        if over:
            raise ClusterConfigError(f"{cluster.path}: nodes {over} have more slots than gpus_per_node="
                                     f"{cluster.gpus_per_node}; one rank runs per GPU.")
    hostfile = _launch_dir(cluster) / f"{cluster.name}.hostfile"
    text = "".join(f"{node.host} slots={node.slots}\n" for node in cluster.nodes)
    argv = [mpirun_binary(opts.binary), "-n", str(n), "--hostfile", str(hostfile)]
    if _is_root():
        argv.append("--allow-run-as-root")
    if opts.rsh_agent:
        argv += ["--mca", "plm_rsh_agent", str(Path(opts.rsh_agent).absolute())]
    for name, value in cluster.env.items():
        argv += ["-x", f"{name}={value}"]
    argv += opts.extra_args
    serve = serve_address(run_args)
    if restarts(run_args):
        # serve --restart N: this machine runs the front-end + supervisor, which runs mpirun (again).
        first = cluster.nodes[0].host  # rank 0's node: it connects back to this machine
        host = "127.0.0.1" if all(_is_local(node.host) for node in cluster.nodes) else _address_towards(first)
        argv = supervisor_command(run_args, argv, rank_command(cluster), host)
        serving = f"http://{serve[0] or host}:{serve[1]}"
        return LaunchPlan("mpirun", argv, n, {hostfile: text}, serving=serving, supervised=True)
    argv += [*rank_command(cluster), *run_args]
    # mpirun fills the hostfile's slots in order, so rank 0 runs on the first node.
    serving = f"http://{serve[0] or cluster.nodes[0].host}:{serve[1]}" if serve else None
    return LaunchPlan("mpirun", argv, n, {hostfile: text}, serving=serving)


def restarts(run_args: list[str]) -> bool:
    """`serve --restart N` with N >= 1: a supervised server (dist_infer/serve/supervisor.py)."""
    value = _flag_value(run_args, "--restart") if _subcommand(run_args) == "serve" else None
    return value is not None and value not in ("0", "")


def supervisor_command(run_args: list[str], launcher: list[str], rank: list[str], control_host: str,
                       python: tuple[str, ...] | None = None) -> list[str]:
    """`dist-infer serve --restart N ...` told how to start the ranks: the launcher's command
    (mpirun, srun), then each rank's `dist-infer` command."""
    return [*(python or (sys.executable, "-m", "dist_infer")), *run_args, "--launcher-cmd", shlex.join(launcher),
            "--rank-cmd", shlex.join(rank), "--control-host", control_host]


def _address_towards(host: str) -> str:
    """This machine's address on its route to `host` (a UDP connect sends nothing; the hostname's
    own address is often a loopback one in /etc/hosts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()


def _is_local(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host == socket.gethostname()


# ----------------------------------------------------------------- slurm

def _plan_slurm(cluster: ClusterConfig, mapping: Mapping, run_args: list[str]) -> LaunchPlan:
    n, s = mapping.world_size, cluster.slurm
    per_node = _tasks_per_node(cluster, mapping)
    launch_dir = _launch_dir(cluster)
    output = Path(s.output).absolute() if s.output else launch_dir / f"{s.job_name}-%j.out"
    serve = serve_address(run_args)
    mpirun_args = (["--allow-run-as-root"] if _is_root() else []) + list(s.mpirun_args)
    fields = {
        "JOB_NAME": s.job_name, "NODES": str(s.nodes), "NTASKS_PER_NODE": str(per_node), "NTASKS": str(n),
        "OUTPUT": str(output), "SBATCH_LINES": "\n".join(_sbatch_lines(cluster)),
        "SETUP": _setup_block(s.setup), "COMMAND": shlex.join(rank_command(cluster, REMOTE_RANK_COMMAND)),
        "RUN_ARGS": shlex.join(run_args), "RANKS": s.ranks, "SRUN_MPI": s.mpi,
        "ENV_EXPORTS": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in cluster.env.items()),
        "SERVE_LINE": _serve_echo(serve) if serve else "",
        # mpirun inside the allocation: the compute node's own (on PATH after slurm.setup).
        "SRUN_ARGS": shlex.join(s.srun_args), "MPIRUN": "mpirun", "MPIRUN_ARGS": shlex.join(mpirun_args),
        "SUPERVISE": "yes" if restarts(run_args) else "no",
    }
    script = fill_template(SBATCH_TEMPLATE.read_text(), fields)
    path = launch_dir / f"{cluster.name}.sbatch"
    # No `sbatch --wait`: it polls with a backoff of up to 30 s; `launch` polls the job itself.
    argv = ["sbatch", "--parsable", str(path)]
    serving = f"http://{serve[0] or '<rank 0 node>'}:{serve[1]}" if serve else None
    return LaunchPlan("slurm", argv, n, {path: script}, output=output, wait=s.wait, serving=serving)


def _tasks_per_node(cluster: ClusterConfig, mapping: Mapping) -> int:
    n, s = mapping.world_size, cluster.slurm
    per_node = s.ntasks_per_node or -(-n // s.nodes)
    if per_node * s.nodes != n:
        raise ClusterConfigError(
            f"{cluster.path}: slurm.nodes={s.nodes} x ntasks_per_node={per_node} = {per_node * s.nodes} tasks, but "
            f"the engine needs exactly {n} ranks (tp={mapping.tp} x pp={mapping.pp}); choose nodes and "
            "ntasks_per_node whose product is the rank count.")
    gpus = per_node * (s.gpus_per_task or 0)
    if cluster.gpus_per_node and gpus > cluster.gpus_per_node:
        raise ClusterConfigError(
            f"{cluster.path}: {per_node} ranks per node x slurm.gpus_per_task={s.gpus_per_task} = {gpus} GPUs, but "
            f"gpus_per_node={cluster.gpus_per_node}; use more slurm.nodes (fewer ranks per node) or fewer "
            "GPUs per task.")
    return per_node


def _sbatch_lines(cluster: ClusterConfig) -> list[str]:
    """#SBATCH lines beyond the template's fixed ones, in sbatch's flag names."""
    s = cluster.slurm
    options = (("partition", s.partition), ("time", s.time), ("account", s.account),
               # Per task, not per node: srun then binds each rank to its own GPU(s)
               # (CUDA_VISIBLE_DEVICES per task) and gives it its CPU cores.
               ("gpus-per-task", s.gpus_per_task), ("cpus-per-task", s.cpus_per_task))
    lines = [f"#SBATCH --{flag}={value}" for flag, value in options if value]
    return lines + [f"#SBATCH {a}" for a in s.sbatch_args]


def _serve_echo(serve: tuple[str | None, int]) -> str:
    """The batch script's line announcing the server's URL; rank 0's node is only known
    once the job runs ($MASTER_ADDR, computed above it in the template)."""
    host, port = serve
    if host is None:
        host = "$MASTER_ADDR"
    else:  # --host came from the command line: inside double quotes it must stay literal
        host = "".join("\\" + c if c in '"$`\\' else c for c in host)
    return f'echo "dist_infer: serving at http://{host}:{port}" >&2'


def _setup_block(setup: str | None) -> str:
    # Site scripts (venv activate, `module load`) often read unset variables: -u is off while they run.
    return f"set +u\n{setup}\nset -u" if setup else ""


def fill_template(text: str, fields: dict[str, str]) -> str:
    """Replace @KEY@ fields; a line holding only an empty field is dropped."""
    out = []
    for line in text.split("\n"):
        alone = line.strip()
        if alone.startswith("@") and alone.endswith("@") and fields.get(alone[1:-1]) == "":
            continue
        for key, value in fields.items():
            line = line.replace(f"@{key}@", value)
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------- ray

def _plan_ray(cluster: ClusterConfig, mapping: Mapping, run_args: list[str]) -> LaunchPlan:
    r = cluster.ray
    # submit: the driver runs on the head, with the head's Python (ray.python);
    # otherwise it runs here, with this Python.
    python = shlex.split(r.python) if r.submit else [sys.executable]
    driver = [*python, "-m", "dist_infer.launchers.ray_driver",
              "--tp", str(mapping.tp), "--pp", str(mapping.pp),
              "--cpus-per-rank", f"{r.cpus_per_rank:g}", "--gpus-per-rank", "1" if cluster.gpus_per_node else "0"]
    if not r.submit:
        driver += ["--address", r.address]
    if r.timeout_s:
        driver += ["--timeout", f"{r.timeout_s:g}"]
    for name, value in cluster.env.items():
        driver += ["--env", f"{name}={value}"]
    driver += ["--", *run_args]
    serve = serve_address(run_args)
    # serve --restart N: the driver runs the front-end (on this machine, or the head with submit)
    where = "<the driver's node>" if restarts(run_args) else "<rank 0 node>"
    serving = f"http://{serve[0] or where}:{serve[1]}" if serve else None
    if not r.submit:
        return LaunchPlan("ray", driver, mapping.world_size, serving=serving, supervised=restarts(run_args))
    ray = Path(sys.executable).parent / "ray"
    argv = [str(ray) if ray.exists() else "ray", "job", "submit", "--address", r.address,
            "--runtime-env-json", json.dumps(runtime_env(cluster), sort_keys=True), "--", *driver]
    return LaunchPlan("ray", argv, mapping.world_size, serving=serving)


def runtime_env(cluster: ClusterConfig) -> dict:
    """The job's Ray runtime_env: ray.runtime_env with the cluster's `env` added to its
    env_vars (its own env_vars win), so the driver on the head and every rank actor
    (actors inherit the job's runtime_env) see them before anything is imported."""
    env = dict(cluster.ray.runtime_env)
    env_vars = {**cluster.env, **env.get("env_vars", {})}
    if env_vars:
        env["env_vars"] = env_vars
    return env
