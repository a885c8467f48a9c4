"""Triton kernels compiled in worker processes while a rank loads.

A first launch compiles about 15 Triton kernels (each kernel at each specialization the step
graphs use). Compiled one after another inside the rank, that was ~9 s of a 14.5 s launch
(docs/PERFORMANCE.md, "Fast start"), and the compiler held the GIL that the weight reader
beside it needed. Here the rank's warm-up pass runs with every launch that would compile
skipped instead: Triton's `jit_cache_hook` hands the kernel's specialization to a pool of
spawned processes, which compile it into the same on-disk kernel cache (TRITON_CACHE_DIR, the
engine's own, is inherited). The graph capture that follows loads every kernel from there.

A record in the cache directory (RECORD) lists what the workers compiled into it, so a later
launch lets Triton load those kernels itself and starts no process at all. A worker needs no
GPU context: it compiles for the rank's target (arch, warp size), given to Triton through
`CompileOnlyDriver`. A kernel that fails in a worker is compiled again by the rank when the
capture runs it, where its error is raised as before.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

from dist_infer.errors import EngineError

log = logging.getLogger(__name__)

WORKERS_ENV = "DIST_INFER_COMPILE_WORKERS"  # 0: compile inside the rank, as before this module
MAX_WORKERS = 16  # about as many kernels as a warm-up compiles
RECORD = "dist_infer-compiled.json"  # in the kernel cache directory: the record's entries (see `entry`)


def compile_workers(gpus_on_node: int) -> int:
    """Processes per rank: $DIST_INFER_COMPILE_WORKERS, else this node's usable CPUs shared
    by its ranks (one per GPU), at most MAX_WORKERS."""
    if (asked := os.environ.get(WORKERS_ENV, "").strip()) != "":
        if not asked.isdigit():
            raise EngineError(f"{WORKERS_ENV}={asked!r} is not a number of processes: set a whole number "
                              "(0 compiles the Triton kernels inside each rank) or unset it.")
        return int(asked)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus // max(1, gpus_on_node)))


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


def compile_in_worker(target: tuple[str, int, int], module: str, qualname: str, specialization: str) -> float:
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
    first kernel the cache's record does not hold; `wait()` returns once every one is in the
    cache. A context manager: leaving it stops the processes (and drops compiles not started,
    when it is left by an error)."""

    def __init__(self, workers: int, target, cache_dir: str | Path):
        self.workers = workers
        self.target = (target.backend, target.arch, target.warp_size)
        self.record = Path(cache_dir) / RECORD
        self.known = self._read_record()
        self.found = 0  # kernels the record holds: Triton loads them from the cache
        self.pending: dict[str, tuple[object, str, Future]] = {}  # specialization -> (kernel info, entry, compile)
        self.pool: ProcessPoolExecutor | None = None
        self.started = time.perf_counter()
        self.slowest: tuple[str, float] | None = None

    def __enter__(self) -> KernelCompilePool:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc_type is None, cancel_futures=True)

    @contextmanager
    def handing_over(self):
        """Inside: a Triton launch whose kernel is neither compiled in this process nor in the
        record is skipped (not run) and its compile submitted to a worker. Only for passes
        whose outputs are dropped."""
        from triton import knobs

        previous = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = self._hand_over
        try:
            yield self
        finally:
            knobs.runtime.jit_cache_hook = previous

    def _hand_over(self, *, fn, compile, **_) -> bool:
        """Triton's hook, before it compiles: True skips the compile and the launch."""
        spec = compile["specialization_data"]
        if spec in self.pending:  # every layer launches the same specializations
            return True
        key = entry(fn.jit_function, spec)
        if key in self.known:
            self.found += 1
            return False
        self.pending[spec] = (fn, key, self._submit(fn.module, fn.name, spec))
        return True

    def _submit(self, module: str, qualname: str, spec: str) -> Future:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        return self.pool.submit(compile_in_worker, self.target, module, qualname, spec)

    def wait(self) -> tuple[int, list[str]]:
        """Block until every submitted compile ended and record the ones that succeeded;
        (kernels compiled, names that failed). `slowest` is then (name, seconds) of the longest."""
        seconds = {key: (fn.name, self._seconds(fn.name, future)) for fn, key, future in self.pending.values()}
        done = {key for key, (_, took) in seconds.items() if took is not None}
        if done:
            self._write_record(self.known | done)
            self.slowest = max((seconds[key] for key in done), key=lambda named: named[1])
        return len(done), sorted({name for key, (name, _) in seconds.items() if key not in done})

    @staticmethod
    def _seconds(name: str, future: Future) -> float | None:
        """The compile's seconds, or None where it failed."""
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - the rank compiles it again and raises there if it must
            log.warning("compiling Triton kernel %s in a worker process failed (%s: %s); the rank compiles it "
                        "itself", name, type(exc).__name__, str(exc)[:300])
            return None

    def _read_record(self) -> set[str]:
        try:
            return set(json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError):  # none yet, or unreadable: compile what the pass asks for
            return set()

    def _write_record(self, entries: set[str]) -> None:
        """Atomically (ranks sharing a cache directory may write it at once); a read-only cache
        keeps its old record."""
        tmp = self.record.with_name(f"{RECORD}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(sorted(entries)))
            os.replace(tmp, self.record)
        except OSError as exc:
            log.debug("kernel record %s not written: %s", self.record, exc)
