"""A random-weight engine at a real model shape, with a real tokenizer.

`build_random_engine("llama-3-8b", out, ...)` writes an ordinary engine
directory, the same format `dist-infer build` writes (engine.json with sizes
and sha256 of every rank file, `rank{N}/weights.safetensors` in the engine's
fused names, the tokenizer files beside them), so that `dist-infer run`,
`dist-infer serve` and `dist-infer bench` load it like any other engine and an
HTTP benchmark (aiperf) can send text prompts to it. Weights follow
`dist-infer bench`: normal(0, 0.02), norms 1.0.

Memory: each rank's file is streamed tensor by tensor (made on the GPU when
there is one, copied to the host, written and hashed), so neither a rank nor
the full model is ever held in memory at once: one tensor at a time. One
process can write every rank in turn, or each process of an `mpirun` job
writes its own (pass `world`).

Vocabulary. Llama-3-8B has 128,256 token ids; the tokenizer we can ship (the
embedded SmolLM2's) has 49,152. With the real vocabulary a random model
samples ids the tokenizer does not know ~62 % of the time, and transformers'
`decode` silently drops them: the server would stream mostly empty text, and a
client that counts output tokens by re-tokenizing the text (aiperf does by
default) would report about a third of the tokens actually generated. So by
default the engine's vocabulary is the tokenizer's length (`vocab_size=None`):
every generated id decodes, prompts and outputs count the same on both sides.
The price is a smaller embedding and LM head (2 x 49,152 x 4,096 instead of
2 x 128,256 x 4,096: 14.96 GB of bf16 weights instead of 16.06 GB, ~7 % fewer
bytes per decode step), so tokens/s on such an engine are a few percent higher
than on the true 8B shape. Compare the server and `dist-infer bench` on the
same engine directory, and state the vocabulary with the numbers (engine.json
records it, and `random_weights` there records preset, seed and tokenizer).
Pass `vocab_size=128256` to keep the true shape (ids past the tokenizer then
decode to nothing). The bos/eos ids come from the tokenizer, so EOS can end a
request as with a real model; benchmarks ask for `ignore_eos`.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dist_infer.comm.base import Communicator, LocalCommunicator, collective_call
from dist_infer.config import BuildConfig, Mapping, ModelConfig, QuantConfig, check_layout
from dist_infer.engine.build import ShapeGroup as _ShapeGroup  # noqa: F401  (tests size models with it)
from dist_infer.engine.build import (DTYPES, engine_description, engine_tensor_specs, rank_weights_file,
                                     stage_skeleton, write_engine)
from dist_infer.engine.quant import check_quant_layout
from dist_infer.errors import EngineError, LayoutError
from dist_infer.partition.safetensors_stream import DTYPE_CODES, FileDigest
from dist_infer.partition.sources import TOKENIZER_FILES
from dist_infer.presets import preset_hf_config

log = logging.getLogger(__name__)

# A random quantized weight: codes drawn per dtype, with the std of those codes, so that
# the scales (0.02 / std) make codes * scale ~ the dense engines' normal(0, 0.02).
_CODE_STD = {torch.int8: 127 / 3**0.5, torch.uint8: 16 / 12**0.5, torch.float8_e4m3fn: 1.0}


def _random_codes(shape, dtype: torch.dtype, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, generator=gen, device=device, dtype=torch.int8)
    if dtype == torch.uint8:  # two INT4 codes per byte, each uniform in [0, 15]
        return torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)
    return torch.randn(shape, generator=gen, device=device).to(dtype)


def default_tokenizer_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, imported once from its GGUF into a cached HF dir."""
    from dist_infer.partition.sources import default_gguf_path, import_gguf

    return import_gguf(default_gguf_path())


def tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    files = [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") for f in files):
        raise EngineError(f"{tokenizer_dir} holds no tokenizer (tokenizer.json, tokenizer.model or "
                          "tokenizer_config.json); pass a Hugging Face model or tokenizer directory.")
    return files


def random_model_config(preset: str, tokenizer_dir: Path | None, vocab_size: int | None = None) -> ModelConfig:
    """The preset's shape; vocabulary = the tokenizer's length unless `vocab_size` is given;
    bos/eos from the tokenizer."""
    overrides: dict = {}
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        n = len(tok)
        if vocab_size is not None and vocab_size < n:
            raise LayoutError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n} tokens: prompts would "
                              f"index past the embedding. Use at least {n}, or leave it unset.")
        overrides = dict(vocab_size=vocab_size or n, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif vocab_size is not None:
        overrides = dict(vocab_size=vocab_size)
    return ModelConfig.from_hf(preset_hf_config(preset, **overrides))


def _tensor_specs(cfg: ModelConfig, mapping: Mapping, vocab_padded: int, dtype: torch.dtype,
                  quant: QuantConfig | None = None):
    """(name, shape, dtype) of every tensor one rank's weights file holds, as RankEngine expects."""
    model = stage_skeleton(cfg, mapping, vocab_padded, dtype, quant)
    return [(name, shape, dt) for name, dt, shape in engine_tensor_specs(model)]


def write_random_rank(path: Path, specs, device: torch.device, seed: int) -> dict:
    """Stream one rank's safetensors file: each tensor made on `device`, copied to the host,
    written and hashed while the next is made. Returns engine.json's entry (safetensors_stream.FileDigest)."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data start to 8 bytes
    digest = FileDigest()
    gen = torch.Generator(device).manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One thread hashes (in order) while this one writes; hashlib and file writes release the GIL.
    with open(path, "wb") as f, ThreadPoolExecutor(1) as hasher:
        for chunk in (struct.pack("<Q", len(head)), head):
            f.write(chunk)
            digest.update(chunk)
        pending, code_std = None, 1.0
        for name, shape, dtype in specs:
            t = torch.empty(shape, dtype=dtype, device=device)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            elif dtype in _CODE_STD:  # a quantized weight (its scales come next)
                t, code_std = _random_codes(shape, dtype, gen, device), _CODE_STD[dtype]
            elif name.endswith(".scales"):
                t.fill_(0.02 / code_std)
            elif name.endswith(".offsets"):  # INT4: codes 0..15 centred on 7.5
                t.fill_(-7.5 * 0.02 / code_std)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            data = t.reshape(-1).view(torch.uint8).cpu().numpy()
            del t
            hashed = hasher.submit(digest.update, data)
            f.write(data)
            if pending is not None:
                pending.result()
            pending = hashed
        if pending is not None:
            pending.result()
    size = path.stat().st_size
    if size != 8 + len(head) + offset:
        raise EngineError(f"{path} is {size} bytes, expected {8 + len(head) + offset}; the disk may be full.")
    return digest.entry()


def build_random_engine(preset: str, out: Path, tp: int = 1, pp: int = 1, build: BuildConfig | None = None,
                        tokenizer_dir: Path | None = None, seed: int = 0, *, vocab_size: int | None = None,
                        with_tokenizer: bool = True, device: str | None = None,
                        world: Communicator | None = None, force: bool = False) -> Path:
    """Write a random-weight engine of `preset`'s shape (dist_infer.presets.PRESETS) to `out`.

    tokenizer_dir: HF dir whose tokenizer files are copied in (default: the embedded SmolLM2);
        with_tokenizer=False makes a token-id-only engine with the preset's vocabulary.
    vocab_size: None = the tokenizer's length (see the module docstring), else this many ids.
    seed: rank r's weights come from seed + r (same seed, same files on the same device type).
    device: where weights are made: 'cuda' (default when a GPU is visible) or 'cpu'.
    world: None or a world of size 1 writes every rank here; under mpirun pass the world
        (size tp*pp) and each process writes its own rank (collective: call on every rank).
    Returns `out`. Refuses an existing `out` unless force=True.
    """
    started = time.perf_counter()
    out = Path(out)
    world = world or LocalCommunicator()
    build = build or BuildConfig(dtype="bfloat16")
    mapping = Mapping(tp, pp)
    n = mapping.world_size
    if world.size not in (1, n):
        raise LayoutError(f"tp={tp} x pp={pp} has {n} ranks; build it with `mpirun -n {n}` or in one process, "
                          f"not with {world.size} processes.")
    if with_tokenizer and tokenizer_dir is None:
        tokenizer_dir = collective_call(world, default_tokenizer_dir)
    tok_dir = Path(tokenizer_dir) if with_tokenizer else None

    def configure():
        files = tokenizer_files(tok_dir) if tok_dir is not None else []
        cfg = random_model_config(preset, tok_dir, vocab_size)
        check_layout(cfg, tp, pp)
        check_quant_layout(cfg, tp, build.quant_config)
        return files, cfg, build.resolved(cfg)

    tok_files, cfg, build = collective_call(world, configure)
    vocab_padded = -(-cfg.vocab_size // tp) * tp
    dtype = DTYPES[build.dtype]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        from dist_infer.comm.bootstrap import resolve_device

        device = resolve_device("cuda", world.rank)
    def write_mine(tmp: Path) -> dict:
        files = {}
        for rank in (range(n) if world.size == 1 else [world.rank]):
            t0 = time.perf_counter()
            specs = _tensor_specs(cfg, mapping.with_rank(rank), vocab_padded, dtype, build.quant_config)
            entry = write_random_rank(tmp / rank_weights_file(rank), specs, torch.device(device), seed + rank)
            files[rank_weights_file(rank)] = entry
            log.info("random rank %d: %d tensors, %.2f GB in %.1f s (%s)", rank, len(specs), entry["size"] / 1e9,
                     time.perf_counter() - t0, device)
        return files

    def describe(files: dict) -> dict:
        spec = engine_description(cfg, mapping, build, vocab_padded, files, time.perf_counter() - started)
        spec["random_weights"] = {"preset": preset, "seed": seed,
                                  "tokenizer": str(tok_dir) if tok_dir is not None else None}
        return spec

    write_engine(out, world, force, write_mine, describe, tok_files)
    if world.rank == 0:
        log.info("random %s engine (vocab %d, tp=%d pp=%d, %s) written to %s in %.1f s", preset, cfg.vocab_size,
                 tp, pp, build.dtype, out, time.perf_counter() - started)
    return out
