"""Kernel compiles handed to worker processes (engine/kernel_compile.py), on a machine without a
GPU. A real wrapper's launches go through Triton's own JIT path, told the target by the same
driver a worker uses (sm_90); the hook skips them and worker processes compile them; then this
process finds every one in the kernel cache. The GPU side (a rank's warm-up, then the capture
compiling nothing) is in tests/engine/test_gpu.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from dist_infer.engine import fused_gpu, kernel_compile  # noqa: E402
from dist_infer.engine.kernel_compile import (MAX_WORKERS, RECORD, WORKERS_ENV, CompileOnlyDriver,  # noqa: E402
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


# A real kernel with a specialization Triton cannot read: its compile fails in the worker.
BAD = SimpleNamespace(module=fused_gpu.__name__, name="_silu_mul_kernel", jit_function=fused_gpu._silu_mul_kernel)
BAD_SPEC = {"specialization_data": "{}"}


def test_a_failed_compile_is_reported_and_left_to_the_rank(caplog, tmp_path):
    with KernelCompilePool(1, SM90, tmp_path) as pool, pool.handing_over():
        skipped = pool._hand_over(fn=BAD, compile=BAD_SPEC)
        with caplog.at_level(logging.WARNING):
            compiled, failed = pool.wait()
    assert skipped is True
    assert (compiled, failed) == (0, ["_silu_mul_kernel"])
    assert "_silu_mul_kernel in a worker process failed (KeyError" in caplog.text
    assert not (tmp_path / RECORD).exists()  # nothing compiled, nothing recorded
    assert [p.poll() for p in pool.processes] == [0]  # the worker ended with its input


def test_a_dead_worker_fails_its_compiles_instead_of_hanging(caplog, tmp_path):
    with KernelCompilePool(1, SM90, tmp_path) as pool, pool.handing_over():
        pool._start_workers()
        pool.processes[0].kill()
        pool.processes[0].wait()
        assert pool._hand_over(fn=BAD, compile=BAD_SPEC) is True
        with caplog.at_level(logging.WARNING):
            assert pool.wait() == (0, ["_silu_mul_kernel"])
    assert "the worker process exited" in caplog.text


def test_a_stuck_compile_is_left_to_the_rank(caplog, monkeypatch, tmp_path):
    (tmp_path / "slow_kernels.py").write_text("import time\ntime.sleep(120)\n")  # the worker's import hangs
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "slow_kernels", SimpleNamespace(k=fused_gpu._silu_mul_kernel))
    monkeypatch.setattr(kernel_compile, "COMPILE_TIMEOUT_S", 3)
    slow = SimpleNamespace(module="slow_kernels", name="k", jit_function=fused_gpu._silu_mul_kernel)
    started = time.perf_counter()
    with KernelCompilePool(1, SM90, tmp_path) as pool, pool.handing_over():
        assert pool._hand_over(fn=slow, compile=BAD_SPEC) is True
        with caplog.at_level(logging.WARNING):
            assert pool.wait() == (0, ["k"])
    assert time.perf_counter() - started < 60
    assert pool.processes[0].returncode == -signal.SIGKILL  # killed on the way out, not waited for
    assert "took over 3 s" in caplog.text


def test_the_hook_never_fails_a_launch_and_skips_only_what_a_worker_can_compile(caplog, tmp_path):
    with KernelCompilePool(1, SM90, tmp_path) as pool, pool.handing_over():
        answers = []
        other = threading.Thread(target=lambda: answers.append(pool._hand_over(fn=BAD, compile=BAD_SPEC)))
        other.start()
        other.join()
        assert answers == [False]  # another thread's launch runs as usual
        nested = SimpleNamespace(module=fused_gpu.__name__, name="f.<locals>.k", jit_function=fused_gpu._silu_mul_kernel)
        assert pool._hand_over(fn=nested, compile=BAD_SPEC) is False  # not findable by a worker: compiled here
        assert pool.pending == {} and not pool.broken
        with caplog.at_level(logging.WARNING):  # a kernel info without its JITFunction: the hook's own error
            assert pool._hand_over(fn=SimpleNamespace(module="m", name="k"), compile=BAD_SPEC) is False
        assert pool.broken and pool._hand_over(fn=BAD, compile=BAD_SPEC) is False
    assert "the rank compiles its kernels itself" in caplog.text
    assert pool.processes == []  # nothing was handed over, so no worker started
    assert pool._hand_over(fn=BAD, compile=BAD_SPEC) is False  # after the pass: nothing is skipped


UNGUARDED_SCRIPT = """
import sys
from types import SimpleNamespace
with open(sys.argv[1], "a") as runs:
    runs.write("ran\\n")
from triton.backends.compiler import GPUTarget
from dist_infer.engine import fused_gpu
from dist_infer.engine.kernel_compile import KernelCompilePool
fn = SimpleNamespace(module=fused_gpu.__name__, name="_silu_mul_kernel", jit_function=fused_gpu._silu_mul_kernel)
with KernelCompilePool(2, GPUTarget("cuda", 90, 32), sys.argv[2]) as pool, pool.handing_over():
    pool._hand_over(fn=fn, compile={"specialization_data": "{}"})
    print(pool.wait())
"""


def test_workers_do_not_run_the_users_script_again(tmp_path):
    """A user's script without a main guard (as `LLM(...)` examples are written) runs once: the
    workers are not multiprocessing children, which would each run it again. The worker did run
    (its KeyError came back), from a directory that holds no dist_infer."""
    script, runs = tmp_path / "user.py", tmp_path / "runs.txt"
    script.write_text(UNGUARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, str(script), str(runs), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(0, ['_silu_mul_kernel'])"
    assert "failed (KeyError" in proc.stderr
    assert runs.read_text() == "ran\n"


def test_worker_count(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "0")
    assert compile_workers(8) == 0
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert compile_workers(8) == 3
    monkeypatch.delenv(WORKERS_ENV)
    assert 1 <= compile_workers(1) <= MAX_WORKERS
    assert compile_workers(10_000) == 1  # more GPUs than CPUs: still one
    for bad in ("four", "²"):
        monkeypatch.setenv(WORKERS_ENV, bad)
        with pytest.raises(EngineError, match=f"DIST_INFER_COMPILE_WORKERS='{bad}' is not a number"):
            compile_workers(1)
