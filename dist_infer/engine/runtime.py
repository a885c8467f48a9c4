"""Load a built engine for one rank and run its part of a step."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_infer.comm.base import collective_call
from dist_infer.comm.groups import ParallelGroups
from dist_infer.config import BuildConfig, Mapping, ModelConfig
from dist_infer.engine.build import DTYPES, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, rank_weights_file
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch, paged_attention_reference
from dist_infer.engine.model import StageModel, local_heads
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
        """Enough for max_batch_size full-length sequences, plus the scratch block 0."""
        return self.build.max_batch_size * self.blocks_per_seq + 1


class RankEngine:
    """One rank's model shard, its KV cache and (on CUDA) its decode graphs.
    Construct with `load_rank_engine`, which sizes the KV pool across ranks."""

    kv_memory_fraction = 0.9  # of the GPU memory free after loading weights

    def __init__(self, spec: EngineSpec, groups: ParallelGroups, device: str = "cpu", verify: bool = True,
                 weights: dict[str, torch.Tensor] | None = None):
        spec.check_world(groups.world.size)
        self.spec = spec
        self.mapping = groups.mapping
        self.device = torch.device(device)
        self.dtype = DTYPES[spec.build.dtype]
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        weights = self._load_weights(verify) if weights is None else weights
        self.model = StageModel(spec.model, self.mapping, groups.tp, spec.vocab_size_padded, self.dtype,
                                spec.build.quant_config)
        self._assign(weights)
        self.model.to(self.device)
        del weights
        _, self.kv_heads = local_heads(spec.model, self.mapping.tp)
        self.cache: PagedKVCache | None = None
        self.attention = paged_attention_reference
        self.graphs: list = []  # CUDA graph families (decode, mixed) once captured
        self.step_events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] | None = None  # set [] to time steps
        if self.device.type == "cuda":
            self._use_kernel_cache()
            from dist_infer.engine.attention_gpu import gpu_attention

            self.attention = gpu_attention

    def kv_blocks_that_fit(self) -> int:
        """Blocks for max_batch_size full sequences, or what fits in `kv_memory_fraction`
        of the GPU memory left after the weights, whichever is smaller (this rank only)."""
        wanted = self.spec.num_kv_blocks
        if self.device.type != "cuda":
            return wanted
        block_bytes = (2 * len(self.model.layer_ids) * self.spec.build.kv_block_size * self.kv_heads
                       * self.spec.model.head_dim * torch.empty((), dtype=self.dtype).element_size())
        free, _ = torch.cuda.mem_get_info(self.device)
        # Headroom for activations and logits of the largest step, and the graphs' pool.
        headroom = 2 * 1024**3 + 4 * self.spec.build.max_batch_size * self.spec.model.vocab_size * 4
        return min(wanted, max(int((free * self.kv_memory_fraction - headroom) // block_bytes), 0))

    def allocate(self, num_blocks: int, cuda_graphs: bool = True) -> None:
        """Allocate the KV pool (the same size on every rank) and capture the decode graphs."""
        if num_blocks < self.spec.blocks_per_seq + 1:
            raise EngineError(f"GPU memory left after the weights holds {num_blocks} KV blocks of "
                              f"{self.spec.build.kv_block_size} tokens, fewer than one {self.spec.build.max_seq_len}-"
                              "token sequence needs. Rebuild with a smaller --max-seq-len, or spread the model over "
                              "more GPUs (larger tp or pp).")
        if num_blocks < self.spec.num_kv_blocks:
            log.warning("KV pool holds %d blocks (%d tokens), less than max_batch_size x max_seq_len; the scheduler "
                        "admits requests as blocks free up", num_blocks, num_blocks * self.spec.build.kv_block_size)
        self.cache = PagedKVCache(len(self.model.layer_ids), num_blocks, self.spec.build.kv_block_size,
                                  self.kv_heads, self.spec.model.head_dim, self.dtype, self.device)
        if self.device.type == "cuda" and cuda_graphs:
            self._capture_graphs()

    def _use_kernel_cache(self) -> None:
        """Keep this rank's compiled Triton kernels inside the engine directory, so
        reloading the engine (on any node sharing the directory) compiles nothing."""
        if self.spec.directory is None or "TRITON_CACHE_DIR" in os.environ:
            return
        cache = self.spec.directory / f"rank{self.mapping.rank}" / "triton-cache"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only engine directory: Triton's default per-user cache applies
            return
        os.environ["TRITON_CACHE_DIR"] = str(cache)

    def _capture_graphs(self) -> None:
        from dist_infer.engine.cuda_graphs import MIXED_TOKEN_BUCKETS, DecodeGraphs, MixedGraphs, default_buckets

        hidden = None if self.mapping.is_first_stage else self.spec.model.hidden_size
        max_batch, blocks = self.spec.build.max_batch_size, self.spec.blocks_per_seq
        decode = DecodeGraphs(self._eager_step, default_buckets(max_batch), blocks, hidden, self.dtype, self.device)
        mixed = MixedGraphs(self._eager_step, list(MIXED_TOKEN_BUCKETS), max_batch, blocks, hidden,
                            self.mapping.is_last_stage, self.dtype, self.device, pool=decode.pool)
        self.graphs = [decode, mixed]
        with torch.inference_mode():
            for graphs in self.graphs:
                graphs.capture()

    def _load_weights(self, verify: bool) -> dict[str, torch.Tensor]:
        rank = self.mapping.rank
        name = rank_weights_file(rank)
        path = self.spec.directory / name
        fix = f"Rebuild the engine: `dist-infer build --checkpoint CKPT --out {self.spec.directory} --force`."
        try:
            if verify:
                verify_file(path, self.spec.files[name], f"engine rank {rank}", fix)
            elif not path.is_file():
                raise EngineError(f"engine rank {rank}: {path} is missing. {fix}")
            return load_file(path)
        except CheckpointError as exc:
            raise EngineError(str(exc)) from exc
        except Exception as exc:  # safetensors' own errors on a damaged file
            raise EngineError(f"engine rank {rank}: cannot read {path}: {exc}. {fix}") from exc

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

    def _eager_step(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        hidden = self.model(x, batch, self.cache, self.attention)
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
        """Release CUDA graphs first: NCCL communicators they captured are destroyed after."""
        for graphs in self.graphs:
            graphs.close()
        self.graphs = []


def load_rank_engine(spec: EngineSpec, groups: ParallelGroups, device: str = "cpu", verify: bool = True,
                     cuda_graphs: bool = True, weights: dict[str, torch.Tensor] | None = None,
                     max_kv_blocks: int | None = None) -> RankEngine:
    """Collective over groups.world: load every rank's weights, agree on one KV
    pool size (the smallest that fits anywhere), allocate, capture graphs. A
    user error on any rank is raised on every rank. max_kv_blocks caps the pool
    (to leave memory to others, or to exercise preemption)."""
    world = groups.world
    engine = collective_call(world, lambda: RankEngine(spec, groups, device, verify, weights))
    blocks = min(collective_call(world, engine.kv_blocks_that_fit, gather=True))
    blocks = min(blocks, max_kv_blocks or blocks)
    collective_call(world, lambda: engine.allocate(blocks, cuda_graphs))
    return engine
