"""`dist-infer serve`, the rank side: every rank loads its engine; rank 0 runs
the engine loop and starts the HTTP front-end as its own process.

    mpirun -n N dist-infer serve --engine DIR --port 8000
      rank 0: LLMEngine + EngineLoop (ZeroMQ) <-> front-end process (uvicorn/FastAPI)
      ranks 1..N-1: RankWorker.serve(), the same step loop as `run`

SIGTERM / SIGINT drain: rank 0 refuses new requests, finishes the running ones
(at most --shutdown-timeout), releases the other ranks, stops the front-end,
and every process exits 0. The other ranks ignore the signal (mpirun and
scancel send it to every rank): rank 0 releases them when the drain is done.

    dist-infer serve --restart N [--launcher-cmd 'mpirun -n 4'] --engine DIR ...
      this process: the HTTP front-end + a supervisor (serve/supervisor.py), which runs
      `LAUNCHER-CMD dist-infer serve --engine-only --connect ADDRS ...` as its child and
      starts it again when it fails; rank 0's engine loop connects to the front-end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import subprocess
import threading
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dist_infer.errors import LaunchError
from dist_infer.log import launch_rank
from dist_infer.workers.engine_loop import ENGINE_KEY_ENV, EngineAddresses, EngineLoop, engine_key, engine_key_env
from dist_infer.workers.watchdog import default_step_timeout, naming_lost_ranks
from dist_infer.workers.llm_engine import LLMEngine, resolve_pipeline_depth
from dist_infer.workers.run import RankEngineOptions

log = logging.getLogger(__name__)


@dataclass
class ServeOptions(RankEngineOptions):
    engine: Path
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_queue: int = 1024
    api_key: str | None = None
    shutdown_timeout: float = 30.0
    keepalive_s: float = 30.0
    frontend: bool = True              # False: engine only (dist_infer.LLM connects to --ipc-dir)
    ipc_dir: Path | None = None
    frontend_args: list[str] = field(default_factory=list)
    connect: EngineAddresses | None = None  # --engine-only --connect: rank 0 connects to a supervisor's sockets
    restart: int = 0                         # --restart N: this process supervises the rank job
    launcher_cmd: list[str] = field(default_factory=list)  # what starts the ranks, e.g. mpirun -n 4
    rank_cmd: list[str] = field(default_factory=list)      # how a rank runs dist_infer (default: this Python)
    control_host: str = "127.0.0.1"          # the address of this node that rank 0 connects to
    start_timeout: float = 300.0             # a (re)started rank job's engine must be ready within this
    rank_args: list[str] = field(default_factory=list)     # the ranks' own `serve ...` arguments
    enable_admin: bool = False               # POST /admin/update_weights on the front-end (serve/admin.py)

    def frontend_command(self, ipc_dir: Path) -> list[str]:
        return [sys.executable, "-m", "dist_infer.serve.api_server", *self.frontend_argv(ipc_dir)]

    def frontend_argv(self, ipc_dir: Path | None) -> list[str]:
        argv = ["--engine", str(self.engine), "--host", self.host, "--port", str(self.port), "--max-queue",
                str(self.max_queue), "--shutdown-timeout", str(self.shutdown_timeout)]
        argv += ["--ipc-dir", str(ipc_dir)] if ipc_dir else []
        if self.served_model_name:
            argv += ["--served-model-name", self.served_model_name]
        argv += ["--enable-admin"] if self.enable_admin else []
        return argv + self.frontend_args

    def rank_job_command(self, addresses: EngineAddresses) -> list[str]:
        """What the supervisor runs: the launcher, then every rank's `serve --engine-only --connect`."""
        rank = self.rank_cmd or [sys.executable, "-m", "dist_infer"]
        launcher = _forwarding_engine_key(self.launcher_cmd)
        return [*launcher, *rank, *self.rank_args, "--engine-only", "--connect", addresses.joined()]


def _forwarding_engine_key(launcher: list[str]) -> list[str]:
    """Open MPI gives ranks on other nodes only the variables named with -x: name the engine
    sockets' key there (`-x NAME` passes its value from the environment, off the command line).
    srun exports the whole environment; a local launch inherits it."""
    if launcher and Path(launcher[0]).name in ("mpirun", "mpiexec", "orterun") and _is_open_mpi(launcher[0]):
        return [launcher[0], "-x", ENGINE_KEY_ENV, *launcher[1:]]
    return launcher


@functools.cache
def _is_open_mpi(tool: str) -> bool:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out


def serve(opts: ServeOptions) -> int:
    if opts.restart and opts.connect is None:
        return supervise(opts)
    spec, worker = opts.start_worker(opts.engine)
    with naming_lost_ranks(worker.watchdog, worker.groups.world.rank):
        return _serve_rank(opts, spec, worker)


def _serve_rank(opts: ServeOptions, spec, worker) -> int:
    if worker.groups.world.rank != 0:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        worker.serve()
        worker.close()
        return 0
    engine = LLMEngine(worker, spec, None, opts.engine_options())
    if opts.connect is not None:  # under a supervisor: its front-end bound the sockets
        loop = EngineLoop(engine, opts.connect, opts.keepalive_s, connect=True)
        log.info("engine only: connected to the front-end at %s", opts.connect.joined())
    else:
        ipc_dir = Path(opts.ipc_dir or tempfile.mkdtemp(prefix="dist-infer-"))
        loop = EngineLoop(engine, EngineAddresses.in_directory(ipc_dir), opts.keepalive_s)
    loop.handle_signals(opts.shutdown_timeout)
    frontend = _start_frontend(opts, ipc_dir) if opts.frontend and opts.connect is None else None
    try:
        loop.run(should_stop=lambda: frontend is not None and frontend.poll() is not None)
    finally:
        engine.shutdown()  # the step in flight, then the other ranks
        loop.close()
    code = _stop_frontend(frontend)
    worker.close()
    return code


def _start_frontend(opts: ServeOptions, ipc_dir: Path) -> subprocess.Popen:
    # The API key travels in the environment, not on a command line that `ps` shows.
    env = {**os.environ, "DIST_INFER_API_KEY": opts.api_key or ""}
    proc = subprocess.Popen(opts.frontend_command(ipc_dir), env=env)
    log.info("HTTP front-end pid %d on http://%s:%d", proc.pid, opts.host, opts.port)
    return proc


def _stop_frontend(proc: subprocess.Popen | None) -> int:
    """0 after a drain; the front-end's own code if it ended first (it failed to start, say)."""
    if proc is None:
        return 0
    if proc.poll() is not None:
        return proc.returncode or 0
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return 0


def supervise(opts: ServeOptions, start_job=None) -> int:
    """`serve --restart N`: the front-end and the supervisor of the rank job, in this process.
    start_job(addresses) -> RankJob; default: run opts.rank_job_command (the Ray driver passes its own)."""
    from dist_infer.serve import api_server
    from dist_infer.serve.supervisor import CommandJob, RestartPolicy

    _label_logs("supervisor")
    args = api_server.parse_args(opts.frontend_argv(None))
    policy = RestartPolicy(opts.restart, opts.step_timeout or default_step_timeout(opts.device), opts.start_timeout,
                           str(opts.engine))
    # The API key stays with the front-end; line-buffered ranks, so their log reaches ours as it is written.
    # The engine sockets' key goes to the rank job in its environment (not its command line).
    env = {k: v for k, v in os.environ.items() if k != "DIST_INFER_API_KEY"} | {"PYTHONUNBUFFERED": "1"}
    env |= engine_key_env()
    os.environ["DIST_INFER_API_KEY"] = opts.api_key or ""

    async def run_command(addresses: EngineAddresses):
        return await CommandJob.start(opts.rank_job_command(addresses), env)

    return asyncio.run(api_server.serve_supervised(args, start_job or run_command, policy, opts.control_host))


def _label_logs(label: str) -> None:
    """The supervisor's lines stand out from the rank job's, which it passes on."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"[{label}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                                datefmt="%H:%M:%S"))


def check_serve_options(opts: ServeOptions, launcher: str | None = None) -> None:
    """Refuse bad knobs before any rank loads anything (exit 2, with the fix). launcher: who
    starts the ranks of a supervised server when no --launcher-cmd does (the Ray driver)."""
    from dist_infer.engine.runtime import EngineSpec

    if not 1 <= opts.port <= 65535:
        raise LaunchError(f"--port must be in 1..65535, got {opts.port}.")
    if opts.max_queue < 0:
        raise LaunchError(f"--max-queue must be >= 0, got {opts.max_queue}.")
    if opts.shutdown_timeout < 0:
        raise LaunchError(f"--shutdown-timeout must be >= 0 seconds, got {opts.shutdown_timeout}.")
    if opts.keepalive_s <= 0:
        raise LaunchError(f"--keepalive must be > 0 seconds, got {opts.keepalive_s}.")
    spec = EngineSpec.read(opts.engine)
    if opts.num_kv_blocks is not None and opts.num_kv_blocks < spec.blocks_per_seq + 1:
        raise LaunchError(f"--num-kv-blocks {opts.num_kv_blocks} cannot hold one {spec.build.max_seq_len}-token "
                          f"sequence; use at least {spec.blocks_per_seq + 1}.")
    resolve_pipeline_depth(opts.pipeline_depth, spec.mapping.pp)
    tokens = opts.max_num_batched_tokens
    if tokens is not None and tokens < spec.build.max_batch_size:
        raise LaunchError(f"--max-num-batched-tokens {tokens} is below the engine's max batch size "
                          f"({spec.build.max_batch_size}): every running sequence must fit one step. Use at least "
                          f"{spec.build.max_batch_size}.")
    if opts.restart and opts.connect is None:
        _check_restart(opts, spec, launcher)
    elif opts.launcher_cmd and opts.connect is None:
        raise LaunchError("--launcher-cmd starts the ranks of a supervised server: add --restart N (N >= 1), or "
                          "drop --launcher-cmd and start the ranks with mpirun yourself.")
    if opts.frontend and opts.connect is None and launch_rank() == 0:
        _check_port_free(opts.host, opts.port)
    if opts.connect is not None and launch_rank() == 0:
        engine_key(opts.connect, create=False)  # the supervisor's key reached rank 0, or a clear error now


def _check_restart(opts: ServeOptions, spec, launcher: str | None) -> None:
    """--restart N: this process must be the one that starts the ranks, and must know how."""
    from dist_infer.comm.bootstrap import launched_by_mpi

    n = spec.mapping.world_size
    if launcher is not None:
        return
    if launched_by_mpi() or "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise LaunchError(f"--restart starts the rank job itself, so it must not run under mpirun/srun: run "
                          f"`dist-infer serve --restart {opts.restart} --launcher-cmd 'mpirun -n {n}' ...` as one "
                          "process, or `dist-infer launch --cluster FILE -- serve --restart N ...`.")
    if n > 1 and not opts.launcher_cmd:
        raise LaunchError(f"--restart {opts.restart}: this engine has {n} ranks, so the supervisor needs a command "
                          f"that starts them: add --launcher-cmd 'mpirun -n {n}' (or use `dist-infer launch --cluster "
                          "FILE -- serve --restart N ...`).")
    tool = opts.launcher_cmd[0] if opts.launcher_cmd else None
    if tool and not (os.path.exists(tool) or shutil.which(tool)):
        raise LaunchError(f"--launcher-cmd: {tool!r} is not installed here (not on PATH); give its full path.")


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LaunchError(f"--host {host!r} does not resolve ({exc}); use an address of this node, or 0.0.0.0.")
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise LaunchError(f"cannot listen on {host}:{port}: {exc.strerror}. Pick a free --port (or stop the "
                              "server that holds it).") from exc
