"""SIGTERM (what `scancel` and most schedulers send) and Ctrl-C in the middle of
`partition`, `build` and `run`: no half-written directory is left behind, a
staging directory of a killed job is never reused, and `run` prints the answers
it finished before it exits non-zero, saying how many were lost.

Real processes, real signals. DIST_INFER_TEST_SLOW_S (a test-only delay after each
tensor / rank written, dist_infer/interrupts.py) keeps partition and build busy long
enough to be signalled mid-way."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, make_tiny_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupted")
    make_tiny_model(root / "hf", "llama")
    return root / "hf"


@pytest.fixture(scope="module")
def checkpoint(hf) -> Path:
    from dist_infer.partition import partition

    return partition(hf, 2, 1, hf.parent / "ckpt-tp2", progress=False)


def start(*args: str, env: dict | None = None, log_level: str = "INFO") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dist_infer", "--log-level", log_level, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and children inherit that: a suite
    started with `&` would see Ctrl-C ignored. The command under test gets the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before the signal:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def signal_and_wait(proc: subprocess.Popen, sig: int) -> tuple[int, str, str, float]:
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err, time.monotonic() - sent


def hidden_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_sigterm_during_partition_leaves_nothing(hf, tmp_path):  # (SIGINT always cleaned up)
    out = tmp_path / "ckpt"
    proc = start("partition", "--model", str(hf), "--tp", "2", "--out", str(out), "--quiet",
                 env={"DIST_INFER_TEST_SLOW_S": "0.2"})
    wait_for(lambda: any((d / "rank0.safetensors").exists() for d in tmp_path.glob(".ckpt.tmp-*")), proc)
    returncode, _, err, took = signal_and_wait(proc, signal.SIGTERM)
    assert returncode == 143 and took < 10, err[-3000:]
    assert "Traceback" not in err and "partition interrupted" in err and "removed the partial output" in err
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no hidden .ckpt.tmp-HOST-PID


def test_sigterm_during_build_leaves_nothing(checkpoint, tmp_path):
    out = tmp_path / "engine"
    proc = start("build", "--checkpoint", str(checkpoint), "--out", str(out), env={"DIST_INFER_TEST_SLOW_S": "5"})
    wait_for(lambda: any((d / "rank0" / "weights.safetensors").exists() for d in tmp_path.glob(".engine.tmp-build*")),
             proc)
    returncode, _, err, took = signal_and_wait(proc, signal.SIGTERM)
    assert returncode == 143 and took < 10, err[-3000:]
    assert "Traceback" not in err and "build interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_an_extension_turned_into_its_own_error_still_exits_143(tmp_path):
    """SIGTERM's handler can run inside safetensors' call back into Python, which replaces the
    raised interrupt with its own ValueError (seen in CI): the CLI still exits as interrupted."""
    code = textwrap.dedent("""
        import os, signal, time
        import dist_infer.cli as cli
        from dist_infer.interrupts import sigterm_raises

        def build_like(args):
            with sigterm_raises():
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                except KeyboardInterrupt:
                    raise ValueError("could not determine the shape of object type 'UntypedStorage'") from None

        cli._build = build_like
        raise SystemExit(cli.main(["build", "--checkpoint", "ckpt", "--out", "engine"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 143, proc.stderr
    assert "terminated by SIGTERM" in proc.stderr and "unexpected failure" not in proc.stderr, proc.stderr


def test_build_never_reuses_a_dead_builds_staging_dir(checkpoint, tmp_path):
    """A build killed outright (SIGKILL, OOM) leaves its staging directory; the next build
    must neither trust its files nor trip over it, and removes it. A live build's is kept."""
    from dist_infer.comm.base import LocalCommunicator
    from dist_infer.config import BuildConfig
    from dist_infer.engine.build import build
    from dist_infer.engine.runtime import EngineSpec
    from dist_infer.partition.safetensors_stream import file_entry

    out, host = tmp_path / "engine", socket.gethostname()
    dead = [tmp_path / f".engine.tmp-build-{host}-{_dead_pid()}", tmp_path / ".engine.tmp-build"]
    live = tmp_path / f".engine.tmp-build-{host}-{os.getppid()}"  # pytest's parent: alive
    for stale in [*dead, live]:
        (stale / "rank0").mkdir(parents=True)
        (stale / "rank0" / "weights.safetensors").write_bytes(b"garbage from a killed build")
        (stale / "engine.json").write_text("{}")
    build(checkpoint, out, BuildConfig(max_seq_len=32), LocalCommunicator())
    assert hidden_entries(tmp_path) == [live.name]
    spec = EngineSpec.read(out)
    for name, entry in json.loads((out / "engine.json").read_text())["files"].items():
        assert file_entry(out / name) == entry  # the files this build wrote, not the leftovers
    assert spec.mapping.world_size == 2


def test_partition_removes_a_dead_partitions_leftovers(hf, tmp_path):
    from dist_infer.partition import partition

    stale = tmp_path / f".ckpt.tmp-{socket.gethostname()}-{_dead_pid()}"
    stale.mkdir()
    (stale / "rank0.safetensors").write_bytes(b"x" * 1000)
    partition(hf, 1, 1, tmp_path / "ckpt", progress=False)
    assert hidden_entries(tmp_path) == [] and (tmp_path / "ckpt" / "manifest.json").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (pids are not reused this fast)


# ---------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def engine1(hf) -> Path:
    from dist_infer.comm.base import LocalCommunicator
    from dist_infer.config import BuildConfig
    from dist_infer.engine.build import build
    from dist_infer.partition import partition

    ckpt = partition(hf, 1, 1, hf.parent / "ckpt-tp1", progress=False)
    return build(ckpt, hf.parent / "engine-tp1", BuildConfig(max_seq_len=64, max_batch_size=8), LocalCommunicator())


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_interrupted_run_prints_the_finished_answers(engine1, tmp_path, sig, code):
    """Prompt 0 fills the context (63 of 64 tokens): it finishes in the first step; 400
    short prompts need ~3,000 more steps. The signal comes as soon as prompt 0 is done."""
    prompts = [list(range(1, 64))] + [[1 + i % 300, 2, 3] for i in range(400)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    proc = start("run", "--engine", str(engine1), "--prompts-file", str(path), "--json", "--max-new-tokens", "60",
                 "--ignore-eos", log_level="DEBUG")
    lines: list[str] = []
    wait_for(lambda: re.search(r"request generate-\d+-0 finished", _read_line(proc, lines)), proc)
    returncode, out, err, took = signal_and_wait(proc, sig)
    err = "".join(lines) + err
    assert returncode == code and took < 10, err[-3000:]
    finished = [json.loads(line) for line in out.splitlines()]
    assert finished and finished[0]["index"] == 0 and len(finished[0]["output_ids"]) == 1
    assert all(len(c["output_ids"]) == 60 for c in finished[1:])
    lost = len(prompts) - len(finished)
    assert f"printed the {len(finished)} answers finished so far; {lost} of {len(prompts)} prompts did not finish" \
        in err, err[-2000:]
    assert "Traceback" not in err and lost > 0


def _read_line(proc: subprocess.Popen, lines: list[str]) -> str:
    line = proc.stderr.readline()
    lines.append(line)
    return line
