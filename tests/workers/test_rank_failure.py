"""A rank that dies mid-generation must take the whole job down quickly: no
surviving rank may sit forever in a collective waiting for it."""

from __future__ import annotations

import signal

import pytest

from conftest import kill_rank_mid_run, make_tiny_model, run_cli, write_prompts

EXIT_DEADLINE_S = 10


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from dist_infer.partition import partition

    root = tmp_path_factory.mktemp("failure")
    make_tiny_model(root / "hf", "llama", num_hidden_layers=8)
    partition(root / "hf", 2, 2, root / "ckpt", progress=False)
    proc = run_cli("build", "--checkpoint", str(root / "ckpt"), "--out", str(root / "engine"), "--max-seq-len", "256")
    assert proc.returncode == 0, proc.stderr
    return root / "engine", write_prompts(root / "p.jsonl", [[5, 6, 7]] * 4)


@pytest.mark.parametrize("victim", [2, 0])
def test_killed_rank_ends_the_job(engine, victim):
    """SIGKILL rank `victim` (a later-stage worker, or rank 0 the coordinator) while
    the job decodes: mpirun and every other rank exit within EXIT_DEADLINE_S, non-zero."""
    engine_dir, prompts = engine
    args = ["run", "--engine", str(engine_dir), "--prompts-file", str(prompts), "--max-new-tokens", "250",
            "--ignore-eos", "--json"]
    code, took, survivors = kill_rank_mid_run(args, 4, victim, EXIT_DEADLINE_S)
    assert code != 0, "a job that lost a rank must not report success"
    assert not survivors, f"ranks {survivors} outlived the job"
    print(f"rank {victim} killed: job exited with {code} after {took:.2f}s")


@pytest.mark.parametrize("victim", [3, 0])
def test_stopped_rank_is_named_within_the_step_timeout(engine, victim):
    """SIGSTOP (a hung rank: no crash for mpirun to see) of a worker or of rank 0: the step
    watchdog ends the job within --step-timeout plus a little, with exit code 3 and a line
    that names the stopped rank (rank 0 names a worker; the workers name a silent rank 0)."""
    engine_dir, prompts = engine
    args = ["run", "--engine", str(engine_dir), "--prompts-file", str(prompts), "--max-new-tokens", "250",
            "--ignore-eos", "--json", "--step-timeout", "3"]
    err: list[str] = []
    code, took, survivors = kill_rank_mid_run(args, 4, victim, EXIT_DEADLINE_S, sig=signal.SIGSTOP, stderr=err)
    assert code == 3, f"exit {code}\n{err[0][-3000:]}"
    assert f"rank {victim} (on " in err[0] and "has sent no heartbeat" in err[0], err[0][-3000:]
    assert not survivors, f"ranks {survivors} outlived the job"
    assert took < 3 + 6, took
    print(f"rank {victim} stopped: job exited with {code} after {took:.2f}s")


def test_env_launched_killed_rank_is_named(engine):
    """torchrun-style ranks (RANK / WORLD_SIZE / MASTER_ADDR, gloo, no mpirun to end the
    job): kill -9 of rank 2 turns gloo's bare connection error into an error that names
    rank 2 and its host, and every other rank exits non-zero within the deadline."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO, _alive
    from serve.server import free_port

    engine_dir, prompts = engine
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "DIST_INFER_COMM": "gloo", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": "4"}
    cmd = [sys.executable, "-m", "dist_infer", "run", "--engine", str(engine_dir), "--prompts-file", str(prompts),
           "--max-new-tokens", "250", "--ignore-eos", "--json"]
    ranks = [subprocess.Popen(cmd, env={**base, "RANK": str(r)}, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(4)]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (line := ranks[0].stderr.readline()):
            if "loaded engine rank" in line:
                break
        time.sleep(1.5)  # every rank loaded (the watchdog's start is collective): decoding is under way
        assert ranks[0].poll() is None, "the job finished before the rank could be killed; make it longer"
        ranks[2].kill()
        killed_at = time.monotonic()
        err0 = ranks[0].communicate(timeout=EXIT_DEADLINE_S)[1]
        for r in (1, 3):
            ranks[r].wait(timeout=max(1.0, EXIT_DEADLINE_S - (time.monotonic() - killed_at)))
        took = time.monotonic() - killed_at
    finally:
        for p in ranks:
            if _alive(p.pid):
                p.kill()
    assert ranks[0].returncode not in (0, None) and all(ranks[r].returncode not in (0, None) for r in (1, 3))
    assert "rank 2 (" in err0 and "stopped answering" in err0, err0[-3000:]
    assert "Traceback" not in err0, err0[-3000:]
    print(f"env-launched rank 2 killed: ranks exited after {took:.2f}s")
