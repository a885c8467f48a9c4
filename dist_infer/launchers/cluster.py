"""Cluster files (clusters/*.yaml): where and how a job's ranks start.

```yaml
launcher: mpirun            # mpirun | slurm | ray
engine: out/engine          # built engine dir (shared storage on multi-node clusters)
parallel: {tp: 2, pp: 1}    # optional: checked against the engine; sizes dry runs without one
gpus_per_node: 0            # 0: CPU ranks; N: one rank per GPU, ranks run with --device cuda
env: {NCCL_NVLS_ENABLE: "0"}
command: [dist-infer]       # optional: how a rank starts dist_infer (default: mpirun: this Python -m dist_infer;
                            # slurm: python3 -m dist_infer on the compute node, after slurm.setup)
nodes: [{host: localhost, slots: 2}]       # mpirun only
mpirun: {extra_args: [], rsh_agent: null, binary: null}
slurm: {nodes: 1, ntasks_per_node: 2, partition: null, time: null, account: null, job_name: dist-infer,
        ranks: srun, mpi: pmix, srun_args: [], mpirun_args: [], sbatch_args: [], output: null, wait: true,
        gpus_per_task: 1, cpus_per_task: null, setup: "source /shared/venv/bin/activate"}
ray: {address: http://127.0.0.1:8265, submit: true, cpus_per_rank: 1, timeout_s: null, python: python3,
      runtime_env: {working_dir: ., env_vars: {PYTHONPATH: /shared/dist_infer}}}
```

`load_cluster` validates every key and value and raises `ClusterConfigError`
(a `LaunchError`) naming the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_infer.config import Mapping
from dist_infer.errors import DistInferError, LaunchError

LAUNCHERS = ("mpirun", "slurm", "ray")
SLURM_RANKS = ("srun", "mpirun")
SLURM_MPI = ("pmix", "pmi2", "none")


class ClusterConfigError(LaunchError):
    """A cluster file that cannot describe a launch."""


@dataclass(frozen=True)
class Node:
    host: str
    slots: int


@dataclass(frozen=True)
class MpirunOptions:
    binary: str | None = None          # default: the mpirun next to this Python, else the one on PATH
    extra_args: tuple[str, ...] = ()
    rsh_agent: str | None = None       # --mca plm_rsh_agent (e.g. launch/netns_rsh.sh)


@dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 1
    ntasks_per_node: int | None = None  # default: world size / nodes
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "dist-infer"
    ranks: str = "srun"                 # srun: one srun task per rank; mpirun: mpirun inside the allocation
    mpi: str = "pmix"                   # srun --mpi plugin; "none": gloo ranks (no MPI)
    srun_args: tuple[str, ...] = ()
    mpirun_args: tuple[str, ...] = ()   # with ranks: mpirun
    sbatch_args: tuple[str, ...] = ()
    output: str | None = None           # default: <launch_dir>/<job_name>-%j.out
    wait: bool = True                   # follow the job, print its output as it runs
    gpus_per_task: int | None = None    # default: 1 when gpus_per_node is set (one GPU per rank)
    cpus_per_task: int | None = None    # default: Slurm's (1)
    setup: str | None = None            # shell lines run on the node before the ranks (e.g. activate a venv)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None          # submit: job server URL (http://head:8265); driver: GCS (head:6379 | auto)
    submit: bool = True                 # True: `ray job submit`; False: this process is the driver
    cpus_per_rank: float = 1
    timeout_s: float | None = None
    # `ray job submit` runs the driver on the head, not here: its Python comes from
    # the head's PATH and its code/env from the runtime_env, never from this machine's paths.
    python: str = "python3"
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    launcher: str
    engine: str | None = None
    tp: int | None = None
    pp: int | None = None
    gpus_per_node: int = 0
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None
    launch_dir: str = "out/launch"
    nodes: tuple[Node, ...] = ()
    mpirun: MpirunOptions = MpirunOptions()
    slurm: SlurmOptions = SlurmOptions()
    ray: RayOptions = RayOptions()

    @property
    def name(self) -> str:
        return self.path.stem

    def mapping(self, engine: str | None = None) -> Mapping:
        """The job's layout: from the engine's engine.json when it exists (checked
        against `parallel`), else from `parallel`."""
        engine = engine or self.engine
        built = read_engine_mapping(engine) if engine else None
        if built is not None:
            if self.tp is not None and (self.tp, self.pp) != (built.tp, built.pp):
                raise ClusterConfigError(f"{self.path}: parallel says tp={self.tp} pp={self.pp} but engine {engine} "
                                         f"was built for tp={built.tp} pp={built.pp}; fix `parallel` or rebuild.")
            return built
        if self.tp is None:
            where = f"engine {engine} does not exist (no engine.json)" if engine else "no engine is given"
            raise ClusterConfigError(f"{self.path}: {where}, so the world size is unknown; build the engine or add "
                                     "`parallel: {tp: T, pp: P}`.")
        return Mapping(self.tp, self.pp)


def read_engine_mapping(engine: str | Path) -> Mapping | None:
    path = Path(engine) / "engine.json"
    if not path.is_file():
        return None
    try:
        return Mapping.from_dict(json.loads(path.read_text())["mapping"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, DistInferError) as exc:
        raise ClusterConfigError(f"{path} is not a readable engine description ({exc}); rebuild the engine.") from exc


# ------------------------------------------------------------------ validation

class _Section:
    """Reads one mapping of the YAML, remembering its key path for messages."""

    def __init__(self, path: Path, data: Any, where: str, allowed: tuple[str, ...]):
        self.path, self.where = path, where
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(f"{where or 'the file'} must be a mapping (key: value), got {_kind(data)}")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            self.fail(f"unknown key {self.key(k)!r}.{hint} Allowed{' in ' + where if where else ''}: "
                      f"{', '.join(allowed)}.")
        self.data = data

    def key(self, k: str) -> str:
        return f"{self.where}.{k}" if self.where else str(k)

    def fail(self, message: str):
        raise ClusterConfigError(f"{self.path}: {message}")

    def get(self, k, default=None):
        return self.data.get(k, default)

    def str(self, k, default=None, required=False) -> str | None:
        v = self.data.get(k)
        if v is None:
            if required:
                self.fail(f"{self.key(k)} is required")
            return default
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            self.fail(f"{self.key(k)} must be a string, got {_kind(v)}")
        return str(v)

    def int(self, k, default=None, minimum=1) -> int | None:
        v = self.data.get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(f"{self.key(k)} must be an integer >= {minimum}, got {v!r}")
        return v

    def number(self, k, default=None) -> float | None:
        v = self.data.get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            self.fail(f"{self.key(k)} must be a positive number, got {v!r}")
        return v

    def bool(self, k, default: bool) -> bool:
        v = self.data.get(k)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(f"{self.key(k)} must be true or false, got {v!r}")
        return v

    def choice(self, k, choices, default=None) -> str:
        v = self.str(k, default)
        if v not in choices:
            self.fail(f"{self.key(k)} must be one of {', '.join(choices)}, got {v!r}")
        return v

    def strings(self, k) -> tuple[str, ...]:
        v = self.data.get(k)
        if v is None:
            return ()
        if isinstance(v, str):
            v = v.split()
        if not isinstance(v, list) or not all(isinstance(s, (str, int, float)) and not isinstance(s, bool) for s in v):
            self.fail(f"{self.key(k)} must be a list of strings, got {v!r}")
        return tuple(str(s) for s in v)


def _env_vars(section: _Section, raw: Any, key: str) -> dict[str, str]:
    """A NAME: value mapping of environment variables (values become strings)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        section.fail(f"{key} must be a mapping of NAME: value, got {_kind(raw)}")
    env = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not k.replace("_", "a").isalnum() or k[0].isdigit():
            section.fail(f"{key} name {k!r} is not a valid environment variable name")
        if isinstance(v, (dict, list)) or v is None:
            section.fail(f"{key}.{k} must be a string or number, got {_kind(v)}")
        env[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


def _kind(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(v), type(v).__name__)


TOP_KEYS = ("launcher", "engine", "parallel", "gpus_per_node", "env", "command", "launch_dir", "nodes",
            "mpirun", "slurm", "ray")
SECTION_FOR = {"mpirun": ("nodes", "mpirun"), "slurm": ("slurm",), "ray": ("ray",)}


def load_cluster(path: str | Path) -> ClusterConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ClusterConfigError(f"cluster file {path} does not exist"
                                 + (f" (in {path.parent}: {', '.join(near)})." if near else "."))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClusterConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_cluster(data, path)


def parse_cluster(data: Any, path: Path = Path("<cluster>")) -> ClusterConfig:
    top = _Section(path, data, "", TOP_KEYS)
    launcher = top.str("launcher", required=True)
    if launcher not in LAUNCHERS:
        close = difflib.get_close_matches(launcher, LAUNCHERS, n=1)
        top.fail(f"launcher {launcher!r} is not supported; use one of {', '.join(LAUNCHERS)}"
                 + (f" (did you mean {close[0]!r}?)." if close else "."))
    for other, keys in SECTION_FOR.items():
        if other != launcher:
            for k in keys:
                if k in top.data and not (k == "nodes" and launcher == "ray"):
                    top.fail(f"`{k}` is for launcher: {other}, but this file says launcher: {launcher}. "
                             f"Remove `{k}` or change the launcher.")

    par = _Section(path, top.get("parallel"), "parallel", ("tp", "pp"))
    tp, pp = (par.int("tp", 1), par.int("pp", 1)) if "parallel" in top.data else (None, None)
    gpus = top.int("gpus_per_node", 0, minimum=0)

    env = _env_vars(top, top.get("env"), "env")
    command = top.strings("command") or None
    cfg = dict(path=path, launcher=launcher, engine=top.str("engine"), tp=tp, pp=pp, gpus_per_node=gpus,
               env=env, command=command, launch_dir=top.str("launch_dir", "out/launch"))

    if launcher == "mpirun":
        nodes_raw = top.get("nodes")
        if not nodes_raw:
            top.fail("launcher: mpirun needs `nodes:`, a list of {host: NAME, slots: N} "
                     "(e.g. nodes: [{host: localhost, slots: 2}])")
        if not isinstance(nodes_raw, list):
            top.fail(f"nodes must be a list of {{host, slots}}, got {_kind(nodes_raw)}")
        nodes = []
        for i, n in enumerate(nodes_raw):
            s = _Section(path, n, f"nodes[{i}]", ("host", "slots"))
            nodes.append(Node(s.str("host", required=True), s.int("slots", gpus or 1)))
        hosts = [n.host for n in nodes]
        if len(set(hosts)) != len(hosts):
            top.fail(f"nodes lists a host twice: {hosts}; give each host once with its slot count.")
        m = _Section(path, top.get("mpirun"), "mpirun", ("binary", "extra_args", "rsh_agent"))
        cfg.update(nodes=tuple(nodes), mpirun=MpirunOptions(m.str("binary"), m.strings("extra_args"),
                                                             m.str("rsh_agent")))
    elif launcher == "slurm":
        s = _Section(path, top.get("slurm"), "slurm", tuple(f.name for f in SlurmOptions.__dataclass_fields__.values()))
        ranks = s.choice("ranks", SLURM_RANKS, "srun")
        mpi = s.choice("mpi", SLURM_MPI, "pmix")
        if ranks == "mpirun" and "mpi" in s.data:
            s.fail("slurm.mpi is the srun --mpi plugin; with slurm.ranks: mpirun, mpirun starts the ranks "
                   "itself. Remove slurm.mpi or use slurm.ranks: srun.")
        cfg["slurm"] = SlurmOptions(
            nodes=s.int("nodes", 1), ntasks_per_node=s.int("ntasks_per_node"), partition=s.str("partition"),
            time=s.str("time"), account=s.str("account"), job_name=s.str("job_name", "dist-infer"),
            ranks=ranks, mpi=mpi, srun_args=s.strings("srun_args"), mpirun_args=s.strings("mpirun_args"), sbatch_args=s.strings("sbatch_args"),
            output=s.str("output"), wait=s.bool("wait", True), gpus_per_task=_gpus_per_task(s, gpus),
            cpus_per_task=s.int("cpus_per_task"), setup=_setup(s))
    else:
        r = _Section(path, top.get("ray"), "ray", RAY_KEYS)
        submit = r.bool("submit", True)
        address = r.str("address", "http://127.0.0.1:8265" if submit else "auto")
        is_url = address.startswith(("http://", "https://"))
        if submit and not is_url:
            r.fail(f"ray.address {address!r}: `ray job submit` talks to the job server, an http:// URL such as "
                   "http://HEAD:8265 (or set ray.submit: false to run the driver here against a GCS address).")
        if not submit and is_url:
            r.fail(f"ray.address {address!r}: with ray.submit: false this process is the driver and joins the "
                   "cluster's GCS: use HEAD:6379 or auto (or set ray.submit: true for a job-server URL).")
        python = r.str("python", "python3")
        if not python.strip():
            r.fail("ray.python is empty; give the head's Python that runs the driver (e.g. python3 or "
                   "/shared/venv/bin/python).")
        cfg["ray"] = RayOptions(address, submit, r.number("cpus_per_rank", 1), r.number("timeout_s"), python,
                                _runtime_env(r))
    return ClusterConfig(**cfg)


def _gpus_per_task(s: _Section, gpus_per_node: int) -> int | None:
    """GPUs Slurm binds to each rank: one per rank on a GPU cluster unless the file says otherwise."""
    n = s.int("gpus_per_task")
    if n is None:
        return 1 if gpus_per_node else None
    if not gpus_per_node:
        s.fail(f"slurm.gpus_per_task={n} asks for GPUs but gpus_per_node is 0, so the ranks would run on CPU; "
               "set gpus_per_node: N (GPUs per node) or remove slurm.gpus_per_task.")
    if n > gpus_per_node:
        s.fail(f"slurm.gpus_per_task={n} is more than gpus_per_node={gpus_per_node}; a rank cannot span nodes, "
               "so lower slurm.gpus_per_task.")
    return n


def _setup(s: _Section) -> str | None:
    """slurm.setup: shell line(s) run in the batch script before the ranks start
    (a string, possibly multi-line, or a list of lines)."""
    v = s.get("setup")
    if v is None:
        return None
    if isinstance(v, str):
        lines = v.strip().splitlines()
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        lines = list(v)
    else:
        s.fail(f"slurm.setup must be a shell line or a list of lines (e.g. setup: \"source /shared/venv/bin/activate\"), "
               f"got {_kind(v)}")
    if not any(line.strip() for line in lines):
        s.fail("slurm.setup is empty; remove it or give the line(s) that prepare a compute node "
               "(e.g. source /shared/venv/bin/activate).")
    return "\n".join(lines)


RAY_KEYS = ("address", "submit", "cpus_per_rank", "timeout_s", "python", "runtime_env")
# The runtime_env fields Ray knows (ray.runtime_env.RuntimeEnv); a typo would otherwise
# only show up as an error from the job server after submission.
RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "py_executable", "excludes", "env_vars", "pip", "uv", "conda",
                    "container", "image_uri", "config", "java_jars", "nsight")


def _runtime_env(r: _Section) -> dict[str, Any]:
    """ray.runtime_env: passed to `ray job submit --runtime-env-json`. Local paths
    (working_dir, py_modules) are uploaded by Ray from this machine, so they are made absolute here."""
    raw = r.get("runtime_env")
    rt = _Section(r.path, raw, "ray.runtime_env", RUNTIME_ENV_KEYS)
    out = dict(rt.data)
    if "env_vars" in out:
        out["env_vars"] = _env_vars(rt, out["env_vars"], "ray.runtime_env.env_vars")
    if "working_dir" in out:
        out["working_dir"] = _local_path(rt, rt.str("working_dir"), "ray.runtime_env.working_dir")
    if "py_modules" in out:
        out["py_modules"] = [_local_path(rt, m, "ray.runtime_env.py_modules") for m in rt.strings("py_modules")]
    try:
        json.dumps(out)
    except TypeError as exc:
        rt.fail(f"ray.runtime_env must hold only strings, numbers, lists and mappings ({exc}); quote the value.")
    return out


def _local_path(section: _Section, value: str, key: str) -> str:
    """An absolute path for a local directory Ray uploads; URIs (s3://, https://...) pass as given."""
    if "://" in value:
        return value
    path = Path(value).absolute()
    if not path.exists():
        section.fail(f"{key} {value!r} does not exist here ({path}); `ray job submit` uploads it from this machine, "
                     "so give an existing directory or a remote URI.")
    return str(path)
