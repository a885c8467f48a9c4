"""Kernel compiles handed to worker processes (engine/kernel_compile.py), on a machine without a
GPU. A real wrapper's launches go through Triton's own JIT path, told the target by the same
driver a worker uses (sm_90); the hook skips them and spawned processes compile them; then this
process finds every one in the kernel cache. The GPU side (a rank's warm-up, then the capture
compiling nothing) is in tests/engine/test_gpu.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from dist_infer.engine import fused_gpu  # noqa: E402
from dist_infer.engine.kernel_compile import (RECORD, WORKERS_ENV, CompileOnlyDriver,  # noqa: E402
                                              KernelCompilePool, compile_workers)
from dist_infer.errors import EngineError  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


class RecordingDriver(CompileOnlyDriver):
    """A launch also asks for the current stream (a worker's preload does not)."""

    def get_current_stream(self, device):
        return 0


@pytest.fixture
def sm90(monkeypatch, tmp_path):
    """Triton in this process compiles for sm_90, into an empty kernel cache."""
    monkeypatch.setattr(driver, "_active", RecordingDriver(SM90))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))


def silu_mul_launches():
    """Two specializations (bf16 and FP8 output), the bf16 one launched twice (as every layer does)."""
    gate_up = torch.randn(3, 512, dtype=torch.bfloat16)
    fused_gpu.silu_mul(gate_up)
    fused_gpu.silu_mul(gate_up)
    fused_gpu.silu_mul(gate_up, fp8_out=True)


def cache_hits(specializations: list[tuple[str, str]]) -> list[bool]:
    """Load each (kernel name, specialization) as a rank would: True where the cache had it."""
    hits = []
    previous, knobs.compilation.listener = knobs.compilation.listener, lambda **kw: hits.append(kw["cache_hit"])
    try:
        for name, spec in specializations:
            getattr(fused_gpu, name).preload(spec)
    finally:
        knobs.compilation.listener = previous
    return hits


def test_workers_compile_what_the_pass_would_have(sm90, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    with KernelCompilePool(2, SM90, cache) as pool:
        with pool.handing_over():
            silu_mul_launches()
        assert knobs.runtime.jit_cache_hook is None  # the hook is the pass's only
        submitted = [(fn, spec) for spec, (fn, _, _) in pool.pending.items()]
        compiled, failed = pool.wait()
    assert sorted(fn.name for fn, _ in submitted) == ["_silu_mul_fp8_kernel", "_silu_mul_kernel"]
    assert (compiled, failed) == (2, [])
    assert pool.slowest[0] in {"_silu_mul_fp8_kernel", "_silu_mul_kernel"} and pool.slowest[1] > 0
    assert cache_hits([(fn.name, spec) for fn, spec in submitted]) == [True, True]
    # The next load finds both in the cache's record: Triton loads them itself, and no process starts.
    assert len(json.loads((cache / RECORD).read_text())) == 2
    with KernelCompilePool(2, SM90, cache) as again, again.handing_over():
        assert [again._hand_over(fn=fn, compile={"specialization_data": spec}) for fn, spec in submitted] == [False] * 2
        assert (again.found, again.pending, again.processes) == (2, {}, [])
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "empty"))  # the check can tell: another cache misses
    assert cache_hits([(fn.name, spec) for fn, spec in submitted[:1]]) == [False]


MISSING = SimpleNamespace(module=fused_gpu.__name__, name="no_such_kernel", jit_function=fused_gpu._silu_mul_kernel)


def test_a_failed_compile_is_reported_and_left_to_the_rank(caplog, tmp_path):
    with KernelCompilePool(1, SM90, tmp_path) as pool, pool.handing_over():
        skipped = pool._hand_over(fn=MISSING, compile={"specialization_data": "{}"})
        with caplog.at_level(logging.WARNING):
            compiled, failed = pool.wait()
    assert skipped is True
    assert (compiled, failed) == (0, ["no_such_kernel"])
    assert "no_such_kernel in a worker process failed (AttributeError" in caplog.text
    assert not (tmp_path / RECORD).exists()  # nothing compiled, nothing recorded
    assert [p.poll() for p in pool.processes] == [0]  # the worker ended with its input


def test_a_dead_worker_fails_its_compiles_instead_of_hanging(caplog, tmp_path):
    with KernelCompilePool(1, SM90, tmp_path) as pool, pool.handing_over():
        pool._start_workers()
        pool.processes[0].kill()
        pool.processes[0].wait()
        assert pool._hand_over(fn=MISSING, compile={"specialization_data": "{}"}) is True
        with caplog.at_level(logging.WARNING):
            assert pool.wait() == (0, ["no_such_kernel"])
    assert "the worker process exited" in caplog.text


def test_the_hook_never_fails_a_launch_and_ignores_other_threads(caplog, tmp_path):
    with KernelCompilePool(1, SM90, tmp_path) as pool, pool.handing_over():
        answers = []
        other = threading.Thread(target=lambda: answers.append(
            pool._hand_over(fn=MISSING, compile={"specialization_data": "{}"})))
        other.start()
        other.join()
        assert answers == [False] and pool.pending == {}  # another thread's launch runs as usual
        with caplog.at_level(logging.WARNING):  # a kernel info without its JITFunction: the hook's own error
            assert pool._hand_over(fn=SimpleNamespace(module="m", name="k"), compile={"specialization_data": "{}"}) \
                is False
        assert pool.broken and pool._hand_over(fn=MISSING, compile={"specialization_data": "{}"}) is False
    assert "the rank compiles its kernels itself" in caplog.text
    assert pool.processes == []  # nothing was handed over, so no worker started


UNGUARDED_SCRIPT = """
import sys
from pathlib import Path
from types import SimpleNamespace
with open(sys.argv[1], "a") as runs:
    runs.write("ran\\n")
from triton.backends.compiler import GPUTarget
from dist_infer.engine import fused_gpu
from dist_infer.engine.kernel_compile import KernelCompilePool
fn = SimpleNamespace(module=fused_gpu.__name__, name="x", jit_function=fused_gpu._silu_mul_kernel)
with KernelCompilePool(2, GPUTarget("cuda", 90, 32), sys.argv[2]) as pool, pool.handing_over():
    pool._hand_over(fn=fn, compile={"specialization_data": "{}"})
    print(pool.wait())
"""


def test_workers_do_not_run_the_users_script_again(tmp_path):
    """A user's script without a main guard (as `LLM(...)` examples are written) runs once: the
    workers are not multiprocessing children, which would each run it again."""
    script, runs = tmp_path / "user.py", tmp_path / "runs.txt"
    script.write_text(UNGUARDED_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(runs), str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(0, ['x'])"
    assert runs.read_text() == "ran\n"


def test_worker_count(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")
    assert compile_workers(8) == 0
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert compile_workers(8) == 3
    monkeypatch.delenv(WORKERS_ENV)
    assert 1 <= compile_workers(1) <= 16
    assert compile_workers(10_000) == 1  # more GPUs than CPUs: still one
    monkeypatch.setenv(WORKERS_ENV, "four")
    with pytest.raises(EngineError, match="DIST_INFER_COMPILE_WORKERS='four' is not a number"):
        compile_workers(1)
