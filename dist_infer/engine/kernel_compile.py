"""A step's Triton kernels compiled on several threads before the step first runs.

Triton compiles a kernel the first time it is launched with a new specialization, on the
launching thread, one kernel after another: most of a first launch's load went to this
(~10 s of the 8B shape's, on an H100 host). The compiler spends that time outside the GIL
(MLIR and LLVM passes, ptxas), so threads compile side by side. The kernels a step needs are
found by running it once with every launch that would compile recorded and skipped instead
(its outputs are garbage: RankEngine does this while its weights are still arriving), then
compiled on threads by Triton's own `JITFunction.preload`, which fills the caches a launch
would have (in memory, and the engine's kernel directory on disk).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)


def compile_step_kernels(dry_run: Callable[[], None], device: torch.device) -> int:
    """Run `dry_run` with the launches that would compile skipped, then compile those kernels
    on threads. Returns how many were compiled (0 where this Triton lacks the hooks: the
    kernels then compile at their first launch, as before)."""
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
    except ImportError:
        return 0
    if not hasattr(knobs, "runtime") or not hasattr(knobs.runtime, "jit_cache_hook") \
            or not hasattr(JITFunction, "preload"):
        return 0
    found = _record_compiles(knobs.runtime, dry_run)
    if found:
        threads = min(len(found), len(os.sched_getaffinity(0)))
        with ThreadPoolExecutor(threads, thread_name_prefix="compile", initializer=_use_device,
                                initargs=(device,)) as pool:
            list(pool.map(lambda item: item[1].preload(item[0]), found.items()))
    return len(found)


def _record_compiles(runtime, dry_run: Callable[[], None]) -> dict:
    """{specialization data: JITFunction} of every launch in `dry_run` that needed a compile."""
    found: dict = {}

    def record(*, fn, compile, **_) -> bool:
        data = compile.get("specialization_data")
        if data is None:  # nothing to preload from: compile at this launch, as usual
            return False
        found.setdefault(data, fn.jit_function)
        return True  # skip the compile and the launch

    previous, runtime.jit_cache_hook = runtime.jit_cache_hook, record
    try:
        dry_run()
    finally:
        runtime.jit_cache_hook = previous
    return found


def _use_device(device: torch.device) -> None:
    """A compile thread's current device is the rank's: Triton keys its kernel cache by it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
