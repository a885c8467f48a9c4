"""SIGTERM treated like Ctrl-C, so that the same cleanup runs.

`scancel`, `kill` and most schedulers send SIGTERM, whose default action ends
the process at once: `finally` blocks do not run, and a half-written temporary
directory stays behind. Inside `sigterm_raises()` SIGTERM raises `Terminated`
(a KeyboardInterrupt), which every `except BaseException` cleanup already
handles; the CLI exits with 143 (128 + SIGTERM) for it, 130 for Ctrl-C.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Test-only: seconds to sleep after each unit of work (a tensor written, a rank built), so a test
# can send a signal while the work is in progress. Never set it in production.
SLOW_ENV = "DIST_INFER_TEST_SLOW_S"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was."""

    exit_code = 128 + signal.SIGTERM


_delivered: list[Terminated] = []  # every SIGTERM raised here (see `delivered`)


def _raise_terminated(signum, frame):
    exc = Terminated(f"terminated by {signal.Signals(signum).name}")
    _delivered.append(exc)
    raise exc


def delivered() -> Terminated | None:
    """The SIGTERM this process raised, if any. A handler that runs inside a C extension's call
    back into Python (safetensors making a tensor) can see its exception replaced by the
    extension's own error; the CLI still exits as interrupted when this is set."""
    return _delivered[-1] if _delivered else None


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (only the main thread can set a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def interruption(exc: BaseException) -> BaseException | None:
    """What interrupted the work that ended with `exc`: Ctrl-C or SIGTERM (also when an
    extension replaced the interrupt with its own error, see `delivered`), else None."""
    return exc if isinstance(exc, KeyboardInterrupt) else delivered()


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM: the codes a shell reports for them."""
    return getattr(exc, "exit_code", 128 + signal.SIGINT)


def slow_down_for_tests() -> None:
    """Sleep DIST_INFER_TEST_SLOW_S seconds (unset: no-op); see SLOW_ENV."""
    delay = os.environ.get(SLOW_ENV)
    if delay:
        import time

        time.sleep(float(delay))


# ---- staging directories: named after their owner, so a dead owner's leftovers can be told apart


def temp_dir(out: Path, kind: str) -> Path:
    """The hidden staging directory beside `out` for this process: .OUT.KIND-HOST-PID."""
    return out.with_name(f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def remove_dead_temp_dirs(out: Path, kind: str) -> None:
    """Remove staging directories that processes on this host left when they died without
    cleaning up (SIGKILL, the OOM killer): their PID no longer runs. A live owner's (a job
    running now) and other hosts' (on shared storage) are left alone."""
    pattern = f".{glob.escape(out.name)}.{kind}-{glob.escape(socket.gethostname())}-*"
    for stale in out.parent.glob(pattern):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted job (pid %s)", stale, pid)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
