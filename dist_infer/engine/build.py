"""`dist-infer build`: partitioned checkpoint -> engine directory.

Each rank builds only its own engine from its own shard (fuse q/k/v and
gate/up, cast to the build dtype). Launched as one process per rank under
mpirun, or as a single process that builds every rank in turn. The engine is
assembled in a hidden temp directory and renamed into place by rank 0 once
every rank has succeeded.

    engine.json            model, mapping, build options, format version, file sizes + sha256
    rank{N}/weights.safetensors
    tokenizer files
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_infer import __version__
from dist_infer.comm.base import Communicator, collective_call
from dist_infer.config import BuildConfig, Mapping, ModelConfig
from dist_infer.errors import EngineError, LaunchError
from dist_infer.partition.checkpoint import PartitionedCheckpoint
from dist_infer.partition.safetensors_stream import file_sha256

log = logging.getLogger(__name__)

ENGINE_FORMAT = "dist_infer-engine"
ENGINE_FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rank_weights_file(rank: int) -> str:
    return f"rank{rank}/weights.safetensors"


def engine_weights(hf: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named shard tensors -> the engine's fused names (see engine/model.py), cast to dtype."""
    out: dict[str, torch.Tensor] = {}
    layer_ids = sorted({int(n.split(".")[2]) for n in hf if n.startswith("model.layers.")})
    for i in layer_ids:
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        out[dst + "self_attn.qkv_proj.weight"] = torch.cat([hf[f"{attn}{p}_proj.weight"] for p in "qkv"])
        if cfg.qkv_bias:
            out[dst + "self_attn.qkv_proj.bias"] = torch.cat([hf[f"{attn}{p}_proj.bias"] for p in "qkv"])
        out[dst + "self_attn.o_proj.weight"] = hf[attn + "o_proj.weight"]
        if cfg.o_bias:
            out[dst + "self_attn.o_proj.bias"] = hf[attn + "o_proj.bias"]
        out[dst + "mlp.gate_up_proj.weight"] = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        out[dst + "mlp.down_proj.weight"] = hf[mlp + "down_proj.weight"]
        if cfg.mlp_bias:
            out[dst + "mlp.gate_up_proj.bias"] = torch.cat([hf[mlp + "gate_proj.bias"], hf[mlp + "up_proj.bias"]])
            out[dst + "mlp.down_proj.bias"] = hf[mlp + "down_proj.bias"]
        out[dst + "input_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "post_attention_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
    for hf_name, name in (("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight"),
                          ("lm_head.weight", "lm_head.weight")):
        if hf_name in hf:
            out[name] = hf[hf_name]
    return {name: t.to(dtype).contiguous() for name, t in out.items()}


def build_rank(ckpt: PartitionedCheckpoint, rank: int, directory: Path, dtype: torch.dtype) -> dict:
    weights = engine_weights(ckpt.load_rank(rank), ckpt.model, dtype)
    path = directory / rank_weights_file(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, path, metadata={"format": "pt"})
    log.info("built rank %d: %d tensors, %.1f MB", rank, len(weights), path.stat().st_size / 1e6)
    return {rank_weights_file(rank): {"size": path.stat().st_size, "sha256": file_sha256(path)}}


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
    build_config = build_config.resolved(ckpt.model)
    dtype = DTYPES[build_config.dtype]

    def build_mine(tmp: Path) -> dict:
        files = {}
        for rank in (range(n) if world.size == 1 else [world.rank]):
            files.update(build_rank(ckpt, rank, tmp, dtype))
        return files

    def describe(files: dict) -> dict:
        return engine_description(ckpt.model, ckpt.mapping, build_config, ckpt.config["vocab_size_padded"], files,
                                  time.perf_counter() - started)

    write_engine(out, world, force, build_mine, describe, ckpt.tokenizer_files())
    if world.rank == 0:
        log.info("engine written to %s in %.1f s", out, time.perf_counter() - started)
    return out


def write_engine(out: Path, world: Communicator, force: bool, write_ranks: Callable[[Path], dict],
                 describe: Callable[[dict], dict], extra_files: list[Path]) -> None:
    """Collective: stage the engine in a hidden directory beside `out` (each process
    writes its ranks' files: write_ranks(tmp) -> {name: entry}), then rank 0 writes
    engine.json (describe(files)) and the extra files and renames it into place.
    On any failure the staging directory is removed: nothing half-written is left."""
    tmp = out.with_name(f".{out.name}.tmp-build")

    def prepare():
        if out.exists() and not force:
            raise EngineError(f"{out} already exists; choose another --out or pass --force to replace it.")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

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
    except BaseException:
        if world.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def engine_description(model: ModelConfig, mapping: Mapping, build_config: BuildConfig, vocab_size_padded: int,
                       files: dict, seconds: float) -> dict:
    """engine.json's content."""
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
    }
