"""A rank's weights read from its engine file into the model's parameters by a thread,
while the rank goes on with its start-up.

The model's parameters are allocated (uninitialized) on the device first, so the
KV pool can be sized and the step's kernels compiled (eager warm-up steps, whose
outputs are thrown away) before the weights have arrived; the graphs are captured
once they have. A first launch of the 8B shape on an H100 host compiles ~9 s of Triton
kernels and reads ~4 s of weights: in turn they took their sum, side by side the
longer of the two (load 12.2-17.0 s -> 10.5-12.9 s, docs/PERFORMANCE.md). The sha256
pieces are checked by threads beside the read.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dist_infer.errors import CheckpointError, EngineError
from dist_infer.partition.checkpoint import verify_file

log = logging.getLogger(__name__)


def allocate_parameters(model: nn.Module, device: torch.device) -> dict[str, nn.Parameter]:
    """Give every parameter uninitialized storage on `device` (shared ones, a tied head, stay
    shared) and return them by name, each once. Buffers are left to `model.to(device)`."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device != device:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                module.register_parameter(name, made[id(param)])
    return dict(model.named_parameters())


class WeightLoad:
    """Fills `params` from the safetensors file at `path` on a thread (started by `start`), in
    file order; `wait` returns once every byte is in place and verified, or raises EngineError."""

    def __init__(self, path: Path, params: dict[str, nn.Parameter], expected: dict | None, what: str, fix: str):
        self.path, self.params, self.what, self.fix = path, params, what, fix
        self._check_names()
        self._expected = expected  # engine.json's entry (size, sha256 pieces); None: not verified
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._read: Future | None = None
        self._verify: Future | None = None
        self.started = 0.0

    def _check_names(self) -> None:
        try:
            with safe_open(self.path, framework="pt") as f:
                stored = set(f.keys())
        except Exception as exc:  # not a safetensors file at all (safetensors' own error)
            raise EngineError(f"{self.what}: cannot read {self.path}: {exc}. {self.fix}") from exc
        missing, unexpected = sorted(self.params.keys() - stored), sorted(stored - self.params.keys())
        if missing or unexpected:
            raise EngineError(f"{self.what} weights do not match the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}. {self.fix}")

    def start(self) -> None:
        self.started = time.perf_counter()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="weights")
        if self._expected is not None:
            self._verify = self._pool.submit(verify_file, self.path, self._expected, self.what, self.fix)
        self._read = self._pool.submit(self._fill)

    def _fill(self) -> None:
        device = next(iter(self.params.values())).device
        on_gpu = device.type == "cuda"
        if on_gpu:
            torch.cuda.set_device(device)  # this thread's CUDA calls go to the rank's GPU, not GPU 0
        # Its own stream, so the copies overlap the warm-up steps on the rank's stream.
        with safe_open(self.path, framework="pt") as f, torch.cuda.stream(torch.cuda.Stream()) if on_gpu \
                else nullcontext():
            for name in f.offset_keys():
                if self._stop.is_set():
                    return
                self._copy(name, f.get_tensor(name))
            if on_gpu:
                torch.cuda.current_stream().synchronize()

    def _copy(self, name: str, stored: torch.Tensor) -> None:
        param = self.params[name]
        if stored.shape != param.shape or stored.dtype != param.dtype:
            raise EngineError(f"{self.what}: {name} is {stored.dtype} {tuple(stored.shape)} in {self.path}, the "
                              f"model needs {param.dtype} {tuple(param.shape)}. {self.fix}")
        param.data.copy_(stored)

    def wait(self) -> None:
        """Block until the weights are in place; a damaged file is the engine's error (the
        manifest's verdict first: it names the bytes that differ)."""
        if self._read is None:
            self.start()
        waited = time.perf_counter()
        try:
            self._read.result()
        except Exception as exc:
            self._raise_if_corrupt()
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"{self.what}: cannot read {self.path}: {exc}. {self.fix}") from exc
        except BaseException:  # SIGTERM or ^C while waiting: stop reading, not only waiting
            self._stop.set()
            raise
        finally:
            self._pool.shutdown(wait=True)  # the verification too: its verdict is read next
        self._raise_if_corrupt()
        done = time.perf_counter()
        log.info("%s: weights read in %.2f s (%.2f GB/s)%s, %.2f s of it waited for", self.what, done - self.started,
                 self.path.stat().st_size / (done - self.started) / 1e9,
                 ", sha256 verified beside" if self._verify else "", done - waited)

    def _raise_if_corrupt(self) -> None:
        try:
            if self._verify is not None:
                self._verify.result()
        except CheckpointError as exc:
            raise EngineError(str(exc)) from exc

    def cancel(self) -> None:
        """Stop reading (start-up failed elsewhere) and wait for the threads to end."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
