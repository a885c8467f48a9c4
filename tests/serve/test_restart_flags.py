"""`serve --restart N` refuses what cannot work before anything starts (exit 2, with the
fix), and `dist-infer launch -- serve --restart N` plans the supervisor for each launcher."""

from __future__ import annotations

import logging
import shlex
import sys

import pytest

from dist_infer.cli import main, rank_serve_args

from .server import free_port


@pytest.fixture(autouse=True)
def _keep_logging():
    """main() points the root logger at this test's (captured, then closed) stderr: put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def _serve(engine, *args: str) -> int:
    try:
        return main(["serve", "--engine", str(engine), "--port", str(free_port()), *args])
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.mark.parametrize("args,words", [
    (["--restart", "-1"], "--restart: must be >= 0"),
    (["--restart", "1"], "--launcher-cmd 'mpirun -n 2'"),
    (["--launcher-cmd", "mpirun -n 2"], "add --restart N"),
    (["--restart", "1", "--launcher-cmd", "no-such-launcher -n 2"], "'no-such-launcher' is not installed"),
    (["--restart", "1", "--launcher-cmd", "mpirun 'unclosed"], "cannot split"),
], ids=["negative", "no-launcher", "launcher-without-restart", "launcher-missing", "bad-quoting"])
def test_bad_restart_flags_exit_2_before_anything_starts(tiny, capsys, args, words):
    engine, _ = tiny
    assert _serve(engine(2, 1), *args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_restart_under_mpirun_is_refused(tiny, capsys, monkeypatch):
    """The supervisor starts mpirun itself: run under mpirun, every rank would start its own."""
    engine, _ = tiny
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert _serve(engine(2, 1), "--restart", "1", "--launcher-cmd", "mpirun -n 2") == 2
    assert "must not run under mpirun/srun" in capsys.readouterr().err


def test_ranks_get_the_serve_arguments_without_the_supervisors():
    argv = ["--log-level", "DEBUG", "serve", "--engine", "E", "--restart", "2", "--launcher-cmd", "mpirun -n 2",
            "--port=9000", "--api-key", "secret", "--host", "0.0.0.0", "--max-queue", "5", "--step-timeout", "9",
            "--control-host", "10.0.0.1", "--rank-cmd", "python3 -m dist_infer", "--start-timeout", "60"]
    assert rank_serve_args(argv) == ["--log-level", "DEBUG", "serve", "--engine", "E", "--step-timeout", "9"]


def test_launch_plans_the_supervisor_around_mpirun(tmp_path, tiny):
    from dist_infer.launchers import load_cluster, plan_launch

    engine, _ = tiny
    cluster = tmp_path / "local.yaml"
    cluster.write_text(f"launcher: mpirun\nengine: {engine(2, 1)}\nlaunch_dir: {tmp_path}\n"
                       "nodes: [{host: localhost, slots: 2}]\nmpirun: {extra_args: [--oversubscribe]}\n")
    plan = plan_launch(load_cluster(cluster), ["serve", "--restart", "2", "--port", "8123"])
    argv = plan.argv
    assert argv[:3] == [sys.executable, "-m", "dist_infer"] and argv[3:6] == ["serve", "--engine", str(engine(2, 1))]
    launcher = shlex.split(argv[argv.index("--launcher-cmd") + 1])
    assert launcher[1:3] == ["-n", "2"] and "--oversubscribe" in launcher and "--hostfile" in launcher
    assert argv[argv.index("--control-host") + 1] == "127.0.0.1"
    assert plan.serving == "http://127.0.0.1:8123"


def test_launch_plans_the_supervisor_in_the_batch_job_and_the_ray_driver(tmp_path, tiny):
    from dist_infer.launchers import load_cluster, plan_launch

    engine, _ = tiny
    (tmp_path / "slurm.yaml").write_text(f"launcher: slurm\nengine: {engine(2, 1)}\nlaunch_dir: {tmp_path}\n")
    (tmp_path / "ray.yaml").write_text(f"launcher: ray\nengine: {engine(2, 1)}\n"
                                       "ray: {address: 'h:6379', submit: false}\n")
    slurm = load_cluster(tmp_path / "slurm.yaml")
    plain, supervised = (plan_launch(slurm, ["serve", *r]) for r in ([], ["--restart", "1"]))
    assert "SUPERVISE=no " in next(iter(plain.files.values()))
    assert "SUPERVISE=yes " in next(iter(supervised.files.values()))  # the batch shell runs the supervisor
    ray_plan = plan_launch(load_cluster(tmp_path / "ray.yaml"), ["serve", "--restart", "1"])
    assert ray_plan.supervised and "--restart" in ray_plan.argv  # the driver runs the front-end
