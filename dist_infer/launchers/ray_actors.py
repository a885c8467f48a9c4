"""A rank as a Ray actor.

Each actor is one rank process, exactly like an mpirun rank: it joins a gloo
world (rank 0's node address and a free port, handed out by the driver
through Ray), loads its engine and runs the same `dist-infer` sub-command.
Rank 0's actor runs the Coordinator; the others loop in RankWorker.serve on
the world broadcast of each StepPlan — no Ray call per step. On GPUs the
TP/PP groups get NCCL communicators whose unique id travels over that gloo
world.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys


class RankActor:
    """Wrapped with `ray.remote` by the driver (so importing this needs no Ray)."""

    def __init__(self, rank: int, world_size: int, env: dict[str, str]):
        self.rank, self.world_size = rank, world_size
        os.environ.update(env)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), DIST_INFER_COMM="gloo")
        # One GPU per actor: Ray sets CUDA_VISIBLE_DEVICES, so the rank's device is cuda:0.
        os.environ["LOCAL_RANK"] = "0"

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a free port for the gloo world (rank 0 only)."""
        import ray

        addr = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return addr, port

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        """This rank's process (logged by the driver: what to look at, or to kill in a fault drill)."""
        return os.getpid()

    def run(self, argv: list[str], master_addr: str, master_port: int) -> tuple[int, str, str]:
        """`dist-infer ARGV` as this rank; returns (exit code, stdout, stderr). stderr
        (the rank's log) is also written to the actor's log file as it happens."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        from dist_infer.cli import main
        from dist_infer.workers import watchdog

        watchdog.last_words_hooks[:] = [_leave_last_words]  # the step watchdog ends this process with os._exit

        out, err = io.StringIO(), _Tee(io.StringIO(), sys.stderr)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse errors
                code = exc.code if isinstance(exc.code, int) else 2
        return int(code or 0), out.getvalue(), err.first.getvalue()

    def exit(self) -> None:
        """Leave the gloo world and end the actor process."""
        import ray

        ray.actor.exit_actor()


LAST_WORDS_KEY = "dist_infer/last_words/{actor_id}"


def _leave_last_words(words: str) -> None:
    """In Ray's key-value store, under this actor's id: the driver reads it when the actor died."""
    import ray
    from ray.experimental import internal_kv

    key = LAST_WORDS_KEY.format(actor_id=ray.get_runtime_context().get_actor_id())
    internal_kv._internal_kv_put(key.encode(), words.encode(), overwrite=True)


def last_words(actor) -> str | None:
    """What a dead rank actor's watchdog said before it ended the process (driver side)."""
    from ray.experimental import internal_kv

    key = LAST_WORDS_KEY.format(actor_id=actor._actor_id.hex()).encode()
    try:
        words = internal_kv._internal_kv_get(key)
        if words is not None:
            internal_kv._internal_kv_del(key)
    except Exception:  # an older or newer Ray without this store: the death alone is reported
        return None
    return words.decode() if words else None


class _Tee(io.TextIOBase):
    def __init__(self, first, second):
        self.first, self.second = first, second

    def write(self, text):
        self.first.write(text)
        self.second.write(text)
        return len(text)

    def flush(self):
        self.second.flush()
