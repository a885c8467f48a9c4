"""`dist-infer partition`: HF checkpoint -> per-rank shards + manifest.

Two passes over the source: the first reads only metadata and plans every
shard (so the layout is refused before any data moves, and each rank file's
header can be written first); the second streams one tensor slice at a time
into its rank file. Output goes to a hidden temp directory that is renamed
into place only when complete, so a crash never leaves a directory that looks
like a finished checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from dist_infer.config import Mapping, ModelConfig, check_layout
from dist_infer.errors import CheckpointError
from dist_infer.interrupts import interruption, remove_dead_temp_dirs, sigterm_raises, slow_down_for_tests, temp_dir
from dist_infer.partition import prequantized
from dist_infer.partition.checkpoint import FORMAT, format_version, rank_file
from dist_infer.models import family_of, is_supported
from dist_infer.models.base import NORMALIZE_ROWS, TRANSPOSE
from dist_infer.partition.rules import REPLICATED, Shard, padded_vocab, plan_tensor
from dist_infer.partition.safetensors_stream import StreamingSafetensorsWriter, dtype_from_code
from dist_infer.partition.sources import SourceCheckpoint, open_source

log = logging.getLogger(__name__)

def required_weights(model: ModelConfig) -> set[str]:
    """The HF weights the model's family needs from a checkpoint of this config."""
    return family_of(model.architecture).required_weights(model)


def shard_shape(shard: Shard, source_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = list(source_shape)
    if shard.dim != REPLICATED:
        shape[shard.dim] = shard.length
    return tuple(reversed(shape)) if shard.transform == TRANSPOSE else tuple(shape)


def plan_partition(source: SourceCheckpoint, model: ModelConfig, tp: int, pp: int) -> dict[int, list[Shard]]:
    # A pre-quantized linear holds `qweight` (engine form) where a dense one holds `weight`.
    present = {n.removesuffix(".qweight") + ".weight" if n.endswith(".qweight") else n for n in source.tensors}
    missing = required_weights(model) - present
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} weights the config needs, e.g. "
                              f"{sorted(missing)[:3]}; it is incomplete or not a {model.architecture} model.")
    per_rank: dict[int, list[Shard]] = defaultdict(list)
    for name, meta in source.tensors.items():
        for shard in plan_tensor(name, meta.shape, model, tp, pp):
            per_rank[shard.rank].append(shard)
    return per_rank


def _read_shard(source: SourceCheckpoint, shard: Shard) -> torch.Tensor:
    if shard.dim == REPLICATED:
        return _transformed(source.read(shard.source), shard.transform)
    part = _transformed(source.read(shard.source, shard.dim, shard.start, shard.stop), shard.transform)
    pad = shard.length - (shard.stop - shard.start)
    if pad:  # vocab padding: rows past the real vocabulary are zeros
        part = torch.cat([part, part.new_zeros((pad, *part.shape[1:]))])
    return part


def _transformed(part: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == TRANSPOSE:  # Conv1D [in, out] -> [out, in]
        return part.t().contiguous()
    if transform == NORMALIZE_ROWS:  # NormHead: each vocab row to unit L2 norm, once, here
        return torch.nn.functional.normalize(part.float(), dim=1).to(part.dtype)
    return part


def check_output_dir(out: Path, source_dir: Path, force: bool) -> None:
    """Refuse outputs that would destroy data: the source itself, a folder holding it, a file."""
    if source_dir.resolve().is_relative_to(out.resolve()):
        raise CheckpointError(f"--out {out} is (or contains) the source model directory {source_dir}; "
                              "choose an output directory outside it.")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory; choose another path.")
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --force to replace it.")


def read_model_config(model: str | Path) -> ModelConfig:
    """The ModelConfig a HF checkpoint (directory, .gguf file or 'default') partitions as, read
    from its config alone (no weights): what `refit` compares with an engine's before any work."""
    return _model_config(open_source(model))


def _model_config(source: SourceCheckpoint) -> ModelConfig:
    """The model's shape; a config.json value transformers let through but that makes
    no sense as a shape (a string, a list) is the file's fault, not a bug."""
    try:
        return ModelConfig.from_hf(_hf_config(source))
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise CheckpointError(f"{source.directory / 'config.json'} has a missing field or one of the wrong type "
                              f"({type(exc).__name__}: {exc}). Restore the file from the model's original download."
                              ) from None


def _hf_config(source: SourceCheckpoint):
    """transformers' config, or, for a family whose code transformers lacks (remote code we do
    not run: Baichuan), the family's reading of config.json."""
    try:
        raw = json.loads((source.directory / "config.json").read_bytes())
    except (OSError, ValueError):
        raw = None  # transformers' own reading reports the problem
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if isinstance(model_type, str) and is_supported(model_type) and family_of(model_type).read_config is not None:
        return family_of(model_type).read_config(raw)
    return source.hf_config()


def partition(model: str | Path, tp: int, pp: int, out: Path, force: bool = False, progress: bool = True) -> Path:
    out = Path(out)
    source = open_source(model)
    config = _model_config(source)
    check_layout(config, tp, pp)
    source = prequantized.wrap(source, config, tp)  # AWQ/GPTQ/FP8 linears in the engine's form
    check_output_dir(out, source.directory, force)
    plan = plan_partition(source, config, tp, pp)

    tmp = temp_dir(out, "tmp")  # .OUT.tmp-HOST-PID
    remove_dead_temp_dirs(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # SIGTERM (scancel, kill) raises like Ctrl-C, so the temp directory is removed either way.
    with sigterm_raises():
        try:
            files = _write_shards(source, plan, tmp, tp * pp, progress)
            _write_metadata(source, config, plan, files, tmp, tp, pp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if (cause := interruption(exc)) is not None:
                log.warning("partition interrupted (%s): removed the partial output %s", cause or "SIGINT", tmp)
            raise
    log.info("wrote %d rank files to %s", tp * pp, out)
    return out


def _write_shards(source: SourceCheckpoint, plan: dict[int, list[Shard]], directory: Path, world: int,
                  progress: bool) -> dict[str, dict]:
    """Every rank file; returns their manifest entries."""
    # Visit source tensors in file order so reads are sequential; each shard is
    # read, written and dropped before the next.
    by_source: dict[str, list[Shard]] = defaultdict(list)
    for shards in plan.values():
        for shard in shards:
            by_source[shard.source].append(shard)
    order = sorted(by_source, key=lambda n: (str(source.tensors[n].file), n))
    total = sum(torch.Size(source.tensors[n].shape).numel() for n in order)
    writers = {}
    try:
        for rank in range(world):  # (a full disk fails here, when a file's blocks are allocated)
            specs = [(s.name, dtype_from_code(source.tensors[s.source].dtype),
                      shard_shape(s, source.tensors[s.source].shape)) for s in plan[rank]]
            writers[rank] = StreamingSafetensorsWriter(directory / rank_file(rank), specs, {"format": "pt"})
        with tqdm(total=total, unit="param", unit_scale=True, desc="partition", disable=not progress) as bar:
            for name in order:
                _write_source_tensor(source, by_source[name], writers)
                slow_down_for_tests()
                bar.update(torch.Size(source.tensors[name].shape).numel())
        for writer in writers.values():
            writer.close()  # one that fails (disk full) raises, and the others are abandoned below
        return {writer.path.name: writer.entry() for writer in writers.values()}  # hashed while written
    except BaseException:  # (SIGTERM, Ctrl-C, a read or write error): no writer thread outlives the partition
        for writer in writers.values():
            writer.abandon()
        raise


def _write_source_tensor(source: SourceCheckpoint, shards: list[Shard], writers: dict) -> None:
    """Every shard of one source tensor to its rank's writer (replicas of one slice read once)."""
    cached_key, cached = None, None
    for shard in shards:
        key = (shard.dim, shard.start, shard.stop, shard.length, shard.transform)
        if key != cached_key:
            cached_key, cached = key, _read_shard(source, shard)
        writers[shard.rank].write(shard.name, cached)


def _write_metadata(source: SourceCheckpoint, config: ModelConfig, plan: dict[int, list[Shard]], files: dict,
                    directory: Path, tp: int, pp: int) -> None:
    """files: each rank file's manifest entry (size, piece hashes)."""
    manifest = {"files": files,
                "shards": {str(r): [dataclasses.asdict(s) for s in plan[r]] for r in range(tp * pp)}}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    quantization = getattr(source, "quantization", None)
    meta = {
        "format": FORMAT,
        "format_version": format_version(quantization),
        "model": config.to_dict(),
        "mapping": Mapping(tp, pp).to_dict(),
        "vocab_size_padded": padded_vocab(config, tp),
        "source": str(source.directory),
        **({"quantization": quantization} if quantization else {}),
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=1))
    for f in source.tokenizer_files():
        shutil.copy2(f, directory / f.name)
