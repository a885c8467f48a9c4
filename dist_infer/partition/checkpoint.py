"""The partitioned checkpoint format (what `dist-infer partition` writes and
`dist-infer build` reads):

    config.json          {"format", "format_version", "model", "mapping", ...}
    manifest.json        {"files": {name: {size, sha256}}, "shards": {rank: [Shard...]}}
    rank{N}.safetensors  that rank's shards, HF names, source dtype
    tokenizer files      copied from the source, when it has them
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_infer.config import Mapping, ModelConfig
from dist_infer.errors import CheckpointError
from dist_infer.partition.rules import Shard
from dist_infer.partition.safetensors_stream import file_sha256
from dist_infer.partition.sources import TOKENIZER_FILES

FORMAT = "dist_infer-checkpoint"
FORMAT_VERSION = 1


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
    if file_sha256(path) != expected["sha256"]:
        raise CheckpointError(f"{what}: {path} is corrupt (sha256 differs from the manifest). {fix}")


class PartitionedCheckpoint:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.directory} is not a dist_infer checkpoint (no config.json); "
                                  "create one with `dist-infer partition --model ... --out DIR`.")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise CheckpointError(f"{config_path} is not a dist_infer checkpoint config (it may be a HF model "
                                  "directory: partition it first with `dist-infer partition`).")
        if config["format_version"] > FORMAT_VERSION:
            raise CheckpointError(f"{self.directory} uses checkpoint format {config['format_version']}; this "
                                  f"dist_infer reads up to {FORMAT_VERSION}. Upgrade dist_infer.")
        self.config = config
        self.model = ModelConfig.from_dict(config["model"])
        self.mapping = Mapping.from_dict(config["mapping"])
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise CheckpointError(f"{manifest_path} is missing; the checkpoint is incomplete. Partition again.")
        self.manifest = json.loads(manifest_path.read_text())

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
