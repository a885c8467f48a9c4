"""`dist-infer build`: partitioned checkpoint -> engine directory.

Each rank builds only its own engine from its own shard, streaming one
tensor at a time (fuse q/k/v and gate/up, cast to the build dtype or quantize
linear weights with `--quant`, engine/quant.py). A checkpoint partitioned from a
pre-quantized model (AWQ/GPTQ -> int4_wo, FP8 -> fp8; partition/prequantized.py)
already holds its linears in the engine's form: the build adopts its mode and only
concatenates them. Launched as one process per rank under
mpirun, or as a single process that builds every rank in turn. The engine is
assembled in a hidden temp directory and renamed into place by rank 0 once
every rank has succeeded.

    engine.json            model, mapping, build options, format version, file sizes + sha256
    rank{N}/weights.safetensors
    tokenizer files
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from dist_infer import __version__
from dist_infer.comm.base import Communicator, collective_call
from dist_infer.config import DEFAULT_QUANT_GROUP_SIZE, BuildConfig, Mapping, ModelConfig, QuantConfig
from dist_infer.engine.layers import RowParallelLinear
from dist_infer.engine.model import StageModel
from dist_infer.engine.quant import check_quant_layout
from dist_infer.errors import EngineError, LaunchError, LayoutError
from dist_infer.models import family_of
from dist_infer.interrupts import interruption, remove_dead_temp_dirs, sigterm_raises, slow_down_for_tests, temp_dir
from dist_infer.partition.checkpoint import PartitionedCheckpoint
from dist_infer.partition.safetensors_stream import StreamingSafetensorsWriter

log = logging.getLogger(__name__)

ENGINE_FORMAT = "dist_infer-engine"
ENGINE_FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rank_weights_file(rank: int) -> str:
    return f"rank{rank}/weights.safetensors"


class ShapeGroup:
    """What the parallel layers read from their TP group when sized: its size and rank."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def stage_skeleton(cfg: ModelConfig, mapping: Mapping, vocab_padded: int, dtype: torch.dtype,
                   quant: QuantConfig | None = None) -> StageModel:
    """The rank's model on the meta device: its parameters are exactly what its engine file holds."""
    with torch.device("meta"):
        return StageModel(cfg, mapping, ShapeGroup(mapping.tp_rank, mapping.tp), vocab_padded, dtype, quant)


def engine_tensor_specs(model: StageModel) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of a rank file (a tied head shares the embedding's)."""
    return [(name, p.dtype, tuple(p.shape)) for name, p in model.named_parameters()]


def hf_sources(cfg: ModelConfig, module: str, param: str, available: set[str]) -> list[str]:
    """The checkpoint tensors (rank-file names) fused into the engine tensor `module.param`,
    as the model's family declares them (dist_infer/models/<family>.py)."""
    family = family_of(cfg.architecture)
    if module.startswith("layers."):
        _, layer, local = module.split(".", 2)
        prefix = family.layer_prefix.format(layer=layer)
        return [f"{prefix}{src}.{param}" for src in family.sources_of(local)]
    name = f"{family.top_sources[module]}.{param}"
    if module == "lm_head" and param == "weight" and name not in available:  # tied, head quantized: the table
        name = f"{family.top_sources['embed']}.weight"
    return [name]


class RankSource:
    """One rank's checkpoint shard, read tensor by tensor, and its TP peers' shards of the same
    stage (only row-parallel weights' row absmax is read from those)."""

    def __init__(self, own, peers: list):
        self.own, self.peers = own, peers
        self.names = set(own.keys())

    def read(self, names: list[str]) -> torch.Tensor:
        parts = [self.own.get_tensor(n) for n in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def row_absmax(self, name: str, shard: torch.Tensor) -> torch.Tensor | None:
        """absmax of each full row of a weight split by columns over TP (None at tp=1): [out] float32."""
        if not self.peers:
            return None
        rows = [shard.float().abs().amax(dim=1)]
        rows += [peer.get_tensor(name).float().abs().amax(dim=1) for peer in self.peers]
        return torch.stack(rows).amax(dim=0)


def engine_tensors(model: StageModel, source: RankSource, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the rank's engine file, one module at a time: q/k/v and gate/up fused,
    linear weights in their method's format, the rest cast to dtype. Peak memory: one fused weight."""
    for prefix, module in model.named_modules():
        if prefix == "lm_head" and model.ties_lm_head:
            continue
        method = getattr(module, "method", None)
        if method is not None:
            yield from _linear_weight(model, prefix, module, method, source, dtype)
        for param, _ in module.named_parameters(recurse=False):
            if method is None or param == "bias":
                yield f"{prefix}.{param}", source.read(hf_sources(model.cfg, prefix, param, source.names)).to(dtype)


def _linear_weight(model: StageModel, prefix: str, module, method, source: RankSource, dtype: torch.dtype):
    if _is_prequantized(model, prefix, source):
        yield from _prequantized_weight(model, prefix, module, method, source)
        return
    names = hf_sources(model.cfg, prefix, "weight", source.names)
    w = source.read(names)  # [out_local, in_local], the checkpoint's dtype
    row_absmax = None
    if isinstance(module, RowParallelLinear) and method.per_channel_scales:
        row_absmax = source.row_absmax(names[0], w)  # scales of the whole row, as at tp=1
    for param, t in method.quantize(w, dtype, row_absmax).items():
        yield f"{prefix}.{param}", t


def _row_absmax_peers(model: StageModel, names: set[str]) -> list[int]:
    """The TP peers whose shards this rank reads. Only per-channel scales of row-parallel weights
    that the build quantizes need them (their rows' absmax); a dense, group-wise or pre-quantized
    build reads its own shard alone (node-local storage works)."""
    rows = [prefix for prefix, m in model.named_modules() if isinstance(m, RowParallelLinear)]
    quantizes_rows = any(hf_sources(model.cfg, prefix, "weight", names)[0] in names for prefix in rows)
    if not (quantizes_rows and _needs_row_absmax(model)):
        return []
    return [r for r in model.mapping.tp_group_ranks if r != model.mapping.rank]


def _is_prequantized(model: StageModel, prefix: str, source: RankSource) -> bool:
    """Whether the rank file holds this decoder linear already quantized (in the engine's form)."""
    return prefix.startswith("layers.") and hf_sources(model.cfg, prefix, "qweight", source.names)[0] in source.names


def _prequantized_weight(model: StageModel, prefix: str, module, method, source: RankSource):
    """q/k/v (gate/up) concatenated along the outputs as they are: qweight [out, ...] keeps its
    codes, scales and offsets are cast to the engine's dtype for them (the skeleton's)."""
    for param in method.params:
        want = getattr(module, param)  # a meta tensor with the engine's dtype and shape
        yield f"{prefix}.{param}", source.read(hf_sources(model.cfg, prefix, param, source.names)).to(want.dtype)


def adopt_checkpoint_quantization(build_config: BuildConfig, quantization: dict | None) -> BuildConfig:
    """A pre-quantized checkpoint fixes the build's mode (and INT4 group size); --quant may only repeat it."""
    if not quantization:
        return build_config
    mode, group = quantization["mode"], quantization.get("group_size") or build_config.quant_group_size
    source = f"its linear layers are pre-quantized ({quantization.get('format')}), which build as --quant {mode}"
    if build_config.quant not in (None, mode):
        raise LayoutError(f"--quant {build_config.quant} conflicts with the checkpoint: {source} without "
                          f"requantizing. Drop --quant (or pass --quant {mode}); for {build_config.quant}, partition "
                          "an unquantized copy of the model and build that with --quant.")
    if build_config.quant_group_size not in (DEFAULT_QUANT_GROUP_SIZE, group) and mode == "int4_wo":
        raise LayoutError(f"--quant-group-size {build_config.quant_group_size} conflicts with the checkpoint: {source} "
                          f"with groups of {group} inputs, fixed when it was quantized. Drop --quant-group-size.")
    return dataclasses.replace(build_config, quant=mode, quant_group_size=group)


def _needs_row_absmax(model: StageModel) -> bool:
    return model.mapping.tp > 1 and any(isinstance(m, RowParallelLinear) and m.method.per_channel_scales for m in model.modules())


def build_rank(ckpt: PartitionedCheckpoint, rank: int, directory: Path, build_config: BuildConfig) -> dict:
    """Stream one rank's engine file from its checkpoint shard (verified) tensor by tensor."""
    mapping = ckpt.mapping.with_rank(rank)
    dtype = DTYPES[build_config.dtype]
    model = stage_skeleton(ckpt.model, mapping, ckpt.config["vocab_size_padded"], dtype, build_config.quant_config)
    path = directory / rank_weights_file(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = engine_tensor_specs(model)
    with ExitStack() as files:
        own = files.enter_context(ckpt.open_rank(rank))
        peers = _row_absmax_peers(model, set(own.keys()))
        source = RankSource(own, [files.enter_context(ckpt.open_rank(r, verify=False)) for r in peers])
        writer = StreamingSafetensorsWriter(path, specs, metadata={"format": "pt"})
        try:
            for name, tensor in engine_tensors(model, source, dtype):
                writer.write(name, tensor)
            writer.close()
        except BaseException:  # a bad shard, a full disk, Ctrl-C: the writer's threads end with the build
            writer.abandon()
            raise
    log.info("built rank %d: %d tensors, %.1f MB", rank, len(specs), path.stat().st_size / 1e6)
    return {rank_weights_file(rank): writer.entry()}


def build(checkpoint_dir: Path, out: Path, build_config: BuildConfig, world: Communicator, force: bool = False) -> Path:
    """Collective over `world`: every rank calls it; every rank raises the same error on failure."""
    started = time.perf_counter()
    out = Path(out)
    ckpt = collective_call(world, lambda: PartitionedCheckpoint(checkpoint_dir))
    n = ckpt.mapping.world_size
    if world.size not in (1, n):
        raise LaunchError(f"the checkpoint has {n} ranks (tp={ckpt.mapping.tp} pp={ckpt.mapping.pp}); "
                          f"build it with `mpirun -n {n} dist-infer build ...` or in one process, "
                          f"not with {world.size} processes.")
    build_config = adopt_checkpoint_quantization(build_config, ckpt.quantization).resolved(ckpt.model)
    collective_call(world, lambda: check_quant_layout(ckpt.model, ckpt.mapping.tp, build_config.quant_config))

    def build_mine(tmp: Path) -> dict:
        files = {}
        for rank in (range(n) if world.size == 1 else [world.rank]):
            files.update(build_rank(ckpt, rank, tmp, build_config))
            slow_down_for_tests()
        return files

    def describe(files: dict) -> dict:
        return engine_description(ckpt.model, ckpt.mapping, build_config, ckpt.config["vocab_size_padded"], files,
                                  time.perf_counter() - started, ckpt.quantization)

    write_engine(out, world, force, build_mine, describe, ckpt.tokenizer_files())
    if world.rank == 0:
        log.info("engine written to %s in %.1f s", out, time.perf_counter() - started)
    return out


def write_engine(out: Path, world: Communicator, force: bool, write_ranks: Callable[[Path], dict],
                 describe: Callable[[dict], dict], extra_files: list[Path]) -> None:
    """Collective: stage the engine in a hidden directory beside `out` (each process
    writes its ranks' files: write_ranks(tmp) -> {name: entry}), then rank 0 writes
    engine.json (describe(files)) and the extra files and renames it into place.
    On any failure, SIGTERM (scancel) and Ctrl-C included, the staging directory is removed:
    nothing half-written is left. Its name is unique to this build (rank 0's host and pid), so a
    leftover of a build that was killed outright is never reused: it is removed once its process
    is gone."""
    tmp = world.broadcast_object(temp_dir(out, "tmp-build") if world.rank == 0 else None)

    def prepare():
        if out.exists() and not force:
            raise EngineError(f"{out} already exists; choose another --out or pass --force to replace it.")
        remove_dead_temp_dirs(out, "tmp-build")
        shutil.rmtree(out.with_name(f".{out.name}.tmp-build"), ignore_errors=True)  # old fixed name: never reused
        tmp.mkdir(parents=True)

    with sigterm_raises():
        collective_call(world, prepare if world.rank == 0 else lambda: None)
        try:
            per_rank_files = collective_call(world, lambda: write_ranks(tmp), gather=True)
            if world.rank == 0:
                files = {k: v for part in per_rank_files for k, v in part.items()}
                (tmp / "engine.json").write_text(json.dumps(describe(files), indent=1))
                for f in extra_files:
                    shutil.copy2(f, tmp / f.name)
                if out.exists():
                    shutil.rmtree(out)
                tmp.rename(out)
            world.barrier()
        except BaseException as exc:
            if world.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                if (cause := interruption(exc)) is not None:
                    log.warning("build interrupted (%s): removed the partial engine %s", cause or "SIGINT", tmp)
            raise


def engine_description(model: ModelConfig, mapping: Mapping, build_config: BuildConfig, vocab_size_padded: int,
                       files: dict, seconds: float, prequantized: dict | None = None) -> dict:
    """engine.json's content; `prequantized`: how the source checkpoint was quantized, if it was
    (its mode is build.quant, which loading checks like any --quant build's)."""
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "dist_infer_version": __version__,
        "model": model.to_dict(),
        "mapping": mapping.to_dict(),
        "build": build_config.to_dict(),
        "vocab_size_padded": vocab_size_padded,
        "files": files,
        "build_time_s": round(seconds, 3),
        "host": os.uname().nodename,
        **({"prequantized_checkpoint": _without_source_config(prequantized)} if prequantized else {}),
    }


def _without_source_config(quantization: dict) -> dict:
    return {k: v for k, v in quantization.items() if k != "source_config"}
