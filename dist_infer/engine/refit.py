"""`dist-infer refit`: new weights of the same architecture into a built engine, without a rebuild.

    dist-infer refit --engine ENGINE --checkpoint NEW_HF_DIR

NEW goes through the code paths the engine came from: `partition` at the engine's recorded
layout (mapping), then `build_rank` with its recorded build options (dtype, quantization), into a
staging directory beside the engine (.ENGINE.tmp-refit-HOST-PID). Every new rank file must hold
exactly the tensors (names, shapes, dtypes) of the file it replaces. The staged engine (the new rank
files, engine.json with their sizes and sha256 pieces, every other file hard-linked: tokenizer,
generation config, Triton cache) then takes the engine's place in one atomic exchange of the two
directories (renameat2 RENAME_EXCHANGE), and the old engine is removed. A checkpoint of another
architecture, an incomplete or damaged one, or an interruption (SIGTERM, Ctrl-C) leaves the engine
byte-identical.

A running server takes a refitted engine with `POST /admin/update_weights` (serve --enable-admin).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from dist_infer.config import ModelConfig
from dist_infer.engine.build import adopt_checkpoint_quantization, build_rank, rank_weights_file
from dist_infer.engine.runtime import EngineSpec
from dist_infer.errors import DistInferError, EngineError
from dist_infer.interrupts import interruption, remove_dead_temp_dirs, sigterm_raises, temp_dir
from dist_infer.partition import PartitionedCheckpoint, partition
from dist_infer.partition.partitioner import read_model_config

log = logging.getLogger(__name__)

STAGING = "tmp-refit"


@dataclass(frozen=True)
class RefitResult:
    engine: Path
    weights_id: str   # EngineSpec.weights_id of the refitted engine
    seconds: float
    atomic: bool      # the directories were exchanged in one step (else file by file, see swap_in)


def model_differences(engine: ModelConfig, new: ModelConfig) -> list[str]:
    """The ModelConfig fields where `new` differs from the engine's: `engine=... new=...` each."""
    a, b = engine.to_dict(), new.to_dict()
    return [f"{k}: engine {_short(a[k])}, checkpoint {_short(b[k])}" for k in a if a[k] != b[k]]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_same_architecture(spec: EngineSpec, new: ModelConfig, checkpoint: Path) -> None:
    differences = model_differences(spec.model, new)
    if differences:
        raise EngineError(f"{checkpoint} is not the architecture of engine {spec.directory} "
                          f"({'; '.join(differences)}). "
                          "Refit swaps weights of the same architecture only: build a new engine for it "
                          f"(`dist-infer partition --model {checkpoint} ...` then `dist-infer build ...`).")


def refit(engine: Path, checkpoint: Path, progress: bool = False) -> RefitResult:
    """Swap NEW's weights into `engine` (one process builds every rank's file in turn)."""
    started = time.perf_counter()
    engine, checkpoint = Path(engine), Path(checkpoint)
    spec = EngineSpec.read(engine)
    check_same_architecture(spec, read_model_config(checkpoint), checkpoint)
    staging = temp_dir(engine, STAGING)
    remove_dead_temp_dirs(engine, STAGING)
    with sigterm_raises():
        try:
            staged = _stage(spec, checkpoint, staging, progress)
            atomic = swap_in(staged, engine)
        except BaseException as exc:
            if (cause := interruption(exc)) is not None:
                log.warning("refit interrupted (%s): the engine %s is unchanged", cause or "SIGINT", engine)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    result = RefitResult(engine, EngineSpec.read(engine).weights_id, time.perf_counter() - started, atomic)
    log.info("refitted %s with %s in %.1f s (weights %s)", engine, checkpoint, result.seconds, result.weights_id)
    return result


def _stage(spec: EngineSpec, checkpoint: Path, staging: Path, progress: bool) -> Path:
    """The refitted engine, complete, in staging/engine; staging/checkpoint is NEW partitioned."""
    staging.mkdir(parents=True)
    ckpt = PartitionedCheckpoint(partition(checkpoint, spec.mapping.tp, spec.mapping.pp, staging / "checkpoint",
                                           progress=progress))
    build_config = _same_build(spec, ckpt, checkpoint)
    out = staging / "engine"
    files = {}
    for rank in range(spec.mapping.world_size):
        files.update(_build_rank(ckpt, rank, out, build_config, checkpoint))
        check_same_tensors(spec.directory / rank_weights_file(rank), out / rank_weights_file(rank), checkpoint)
    _link_other_files(spec.directory, out)
    _write_engine_json(spec.directory, out, files, checkpoint, ckpt.quantization)
    return out


def _build_rank(ckpt: PartitionedCheckpoint, rank: int, out: Path, build_config, checkpoint: Path) -> dict:
    """build_rank, where a tensor of a shape other than config.json implies (partition reads no
    shapes from the config) is the checkpoint's fault: it fails fusing or writing it."""
    try:
        return build_rank(ckpt, rank, out, build_config)
    except (RuntimeError, ValueError) as exc:
        raise EngineError(f"{checkpoint}: a tensor does not have the shape its config.json implies ({exc}). The "
                          "checkpoint is damaged or not the model its config names; the engine is unchanged.") from None


def _same_build(spec: EngineSpec, ckpt: PartitionedCheckpoint, checkpoint: Path):
    """The engine's build options, as NEW builds with them; a pre-quantized NEW that the engine's
    mode cannot take (or a vocabulary padded otherwise) needs a new engine."""
    fix = "Refit cannot change how the engine stores its weights: build a new engine for this checkpoint."
    if ckpt.config["vocab_size_padded"] != spec.vocab_size_padded:
        raise EngineError(f"{checkpoint} pads its vocabulary to {ckpt.config['vocab_size_padded']} rows, the engine to "
                          f"{spec.vocab_size_padded}. {fix}")
    try:
        adopted = adopt_checkpoint_quantization(spec.build, ckpt.quantization)
    except DistInferError as exc:
        raise EngineError(f"{checkpoint}: {exc} {fix}") from None
    if adopted != spec.build:
        raise EngineError(f"{checkpoint} is pre-quantized ({ckpt.quantization.get('format')}, builds as "
                          f"{adopted.quant}) but the engine stores {spec.build.quant or spec.build.dtype} weights. "
                          f"{fix}")
    return spec.build


def check_same_tensors(old: Path, new: Path, checkpoint: Path) -> None:
    """The new rank file holds exactly the old one's tensors: names, shapes, dtypes."""
    old_specs, new_specs = _tensor_specs(old), _tensor_specs(new)
    if old_specs != new_specs:
        differ = sorted(n for n in old_specs.keys() | new_specs.keys() if old_specs.get(n) != new_specs.get(n))
        raise EngineError(f"{checkpoint} builds {new.parent.name} with tensors that differ from the engine's "
                          f"({', '.join(differ[:3])}: {[old_specs.get(n) for n in differ[:3]]} -> "
                          f"{[new_specs.get(n) for n in differ[:3]]}). Build a new engine for this checkpoint.")


def _tensor_specs(path: Path) -> dict[str, tuple]:
    if not path.is_file():
        raise EngineError(f"{path} is missing: the engine is incomplete. Rebuild it (`dist-infer build ... --force`).")
    with safe_open(path, framework="pt") as f:
        return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}


def _is_rank_weights(relative: str) -> bool:
    return relative.endswith("/weights.safetensors") and relative.startswith("rank")


def _link_other_files(engine: Path, out: Path) -> None:
    """Everything of the engine but engine.json and the rank weights, hard-linked into `out`
    (copied where the filesystem has no hard links): nothing else changes."""
    for path in sorted(engine.rglob("*")):
        relative = path.relative_to(engine).as_posix()
        if path.is_dir() or relative == "engine.json" or _is_rank_weights(relative):
            continue
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _write_engine_json(engine: Path, out: Path, files: dict, checkpoint: Path, quantization: dict | None) -> None:
    """engine.json as it was, with the new rank files' entries and where the weights came from."""
    description = json.loads((engine / "engine.json").read_text())
    description["files"] = {**description["files"], **files}
    description.pop("prequantized_checkpoint", None)
    if quantization:
        description["prequantized_checkpoint"] = {k: v for k, v in quantization.items() if k != "source_config"}
    source = str(checkpoint.resolve()) if checkpoint.exists() else str(checkpoint)  # or 'default'
    description["refit"] = {"checkpoint": source, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "engine.json").write_text(json.dumps(description, indent=1))


# ---- the swap -------------------------------------------------------------------------------------------------

AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange_directories(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the
    system or filesystem has no such call (then nothing happened)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def swap_in(staged: Path, engine: Path) -> bool:
    """Put the staged engine in `engine`'s place; the old one ends up at `staged` (removed with the
    staging directory). True when atomic. Without RENAME_EXCHANGE the rank files and then
    engine.json are renamed one by one: a crash in between leaves files that engine.json's sha256
    does not match, which loading names (never a silent mix)."""
    if exchange_directories(staged, engine):
        return True
    log.warning("this filesystem cannot exchange directories atomically: replacing the engine's files one by one")
    for entry in json.loads((staged / "engine.json").read_text())["files"]:
        os.replace(staged / entry, engine / entry)
    os.replace(staged / "engine.json", engine / "engine.json")
    return False


def describe(result: RefitResult) -> str:
    return (f"engine {result.engine} refitted in {result.seconds:.1f} s (weights {result.weights_id}"
            f"{'' if result.atomic else ', files replaced one by one'})")

