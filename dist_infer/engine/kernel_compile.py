"""Triton kernels compiled in worker processes while a rank loads.

A first launch compiles about 15 Triton kernels (each kernel at each specialization the step
graphs use). Compiled one after another inside the rank, that was ~9 s of a 14.5 s launch
(docs/PERFORMANCE.md, "Fast start"), and the compiler held the GIL that the weight reader
beside it needed. Here the rank's warm-up pass runs with every launch that would compile
skipped instead: Triton's `jit_cache_hook` hands the kernel's specialization to worker
processes, which compile it into the rank's on-disk kernel cache (the engine's own). The graph
capture that follows loads every kernel from there.

A record in the cache directory (RECORD) lists what the workers compiled into it, so a later
launch lets Triton load those kernels itself and starts no process at all. A worker needs no
GPU context: it compiles for the rank's target (arch, warp size), given to Triton through
`CompileOnlyDriver`. A kernel that fails in a worker (or a worker that dies) is compiled again
by the rank when the capture runs it, where its error is raised as before.

A worker is `python -m dist_infer.engine.kernel_compile`, fed one request per line, rather
than a multiprocessing child: a spawned child re-runs the parent's `__main__` script, and a
user's `LLM(...)` script without a main guard would load the engine again in every worker. It
exits at the end of its input, so it goes with the rank however the rank ends.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from pathlib import Path

from dist_infer.errors import EngineError

log = logging.getLogger(__name__)

WORKERS_ENV = "DIST_INFER_COMPILE_WORKERS"  # 0: compile inside the rank, as before this module
# An 8B first launch on a 16-CPU H100 host: 8 workers took 6.9-7.2 s for its 15 kernels, 16 took 8.0-8.4 s
# (each worker imports torch and Triton, beside the weight read's hash threads).
MAX_WORKERS = 8
RECORD = "dist_infer-compiled.json"  # in the kernel cache directory: the record's entries (see `entry`)
COMPILE_TIMEOUT_S = 300  # a rank waits this long for its workers; then it compiles what is left itself


def compile_workers(ranks_on_node: int) -> int:
    """Processes per rank: $DIST_INFER_COMPILE_WORKERS, else this node's usable CPUs shared
    by its ranks, at most MAX_WORKERS."""
    if (asked := os.environ.get(WORKERS_ENV, "").strip()) != "":
        if not (asked.isascii() and asked.isdigit()):
            raise EngineError(f"{WORKERS_ENV}={asked!r} is not a number of processes: set a whole number "
                              "(0 compiles the Triton kernels inside each rank) or unset it.")
        return int(asked)
    from dist_infer.comm.bootstrap import usable_cpus  # not at import: the Ray driver reads this module's names

    return max(1, min(MAX_WORKERS, usable_cpus() // max(1, ranks_on_node)))


def entry(kernel, specialization: str) -> str:
    """What the record keeps for a compiled kernel: its Triton version, source (with the
    functions it calls) and specialization, hashed. A changed kernel is a new entry."""
    import triton

    return hashlib.sha256(f"{triton.__version__}\0{kernel.cache_key}\0{specialization}".encode()).hexdigest()


class CompileOnlyDriver:
    """Triton's active driver in a process that only compiles: it answers what to compile for,
    so Triton never asks a GPU."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_target(self):
        return self.target


def compile_in_worker(target: tuple[str, int, int] | list, module: str, qualname: str, specialization: str) -> float:
    """In a worker: compile one kernel specialization (Triton's serialized form) for `target`
    (backend, arch, warp size) into the kernel cache, with its launcher. Returns the seconds
    that took (after the imports)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    driver.set_active(CompileOnlyDriver(GPUTarget(*target)))
    kernel = getattr(importlib.import_module(module), qualname)
    started = time.perf_counter()
    _build_launcher(kernel.preload(specialization))
    return time.perf_counter() - started


def _build_launcher(compiled) -> None:
    """Triton 3.6 builds a C launcher per kernel signature (gcc, ~0.2 s) when a kernel is first
    loaded, into the same cache: build it here too. That needs the GPU driver's library, not a
    context; where there is none (a CPU machine), the rank builds it."""
    from triton.runtime.driver import driver

    try:
        gpu_driver = driver.default
    except RuntimeError:  # Triton found no GPU driver on this machine
        return
    driver.set_active(gpu_driver)
    gpu_driver.launcher_cls(compiled.src, compiled.metadata)


class KernelCompilePool:
    """Hands the compiles of a pass under `handing_over()` to worker processes, started at the
    first kernel the cache's record does not hold; `wait()` returns once every one ended. A
    context manager: leaving it ends the workers (kills them, when it is left by an error)."""

    def __init__(self, workers: int, target, cache_dir: str | Path):
        self.workers = workers
        self.target = (target.backend, target.arch, target.warp_size)
        self.cache_dir = Path(cache_dir)
        self.record = self.cache_dir / RECORD
        self.known = self._read_record()
        self.found = 0  # kernels the record holds: Triton loads them from the cache
        self.pending: dict[str, tuple[object, str, Future]] = {}  # specialization -> (kernel info, entry, compile)
        self.requests: queue.SimpleQueue = queue.SimpleQueue()  # (future, request); None ends a feeder
        self.processes: list[subprocess.Popen] = []
        self.feeders: list[threading.Thread] = []
        self.pass_thread: int | None = None  # the thread whose launches are handed over
        self.broken = False  # a worker could not start: the rank compiles the rest itself
        self.started = time.perf_counter()
        self.slowest: tuple[str, float] | None = None

    def __enter__(self) -> KernelCompilePool:
        return self

    def __exit__(self, exc_type, *_) -> None:
        """Workers end at the end of their input; after an error, or with a compile still running
        (past the timeout), they are killed."""
        unfinished = any(not future.done() for _, _, future in self.pending.values())
        for _ in self.feeders:
            self.requests.put(None)
        for process in self.processes:
            if exc_type is not None or unfinished:
                process.kill()
            with suppress(OSError):  # a worker that died left a broken pipe
                process.stdin.close()
        for feeder in self.feeders:
            feeder.join()
        for process in self.processes:
            process.wait()
            process.stdout.close()

    @contextmanager
    def handing_over(self):
        """Inside: a launch from this thread whose kernel is neither compiled in this process nor
        in the record is skipped (not run) and its compile handed to a worker. Only for passes
        whose outputs are dropped."""
        from triton import knobs

        previous, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, self._hand_over
        self.pass_thread = threading.get_ident()
        try:
            yield self
        finally:
            self.pass_thread = None  # a hook left installed (passes overlapping in threads) skips nothing
            if knobs.runtime.jit_cache_hook == self._hand_over:
                knobs.runtime.jit_cache_hook = previous

    def _hand_over(self, *, fn, compile, **_) -> bool:
        """Triton's hook, before it compiles: True skips the compile and the launch."""
        if self.broken or threading.get_ident() != self.pass_thread:
            return False
        try:
            return self._skip_and_submit(fn, compile["specialization_data"])
        except Exception as exc:  # noqa: BLE001 - never fail a launch here: the rank compiles as before
            self.broken = True
            log.warning("handing Triton compiles to worker processes failed (%s: %s); the rank compiles its "
                        "kernels itself", type(exc).__name__, exc)
            return False

    def _skip_and_submit(self, fn, spec: str) -> bool:
        if spec in self.pending:  # every layer launches the same specializations
            return True
        if not _importable_as(fn):
            return False
        key = entry(fn.jit_function, spec)
        if key in self.known:
            self.found += 1
            return False
        request = dict(id=len(self.pending), target=self.target, module=fn.module, qualname=fn.name,
                       specialization=spec)
        self.pending[spec] = (fn, key, self._submit(request))
        return True

    def _submit(self, request: dict) -> Future:
        if not self.processes:
            self._start_workers()
        future = Future()
        self.requests.put((future, request))
        return future

    def _start_workers(self) -> None:
        # The rank's import path (and not the working directory, first under -m), so a worker
        # imports the kernels from where the rank did; the rank's kernel cache.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path), "PYTHONSAFEPATH": "1",
               "TRITON_CACHE_DIR": str(self.cache_dir)}
        for _ in range(self.workers):
            process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)
            self.processes.append(process)
            self.feeders.append(threading.Thread(target=self._feed, args=(process,), daemon=True,
                                                 name="kernel-compile-feeder"))
            self.feeders[-1].start()

    def _feed(self, process: subprocess.Popen) -> None:
        """One worker's requests, one at a time. Once it has died, each request it takes fails
        (the rank compiles those kernels)."""
        while (item := self.requests.get()) is not None:
            future, request = item
            try:
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
                answer = _answer(process, request["id"])
            except Exception as exc:  # noqa: BLE001 - whatever broke, the rank compiles this kernel itself
                future.set_exception(RuntimeError(f"the worker process exited ({type(exc).__name__}: {exc})"))
                continue
            if "error" in answer:
                future.set_exception(RuntimeError(answer["error"]))
            else:
                future.set_result(answer["seconds"])

    def wait(self) -> tuple[int, list[str]]:
        """Block until every submitted compile ended (at most COMPILE_TIMEOUT_S) and record the
        ones that succeeded; (kernels compiled, names that failed). `slowest` is then (name,
        seconds) of the longest."""
        deadline = time.perf_counter() + COMPILE_TIMEOUT_S
        seconds = {key: (fn.name, self._seconds(fn.name, future, deadline))
                   for fn, key, future in self.pending.values()}
        done = {key for key, (_, took) in seconds.items() if took is not None}
        if done:
            self._write_record(done)
            self.slowest = max((seconds[key] for key in done), key=lambda named: named[1])
        return len(done), sorted({name for key, (name, _) in seconds.items() if key not in done})

    @staticmethod
    def _seconds(name: str, future: Future, deadline: float) -> float | None:
        """The compile's seconds, or None where it failed or did not end in time."""
        try:
            return future.result(timeout=max(0.0, deadline - time.perf_counter()))
        except FutureTimeout:
            log.warning("compiling Triton kernel %s in a worker process took over %d s; the rank compiles it "
                        "itself", name, COMPILE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the rank compiles it again and raises there if it must
            log.warning("compiling Triton kernel %s in a worker process failed (%s); the rank compiles it itself",
                        name, str(exc)[:300])
        return None

    def _read_record(self) -> set[str]:
        try:
            return set(json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError):  # none yet, or unreadable: compile what the pass asks for
            return set()

    def _write_record(self, done: set[str]) -> None:
        """Merged with the record as it is now (ranks or replicas may share the cache directory)
        and replaced atomically; a read-only cache keeps its old record."""
        tmp = None
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.record.parent, prefix=RECORD, delete=False) as file:
                tmp = Path(file.name)
                file.write(json.dumps(sorted(self._read_record() | done)))
            tmp.chmod(0o644)  # not the temporary file's 0600: other users of a shared cache read it too
            os.replace(tmp, self.record)
        except OSError as exc:
            log.debug("kernel record %s not written: %s", self.record, exc)
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def _importable_as(fn) -> bool:
    """Whether a worker finds this very kernel under its module and name (not, say, a kernel
    nested in a function, or one wrapped by triton.autotune, whose tuning runs need real launches)."""
    return getattr(sys.modules.get(fn.module), fn.name, None) is fn.jit_function


def _answer(process: subprocess.Popen, request_id: int) -> dict:
    """The worker's answer to `request_id`; lines that are not answers (something printed before
    the worker took over its stdout) are passed over."""
    while line := process.stdout.readline():
        with suppress(ValueError):
            answer = json.loads(line)
            if isinstance(answer, dict) and answer.get("id") == request_id:
                return answer
    raise EOFError("no answer")


def serve() -> None:
    """A worker's loop: a JSON request (an id and compile_in_worker's arguments) per line on
    stdin, a JSON answer per line on stdout ({"id", "seconds"} or {"id", "error"}); it ends with
    its input. Ctrl-C is the rank's to handle: the worker ends when the rank does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the compiler prints goes to stderr, not into the answers
    for line in sys.stdin:
        request = json.loads(line)
        request_id = request.pop("id")
        try:
            answer = {"id": request_id, "seconds": compile_in_worker(**request)}
        except Exception as exc:  # noqa: BLE001 - reported to the rank, which compiles the kernel itself
            answer = {"id": request_id, "error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
