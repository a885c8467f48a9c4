"""Load a built engine for one rank and run its part of a step."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_infer.comm.base import collective_call
from dist_infer.comm.bootstrap import ranks_on_this_node
from dist_infer.comm.groups import ParallelGroups
from dist_infer.config import BuildConfig, KVCacheConfig, Mapping, ModelConfig
from dist_infer.engine.build import DTYPES, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, rank_weights_file
from dist_infer.engine.kernel_compile import KernelCompilePool, compile_workers
from dist_infer.engine.kernels import kernels_for
from dist_infer.engine.kv_cache import KV_STORAGE_DTYPES, PagedKVCache, StepBatch
from dist_infer.engine.model import StageModel, local_heads
from dist_infer.engine.weight_loader import WeightLoad, allocate_parameters
from dist_infer.errors import CheckpointError, EngineError, LaunchError
from dist_infer.partition.checkpoint import verify_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """engine.json, validated."""

    directory: Path
    model: ModelConfig
    mapping: Mapping
    build: BuildConfig
    vocab_size_padded: int
    files: dict

    @classmethod
    def read(cls, directory: Path) -> EngineSpec:
        directory = Path(directory)
        path = directory / "engine.json"
        if not path.is_file():
            hint = (" It looks like a partitioned checkpoint: build it with `dist-infer build --checkpoint "
                    f"{directory} --out ENGINE_DIR`." if (directory / "manifest.json").is_file() else "")
            raise EngineError(f"{directory} is not a dist_infer engine (no engine.json).{hint}")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EngineError(f"{path} is not valid JSON ({exc}); rebuild the engine.") from exc
        if spec.get("format") != ENGINE_FORMAT:
            raise EngineError(f"{path} is not a dist_infer engine description.")
        if spec["format_version"] > ENGINE_FORMAT_VERSION:
            raise EngineError(f"{directory} was built with engine format {spec['format_version']} "
                              f"(dist_infer {spec.get('dist_infer_version', '?')}); this dist_infer loads up to "
                              f"format {ENGINE_FORMAT_VERSION}. Upgrade dist_infer or rebuild the engine.")
        return cls(directory, ModelConfig.from_dict(spec["model"]), Mapping.from_dict(spec["mapping"]),
                   BuildConfig.from_dict(spec["build"]), spec["vocab_size_padded"], spec["files"])

    @property
    def weights_id(self) -> str:
        """Names these weights: a digest of the rank files' sizes and sha256 pieces (engine.json's
        `files`), so a refit (new weights) changes it and a copy of the engine keeps it."""
        entries = json.dumps({k: v for k, v in self.files.items() if k.endswith(".safetensors")}, sort_keys=True)
        return hashlib.sha256(entries.encode()).hexdigest()[:16]

    def differences(self, other: EngineSpec) -> list[str]:
        """Where `other` would not fit this engine's loaded model: model fields, layout, build options."""
        out = [f"model.{k}" for k, v in self.model.to_dict().items() if other.model.to_dict()[k] != v]
        if self.mapping.to_dict() != other.mapping.to_dict():
            out.append(f"mapping (tp={other.mapping.tp} pp={other.mapping.pp}, loaded tp={self.mapping.tp} "
                       f"pp={self.mapping.pp})")
        out += [f"build.{k}" for k, v in self.build.to_dict().items() if other.build.to_dict()[k] != v]
        return out + (["vocab_size_padded"] if self.vocab_size_padded != other.vocab_size_padded else [])

    @classmethod
    def read_checked(cls, directory: Path) -> EngineSpec:
        """read(), where an engine.json with missing fields or ones of the wrong type (a hand-edited or
        half-copied engine offered to a running server) is an EngineError, not a crash."""
        try:
            return cls.read(directory)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(f"{Path(directory) / 'engine.json'} is damaged ({type(exc).__name__}: {exc}); "
                              "refit or build the engine again.") from None

    def check_world(self, world_size: int) -> None:
        n = self.mapping.world_size
        if world_size != n:
            raise LaunchError(f"engine {self.directory} was built for tp={self.mapping.tp} x pp={self.mapping.pp} "
                              f"= {n} ranks but this job has {world_size}. Launch it with "
                              f"`mpirun -n {n} dist-infer run --engine {self.directory} ...`"
                              + (" (or plain `dist-infer run` for one rank)." if n == 1 else "."))

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.build.max_seq_len // self.build.kv_block_size)

    @property
    def num_kv_blocks(self) -> int:
        """Enough for max_batch_size full-length sequences per pipeline stage (a pipeline runs one
        micro-batch of up to max_batch_size per stage), plus the scratch block 0."""
        return self.build.max_batch_size * self.mapping.pp * self.blocks_per_seq + 1


def kv_budget_bytes(config: KVCacheConfig, free_bytes: int | None, reserved_bytes: int = 0) -> float | None:
    """Bytes the KV pool may take on one rank (None: no limit but the engine's).
    GPU: `memory_fraction` of the memory free after the weights, once the step's working
    memory (`reserved_bytes`: activations, logits, graph pools) is set aside, as TensorRT-LLM
    measures it after warm-up. CPU (free_bytes None): only config.max_bytes. Both: the smaller."""
    budgets = [] if free_bytes is None else [config.memory_fraction * max(free_bytes - reserved_bytes, 0)]
    if config.max_bytes is not None:
        budgets.append(config.max_bytes)
    return min(budgets, default=None)


def kv_pool_blocks(wanted: int, block_bytes: int, config: KVCacheConfig, free_bytes: int | None = None,
                   reserved_bytes: int = 0) -> int:
    """One rank's KV pool in blocks: `wanted` (max_batch_size full-length sequences per stage plus
    the scratch block), or what the budget holds if that is fewer. An FP8 pool's blocks
    are half the bytes of a bf16 pool's, so the same budget holds twice the blocks."""
    budget = kv_budget_bytes(config, free_bytes, reserved_bytes)
    return wanted if budget is None else min(wanted, int(budget // block_bytes))


FP8_MIN_CAPABILITY = (8, 9)  # Triton's float8 e4m3 conversions: Ada, Hopper and newer


class RankEngine:
    """One rank's model shard, its KV cache and (on CUDA) its decode graphs.
    Construct with `load_rank_engine`, which sizes the KV pool across ranks."""

    def __init__(self, spec: EngineSpec, groups: ParallelGroups, device: str = "cpu", verify: bool = True,
                 weights: dict[str, torch.Tensor] | None = None, kv_cache: KVCacheConfig | None = None):
        spec.check_world(groups.world.size)
        self.spec = spec
        self.mapping = groups.mapping
        self.device = torch.device(device)
        self.dtype = DTYPES[spec.build.dtype]
        self.kv_cache_config = kv_cache or KVCacheConfig()
        # What the pool stores: the engine's dtype, or float8 e4m3 for --kv-cache-dtype fp8.
        self.kv_storage_dtype = KV_STORAGE_DTYPES[self.kv_cache_config.dtype] or self.dtype
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self._check_fp8_kv_support()
        self.model = StageModel(spec.model, self.mapping, groups.tp, spec.vocab_size_padded, self.dtype,
                                spec.build.quant_config)
        self._weights: WeightLoad | None = None  # a read under way (start_loading ... wait_for_weights)
        if weights is None:
            self._weights = self._weight_load(verify)
        else:  # given (random engines, tests)
            self._assign(weights)
        self.model.to(self.device)  # buffers (the rotary tables); parameters are there already
        del weights
        _, self.kv_heads = local_heads(spec.model, self.mapping.tp)
        self.cache: PagedKVCache | None = None
        self.graphs: list = []  # CUDA graph families (decode, mixed) once captured
        self.step_events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] | None = None  # set [] to time steps
        if self.device.type == "cuda":
            self._use_kernel_cache()
        self.model.use_kernels(kernels_for(self.device))  # the device's ops, chosen once (after the Triton cache)

    def _check_fp8_kv_support(self) -> None:
        capability = torch.cuda.get_device_capability(self.device)
        if self.kv_storage_dtype == torch.float8_e4m3fn and capability < FP8_MIN_CAPABILITY:
            raise LaunchError(f"--kv-cache-dtype fp8 needs a GPU with FP8 (compute capability 8.9 or newer: Ada, "
                              f"Hopper, Blackwell); {torch.cuda.get_device_name(self.device)} is "
                              f"{capability[0]}.{capability[1]}. Leave the KV cache in the engine's dtype "
                              "(--kv-cache-dtype auto).")

    @property
    def kv_block_bytes(self) -> int:
        return PagedKVCache.block_bytes(len(self.model.layer_ids), self.spec.build.kv_block_size, self.kv_heads,
                                        self.spec.model.head_dim, self.kv_storage_dtype)

    def kv_blocks_that_fit(self) -> int:
        """This rank's KV pool in blocks (see kv_pool_blocks); load_rank_engine takes the
        smallest over the ranks."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        # Set aside the largest step's activations and logits, and the graphs' pool.
        reserved = 2 * 1024**3 + 4 * self.spec.build.max_batch_size * self.spec.model.vocab_size * 4
        return kv_pool_blocks(self.spec.num_kv_blocks, self.kv_block_bytes, self.kv_cache_config, free, reserved)

    def start_loading(self) -> None:
        """Start reading the weights into the model (a no-op when they were given)."""
        if self._weights is not None:
            self._weights.start()

    def allocate(self, num_blocks: int, cuda_graphs: bool = True) -> None:
        """Allocate the KV pool (the same size on every rank); on CUDA with graphs, compile the
        step's kernels (eager warm-up steps) while the weights arrive."""
        self._allocate_pool(num_blocks)
        if self.device.type == "cuda" and cuda_graphs:
            self.graphs = self._step_graphs()
            self._warm_up()

    def wait_for_weights(self) -> None:
        if self._weights is not None:
            self._weights.wait()
            self._weights = None

    def capture_graphs(self) -> None:
        """Capture the graphs allocate prepared (none on CPU or without graphs); the weights are in."""
        with torch.inference_mode():
            for graphs in self.graphs:
                graphs.capture()

    def _allocate_pool(self, num_blocks: int) -> None:
        if num_blocks < self.spec.blocks_per_seq + 1:
            raise EngineError(f"the KV pool's memory budget holds {num_blocks} KV blocks of "
                              f"{self.spec.build.kv_block_size} tokens, fewer than one {self.spec.build.max_seq_len}-"
                              "token sequence needs. Give it more (a larger --kv-cache-free-gpu-memory-fraction or "
                              "--kv-cache-bytes), halve its bytes per token (--kv-cache-dtype fp8), rebuild with a "
                              "smaller --max-seq-len, or spread the model over more GPUs (larger tp or pp).")
        if num_blocks < self.spec.num_kv_blocks:
            log.warning("KV pool holds %d blocks (%d tokens), less than max_batch_size x pp x max_seq_len; the scheduler "
                        "admits requests as blocks free up", num_blocks, num_blocks * self.spec.build.kv_block_size)
        self.cache = PagedKVCache(len(self.model.layer_ids), num_blocks, self.spec.build.kv_block_size,
                                  self.kv_heads, self.spec.model.head_dim, self.dtype, self.device,
                                  storage_dtype=self.kv_storage_dtype)
        log.debug("KV pool: %d blocks of %d tokens, %s, %.1f MiB", num_blocks, self.spec.build.kv_block_size,
                  self.kv_storage_dtype, num_blocks * self.kv_block_bytes / 2**20)

    def _use_kernel_cache(self) -> None:
        """Keep this rank's compiled Triton kernels inside the engine directory, so
        reloading the engine (on any node sharing the directory) compiles nothing. A
        TRITON_CACHE_DIR the user set wins; one an earlier load (or a parent process) set
        for another engine does not (DIST_INFER_TRITON_CACHE remembers which is ours)."""
        ours = os.environ.get("DIST_INFER_TRITON_CACHE")
        if self.spec.directory is None or os.environ.get("TRITON_CACHE_DIR", ours) != ours:
            return
        cache = self.spec.directory / f"rank{self.mapping.rank}" / "triton-cache"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only engine directory: Triton's default per-user cache applies
            return
        os.environ["TRITON_CACHE_DIR"] = os.environ["DIST_INFER_TRITON_CACHE"] = str(cache)

    def _step_graphs(self) -> list:
        from dist_infer.engine.cuda_graphs import MIXED_TOKEN_BUCKETS, DecodeGraphs, MixedGraphs, default_buckets

        hidden = None if self.mapping.is_first_stage else self.spec.model.hidden_size
        max_batch, blocks = self.spec.build.max_batch_size, self.spec.blocks_per_seq
        decode = DecodeGraphs(self._eager_step, default_buckets(max_batch), blocks, hidden, self.dtype, self.device)
        mixed = MixedGraphs(self._eager_step, list(MIXED_TOKEN_BUCKETS), max_batch, blocks, hidden,
                            self.mapping.is_last_stage, self.dtype, self.device, pool=decode.pool)
        return [decode, mixed]

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One eager step of every graph's shape: Triton's kernels are compiled (in worker
        processes, see kernel_compile.py) or found in the engine's cache, cuBLAS and NCCL set
        up. The weights may still be arriving, so the outputs are garbage; they are dropped, and
        the padding slots they wrote are rewritten by the capture's own warm-up steps."""
        started = time.perf_counter()
        workers = compile_workers(ranks_on_this_node() or torch.cuda.device_count())
        if workers:
            self._warm_up_compiling_in(workers)
        else:
            self._warm_up_pass()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the capture's own steps run on another stream: they cannot reuse these blocks
        log.info("rank %d: step kernels ready in %.2f s", self.mapping.rank, time.perf_counter() - started)

    def _warm_up_pass(self) -> None:
        for graphs in self.graphs:
            graphs.warm_up()

    def _warm_up_compiling_in(self, workers: int) -> None:
        """The warm-up pass with every kernel compile handed to `workers` processes (its launches
        skipped: the outputs are dropped anyway); the capture loads the kernels from the cache."""
        from triton import knobs
        from triton.runtime.driver import driver

        with KernelCompilePool(workers, driver.active.get_current_target(), knobs.cache.dir) as pool:
            with pool.handing_over():
                self._warm_up_pass()
            compiled, failed = pool.wait()
        if pool.pending:
            slowest = f", the slowest {pool.slowest[0]} in {pool.slowest[1]:.2f} s" if pool.slowest else ""
            log.info("rank %d: %d Triton kernels compiled by %d worker processes in %.2f s%s (%d more were in the "
                     "cache)%s", self.mapping.rank, compiled, workers, time.perf_counter() - pool.started, slowest,
                     pool.found, f"; failed there, compiled here: {', '.join(failed)}" if failed else "")

    def _weight_load(self, verify: bool) -> WeightLoad:
        """The rank file's reader, its names checked against the model; parameters allocated on
        the device, uninitialized until start_loading's thread fills them."""
        name = rank_weights_file(self.mapping.rank)
        path = self.spec.directory / name
        fix = f"Rebuild the engine: `dist-infer build --checkpoint CKPT --out {self.spec.directory} --force`."
        what = f"engine rank {self.mapping.rank}"
        if not path.is_file() or name not in self.spec.files:
            raise EngineError(f"{what}: {path} is missing. {fix}")
        params = allocate_parameters(self.model, self.device)
        return WeightLoad(path, params, self.spec.files[name] if verify else None, what, fix)

    def _assign(self, weights: dict[str, torch.Tensor]) -> None:
        expected = {n for n, _ in self.model.named_parameters()}
        if self.model.ties_lm_head:
            expected.discard("lm_head.weight")
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise EngineError(f"engine rank {self.mapping.rank} weights do not match the model: missing "
                              f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}. Rebuild the engine.")
        self.model.load_state_dict(weights, strict=False, assign=True)
        if self.model.ties_lm_head:
            self.model.lm_head.weight = self.model.embed.weight

    # ---- live weight updates (POST /admin/update_weights): stage on every rank, then swap ----------

    def stage_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        """Another engine's weights for this rank, read into host memory and checked against the
        loaded model (same build, every tensor's name, shape and dtype, sha256 pieces) without
        touching it. A user error here (EngineError) leaves the model as it was."""
        spec = EngineSpec.read_checked(directory)
        differences = self.spec.differences(spec)
        if differences:
            raise EngineError(f"{directory} is not a build of the loaded engine's model ({', '.join(differences)} "
                              "differ); refit this engine with the new checkpoint: `dist-infer refit --engine "
                              f"{self.spec.directory} --checkpoint NEW`.")
        staged = read_rank_weights(spec, self.mapping.rank, torch.device("cpu"))
        params = dict(self.model.named_parameters())
        wrong = sorted(n for n in params.keys() | staged.keys()
                       if n not in params or n not in staged or staged[n].shape != params[n].shape
                       or staged[n].dtype != params[n].dtype)
        if wrong:
            raise EngineError(f"{directory} rank {self.mapping.rank}: tensors {wrong[:3]} differ from the loaded "
                              "model's in name, shape or dtype; refit with `dist-infer refit` (it keeps them).")
        return staged

    @torch.no_grad()
    def swap_weights(self, staged: dict[str, torch.Tensor]) -> None:
        """Copy staged weights into the parameters in place: their storage stays where the CUDA
        graphs captured it (a tied head shares the embedding's, so it follows)."""
        for name, param in self.model.named_parameters():
            param.copy_(staged[name], non_blocking=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _eager_step(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        hidden = self.model(x, batch, self.cache)
        return self.model.logits(hidden, batch) if self.mapping.is_last_stage else hidden

    @torch.inference_mode()
    def step(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """This rank's part of a step. x: token ids [N] (first stage) or hidden [N, H].
        Returns float32 logits [B, vocab] on the last stage, hidden [N, H] elsewhere."""
        if self.step_events is None:
            return self._run(x, batch)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self._run(x, batch)
        end.record()
        self.step_events.append((start, end, batch.is_decode))
        return out

    def _run(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """From the graph whose bucket holds the step, else eagerly (the largest prefills)."""
        for graphs in self.graphs:
            if (bucket := graphs.bucket(batch)) is not None:
                return graphs.replay(x, batch, bucket)
        return self._eager_step(x, batch)

    def decode_gpu_ms(self) -> list[float]:
        """Device time of each timed decode step (needs step_events = [] before the steps)."""
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e, decode in self.step_events or [] if decode]

    def close(self) -> None:
        """Stop a weight read still under way; release CUDA graphs first: NCCL communicators
        they captured are destroyed after."""
        if self._weights is not None:
            self._weights.cancel()
            self._weights = None
        for graphs in self.graphs:
            graphs.close()
        self.graphs = []


def read_rank_weights(spec: EngineSpec, rank: int, device: torch.device,
                      verify: bool = True) -> dict[str, torch.Tensor]:
    """A rank file read straight onto `device` (no host copy of the weights on a GPU), hashed against
    engine.json by threads beside the read: a load costs the longer of the two, not their sum."""
    name = rank_weights_file(rank)
    path = spec.directory / name
    fix = f"Rebuild the engine: `dist-infer build --checkpoint CKPT --out {spec.directory} --force`."
    if not path.is_file() or name not in spec.files:
        raise EngineError(f"engine rank {rank}: {path} is missing. {fix}")
    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(verify_file, path, spec.files[name], f"engine rank {rank}", fix) if verify else None
        try:
            weights = load_file(path, device=str(device))
        except Exception as exc:  # safetensors' own errors on a damaged file; the manifest's names it better
            _raise_if_corrupt(check)
            raise EngineError(f"engine rank {rank}: cannot read {path}: {exc}. {fix}") from exc
        _raise_if_corrupt(check)
    seconds = time.perf_counter() - started
    log.info("rank %d: weights read onto %s in %.2f s (%.2f GB/s)%s", rank, device, seconds,
             path.stat().st_size / seconds / 1e9, ", sha256 verified beside" if verify else "")
    return weights


def _raise_if_corrupt(check: Future | None) -> None:
    """The verification's verdict: a size or sha256 mismatch as the engine's error."""
    try:
        if check is not None:
            check.result()
    except CheckpointError as exc:
        raise EngineError(str(exc)) from exc


def load_rank_engine(spec: EngineSpec, groups: ParallelGroups, device: str = "cpu", verify: bool = True,
                     cuda_graphs: bool = True, weights: dict[str, torch.Tensor] | None = None,
                     max_kv_blocks: int | None = None, kv_cache: KVCacheConfig | None = None) -> RankEngine:
    """Collective over groups.world: load every rank's weights, agree on one KV
    pool size (the smallest that fits anywhere), allocate, capture graphs. A
    user error on any rank is raised on every rank. max_kv_blocks caps the pool
    (to leave memory to others, or to exercise preemption); kv_cache says how the
    pool is sized (memory fraction, bytes) and stored (dtype)."""
    world = groups.world
    kv_cache = kv_cache or KVCacheConfig()
    engine = collective_call(world, lambda: RankEngine(spec, groups, device, verify, weights, kv_cache))
    if kv_cache.free_gpu_memory_fraction is not None and engine.device.type != "cuda" and world.rank == 0:
        log.warning("--kv-cache-free-gpu-memory-fraction sizes a GPU's pool and is ignored on CPU; the CPU pool "
                    "holds max_batch_size x pp full-length sequences, or what --kv-cache-bytes allows")
    try:
        engine.start_loading()  # the parameters' memory is taken, so the pool can be sized meanwhile
        blocks = min(collective_call(world, engine.kv_blocks_that_fit, gather=True))
        blocks = min(blocks, max_kv_blocks or blocks)
        collective_call(world, lambda: engine.allocate(blocks, cuda_graphs))
        # Every rank's weights in and verified before any rank captures: a capture's steps run TP
        # collectives, which a rank that found its file damaged would never join.
        collective_call(world, engine.wait_for_weights)
        collective_call(world, engine.capture_graphs)
    except BaseException:
        engine.close()  # no reader thread left writing into a model nobody will use
        raise
    return engine
