"""Shared for the launcher tests: one engine (a tiny random Llama, tp=2 x
pp=2: TP inside a host, PP across hosts), the reference tokens of its model's
single-process run, two namespace "hosts", and a runner for
`dist-infer launch` that always has a timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import completions, make_tiny_model, run_bounded, run_cli, write_prompts

from .daemons import SlurmCluster
from .hosts import TwoHosts, netns_available

TP, PP = 2, 2
NEW_TOKENS = 12
PROMPTS = [[5, 17, 42, 99], [7, 8, 9, 10, 11, 12, 13, 14, 15], [201, 3]]
RANK_WRAPPER = Path(__file__).parent / "rank_wrapper.sh"


def require(missing: str | None) -> None:
    """Skip a launcher test whose system piece is absent on a developer's machine;
    in CI (CI=true, where scripts/ci_system_deps.sh installed everything) fail instead,
    so a broken install can never pass as skipped tests."""
    if not missing:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing} (CI must run every launcher test)")
    pytest.skip(missing)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


class Engine:
    def __init__(self, root: Path):
        from dist_infer.partition import partition

        model = root / "model"
        make_tiny_model(model, "llama")
        self.prompts = write_prompts(root / "prompts.jsonl", PROMPTS)
        self.dir = root / f"engine-tp{TP}pp{PP}"
        single = root / "engine-tp1pp1"
        for (tp, pp), out in (((TP, PP), self.dir), ((1, 1), single)):
            partition(model, tp, pp, root / f"ckpt-tp{tp}pp{pp}", progress=False)
            ok(run_cli("build", "--checkpoint", str(root / f"ckpt-tp{tp}pp{pp}"), "--out", str(out),
                       "--max-seq-len", "128", timeout=180))
        # The single-process run is the reference every launcher must reproduce.
        self.run_args = ["run", "--prompts-file", str(self.prompts), "--max-new-tokens", str(NEW_TOKENS),
                         "--ignore-eos", "--json"]
        ref = run_cli(*self.run_args, "--engine", str(single), timeout=180)
        self.reference = [c["output_ids"] for c in completions(ref)]
        assert len(self.reference) == len(PROMPTS) and all(len(t) == NEW_TOKENS for t in self.reference)


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    return Engine(tmp_path_factory.mktemp("launch-engine"))


@pytest.fixture(scope="session")
def two_hosts():
    require(netns_available())
    hosts = TwoHosts()
    yield hosts
    hosts.close()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, two_hosts):
    """Real slurmctld + a slurmd on each namespace host, for one test module."""
    require(None if shutil.which("slurmctld") and shutil.which("sbatch")
            else "Slurm is not installed: run scripts/ci_system_deps.sh")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), two_hosts)
    yield cluster
    cluster.stop()


def tokens(proc: subprocess.CompletedProcess) -> list[list[int]]:
    return [c["output_ids"] for c in completions(proc)]


def launch(cluster: Path, args: list[str], timeout: float = 240, env: dict | None = None,
           dry_run: bool = False) -> subprocess.CompletedProcess:
    """`dist-infer launch --cluster CLUSTER [--dry-run] -- ARGS`, killed (with everything it
    started in its session) if it outlives `timeout`."""
    cmd = [sys.executable, "-m", "dist_infer", "launch", "--cluster", str(cluster)]
    cmd += ["--dry-run"] if dry_run else []
    cmd += ["--", *args]
    return run_bounded(cmd, timeout, env)


def write_cluster(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def rank_hosts(directory: Path) -> dict[int, str]:
    """What tests/launchers/rank_wrapper.sh recorded: rank -> hostname it ran on."""
    return {int(p.name.split("-")[1]): p.read_text().strip() for p in directory.glob("rank-*")}


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 240) -> None:
    """Until a server launched by `proc` answers /health 200 (fails if `proc` ends first)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"no healthy server at {url} within {timeout}s:\n{log_path.read_text()[-4000:]}")
