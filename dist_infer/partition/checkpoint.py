"""The partitioned checkpoint format (what `dist-infer partition` writes and
`dist-infer build` reads):

    config.json          {"format", "format_version", "model", "mapping", ..., and for a
                         pre-quantized source "quantization": {"mode", "format", "source_config",
                         and for INT4 "group_size" (the engine's), "checkpoint_group_size"}}
    manifest.json        {"files": {name: {size, sha256, piece_bytes, piece_sha256}}, "shards": {rank: [Shard...]}}
                         (piece_sha256: the sha256 of each piece_bytes-long piece, verified in parallel;
                         entries without them, from older versions, are verified whole)
    rank{N}.safetensors  that rank's shards, HF names, source dtype
    tokenizer files      copied from the source, when it has them
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_infer.config import Mapping, ModelConfig
from dist_infer.errors import CheckpointError
from dist_infer.partition.rules import Shard
from dist_infer.partition.safetensors_stream import HASH_THREADS, file_sha256, piece_sha256
from dist_infer.partition.sources import TOKENIZER_FILES

FORMAT = "dist_infer-checkpoint"
FORMAT_VERSION = 2  # the newest this dist_infer reads; 2: linears pre-quantized in the engine's form


def format_version(quantization: dict | None) -> int:
    """What a checkpoint is written as: 1 when dense, so older dist_infer versions still read it;
    2 with pre-quantized linears, which they would misread."""
    return 2 if quantization else 1


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def verify_file(path: Path, expected: dict, what: str, fix: str) -> None:
    """Size and sha256 against a manifest entry; a clear error on mismatch."""
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} is missing. {fix}")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CheckpointError(f"{what}: {path} is {size} bytes, the manifest says {expected['size']} "
                              f"(truncated or replaced). {fix}")
    if "piece_sha256" in expected:
        _verify_pieces(path, expected, what, fix)
    elif file_sha256(path) != expected["sha256"]:
        raise CheckpointError(f"{what}: {path} is corrupt (sha256 differs from the manifest). {fix}")


def _verify_pieces(path: Path, expected: dict, what: str, fix: str) -> None:
    piece, digests = expected.get("piece_bytes"), expected["piece_sha256"]
    if not (isinstance(piece, int) and piece > 0 and isinstance(digests, list)) or \
            len(digests) != max(1, -(-expected["size"] // piece)):
        raise CheckpointError(f"{what}: the manifest entry of {path.name} is damaged (piece_bytes {piece!r}, "
                              f"piece_sha256 not one hash per piece of its {expected['size']} bytes). {fix}")
    with ThreadPoolExecutor(min(len(digests), HASH_THREADS)) as pool:
        found = list(pool.map(lambda i: piece_sha256(path, i * piece, piece), range(len(digests))))
    bad = [i for i, (got, want) in enumerate(zip(found, digests)) if got != want]
    if bad:
        start = bad[0] * piece
        raise CheckpointError(f"{what}: {path} is corrupt (sha256 of bytes {start}-{min(start + piece, expected['size'])} "
                              f"differs from the manifest{f', and {len(bad) - 1} more pieces' if len(bad) > 1 else ''}). "
                              f"{fix}")


REPARTITION = "Partition the model again (`dist-infer partition --model ... --out DIR --force`)."


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:  # ValueError covers JSONDecodeError and bad UTF-8
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged. {REPARTITION}") from None


def _parse_config(config: dict, path: Path) -> tuple[ModelConfig, Mapping]:
    """The model and mapping sections. A missing field or a value of the wrong type
    (a hand-edited or foreign file) is a damaged checkpoint, not a bug: say which."""
    try:
        version = config["format_version"]
        _check_types({"format_version": version}, {"format_version": "int"}, "")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path.parent} uses checkpoint format {version}; this dist_infer reads up to "
                                  f"{FORMAT_VERSION}. Upgrade dist_infer.")
        _check_types(config["model"], {f.name: f.type for f in dataclasses.fields(ModelConfig)}, "model.")
        _check_types(config["mapping"], {"tp": "int", "pp": "int"}, "mapping.")
        return ModelConfig.from_dict(config["model"]), Mapping.from_dict(config["mapping"])
    except KeyError as exc:
        raise CheckpointError(f"{path} lacks the field {exc}. {REPARTITION}") from None
    except TypeError as exc:
        raise CheckpointError(f"{path}: {exc}. {REPARTITION}") from None


# ModelConfig's annotations (strings: `from __future__ import annotations`) -> JSON types.
JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "tuple[float, ...]": (list,),
              "tuple[int, ...]": (list,)}


def _check_types(section, annotations: dict[str, str], prefix: str) -> None:
    if not isinstance(section, dict):
        raise TypeError(f"{prefix.rstrip('.') or 'the config'} must be a JSON object, got {section!r}")
    for name, value in section.items():
        annotation = str(annotations.get(name, ""))
        optional = annotation.endswith(" | None")
        allowed = JSON_TYPES.get(annotation.removesuffix(" | None"))
        if allowed is None or (optional and value is None):
            continue  # unknown fields are reported by from_dict itself
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
            raise TypeError(f"field {prefix}{name} must be {annotation.removesuffix(' | None')}"
                            f"{' or null' if optional else ''}, got {value!r}")


class PartitionedCheckpoint:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.directory} is not a dist_infer checkpoint (no config.json); "
                                  "create one with `dist-infer partition --model ... --out DIR`.")
        config = _read_json(config_path)
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise CheckpointError(f"{config_path} is not a dist_infer checkpoint config (it may be a HF model "
                                  "directory: partition it first with `dist-infer partition`).")
        self.config = config
        self.model, self.mapping = _parse_config(config, config_path)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise CheckpointError(f"{manifest_path} is missing; the checkpoint is incomplete. Partition again.")
        self.manifest = _read_json(manifest_path)

    @property
    def quantization(self) -> dict | None:
        """How the source checkpoint was quantized (partition/prequantized.py), or None:
        {"mode": "int4_wo" | "fp8", "format": "awq" | "gptq" | ..., "group_size": int (INT4)}."""
        quantization = self.config.get("quantization")
        if quantization is not None and not (isinstance(quantization, dict) and "mode" in quantization):
            raise CheckpointError(f"{self.directory / 'config.json'}: field quantization must be an object with a "
                                  f"mode, got {quantization!r}. {REPARTITION}")
        return quantization

    def shards(self, rank: int) -> list[Shard]:
        return [Shard(**s) for s in self.manifest["shards"][str(rank)]]

    def load_rank(self, rank: int, verify: bool = True) -> dict[str, torch.Tensor]:
        return load_file(self._rank_path(rank, verify))

    def open_rank(self, rank: int, verify: bool = True):
        """The rank file for reading one tensor at a time (`with ... as f: f.get_tensor(name)`);
        verify=False for a peer's file that its own rank verifies."""
        return safe_open(self._rank_path(rank, verify), framework="pt")

    def _rank_path(self, rank: int, verify: bool) -> Path:
        name = rank_file(rank)
        path = self.directory / name
        fix = f"Partition the model again (`dist-infer partition ... --out {self.directory}`)."
        if verify:
            verify_file(path, self.manifest["files"][name], f"checkpoint rank {rank}", fix)
        elif not path.is_file():
            raise CheckpointError(f"checkpoint rank {rank}: {path} is missing. {fix}")
        return path

    def tokenizer_files(self) -> list[Path]:
        return [self.directory / n for n in TOKENIZER_FILES if (self.directory / n).is_file()]
