"""`dist-infer build` and engine loading, through the real CLI (under a real
`mpirun` where more than one process is involved)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import completions, flip_middle_bytes, make_tiny_model, run_cli, write_prompts
from dist_infer.partition.safetensors_stream import file_entry

TP, PP = 2, 2
WORLD = TP * PP
TIMEOUT = 120  # every subprocess is bounded: a hang fails the test
NO_QUANT = {"quant": None, "quant_group_size": 128, "quant_lm_head": False}  # tests/engine/test_quant.py


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def assert_clean_failure(proc, *words):
    """Non-zero exit, a message containing `words`, no Python traceback."""
    err = proc.stderr
    assert proc.returncode != 0, f"expected failure, got exit 0\nstdout:\n{proc.stdout}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in err, f"{w!r} not in stderr:\n{err[-3000:]}"


def tree_hashes(directory: Path, skip=("engine.json",)) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def build(ckpt: Path, out: Path, *extra: str, world: int = 1):
    return run_cli("build", "--checkpoint", str(ckpt), "--out", str(out), *extra, world=world, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # In this process, with the function `dist-infer partition` calls (its CLI is tested in
    # tests/partition): what is under test here starts at the checkpoint.
    from dist_infer.partition import partition

    root = tmp_path_factory.mktemp("build")
    make_tiny_model(root / "hf", "llama")
    out = root / "ckpt"
    partition(root / "hf", TP, PP, out, progress=False)
    return out


@pytest.fixture(scope="module")
def engine(ckpt) -> Path:
    """Single-process build of all 4 ranks, default options."""
    out = ckpt.parent / "engine"
    _ok(build(ckpt, out))
    return out


@pytest.fixture
def engine_copy(engine, tmp_path) -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(engine, dst)
    return dst


def _run_engine(engine_dir: Path, world: int, tmp_path: Path, **kw):
    prompts = write_prompts(tmp_path / "p.jsonl", [[1, 2, 3], [4, 5, 6, 7, 8]])
    return run_cli("run", "--engine", str(engine_dir), "--prompts-file", str(prompts), "--json",
                   "--max-new-tokens", "4", "--ignore-eos", world=world, timeout=TIMEOUT, **kw)


# ---------------------------------------------------------------- building

def test_mpi_build_matches_single_process_build(ckpt, engine):
    mpi_out = ckpt.parent / "engine-mpi"
    proc = _ok(build(ckpt, mpi_out, world=WORLD))
    assert proc.stdout.count("engine written to") == 1  # only rank 0 reports
    single, multi = tree_hashes(engine), tree_hashes(mpi_out)
    weight_files = [f"rank{r}/weights.safetensors" for r in range(WORLD)]
    assert all(f in single for f in weight_files), sorted(single)
    assert single == multi
    a, b = (json.loads((d / "engine.json").read_text()) for d in (engine, mpi_out))
    for spec in (a, b):
        spec.pop("build_time_s")
        spec.pop("host")
    assert a == b
    # The sizes and hashes engine.json records are those of the files written.
    for name in weight_files:
        path = mpi_out / name
        assert b["files"][name] == file_entry(path) and b["files"][name]["piece_sha256"] == [multi[name]]  # one piece
    # No temp directory is left beside the output.
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.name.startswith(".")) == []


def test_engine_json_records_model_mapping_and_build_options(ckpt, engine):
    spec = json.loads((engine / "engine.json").read_text())
    ck = json.loads((ckpt / "config.json").read_text())
    assert spec["format"] == "dist_infer-engine"
    assert spec["format_version"] == 1
    assert spec["model"] == ck["model"]
    assert spec["model"]["architecture"] == "llama" and spec["model"]["num_layers"] == 4
    assert spec["mapping"] == {"tp": TP, "pp": PP}
    # Defaults: float32, batch 8, the model's max_position_embeddings (256), blocks of 16.
    assert spec["build"] == {"dtype": "float32", "max_batch_size": 8, "max_seq_len": 256, "kv_block_size": 16,
                             **NO_QUANT}
    assert sorted(spec["files"]) == [f"rank{r}/weights.safetensors" for r in range(WORLD)]

    out = ckpt.parent / "engine-opts"
    _ok(build(ckpt, out, "--max-batch-size", "3", "--max-seq-len", "96", "--kv-block-size", "8"))
    spec = json.loads((out / "engine.json").read_text())
    assert spec["build"] == {"dtype": "float32", "max_batch_size": 3, "max_seq_len": 96, "kv_block_size": 8,
                             **NO_QUANT}
    assert spec["mapping"] == {"tp": TP, "pp": PP} and spec["format_version"] == 1


def test_engine_weights_are_fused_per_rank(engine):
    """Each rank holds only its stage's layers, with fused qkv / gate_up at its TP width."""
    # llama tiny: hidden 64, 8 heads (hd 8), 2 KV heads, MLP 128, vocab 301, 4 layers.
    for rank in range(WORLD):
        w = load_file(engine / f"rank{rank}" / "weights.safetensors")
        stage = rank // TP
        layers = {int(n.split(".")[1]) for n in w if n.startswith("layers.")}
        assert layers == {2 * stage, 2 * stage + 1}
        i = 2 * stage
        assert w[f"layers.{i}.self_attn.qkv_proj.weight"].shape == (8 // TP * 8 + 2 * (2 // TP) * 8, 64)
        assert w[f"layers.{i}.mlp.gate_up_proj.weight"].shape == (2 * 128 // TP, 64)
        assert w[f"layers.{i}.self_attn.o_proj.weight"].shape == (64, 8 // TP * 8)
        assert ("embed.weight" in w) == (stage == 0)
        assert ("lm_head.weight" in w) == (stage == PP - 1)
        if stage == 0:
            assert w["embed.weight"].shape == (302 // TP, 64)  # vocab 301 padded to a multiple of tp


def test_bfloat16_build_casts_and_runs(ckpt, engine, tmp_path):
    out = tmp_path / "engine-bf16"
    _ok(build(ckpt, out, "--dtype", "bfloat16"))
    spec = json.loads((out / "engine.json").read_text())
    assert spec["build"]["dtype"] == "bfloat16"
    for rank in range(WORLD):
        bf = load_file(out / f"rank{rank}" / "weights.safetensors")
        fp = load_file(engine / f"rank{rank}" / "weights.safetensors")
        assert bf.keys() == fp.keys()
        for name, t in bf.items():
            assert t.dtype == torch.bfloat16, name
            assert torch.equal(t, fp[name].to(torch.bfloat16)), name
        size = (out / f"rank{rank}" / "weights.safetensors").stat().st_size
        assert size < 0.6 * (engine / f"rank{rank}" / "weights.safetensors").stat().st_size
    # The bf16 engine loads and generates across TP and PP (bf16 all-reduce / send paths).
    outs = completions(_run_engine(out, WORLD, tmp_path))
    assert [len(c["output_ids"]) for c in outs] == [4, 4]
    assert all(0 <= t < 301 for c in outs for t in c["output_ids"])


def test_existing_out_refused_without_force(ckpt, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = build(ckpt, out)
    assert_clean_failure(proc, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "user data"
    assert not (out / "engine.json").exists()

    _ok(build(ckpt, out, "--force"))
    assert not (out / "keep.txt").exists()
    assert (out / "engine.json").is_file()
    assert all((out / f"rank{r}" / "weights.safetensors").is_file() for r in range(WORLD))


def test_build_with_wrong_process_count_refused(ckpt, tmp_path):
    out = tmp_path / "engine"
    proc = build(ckpt, out, world=2)
    assert_clean_failure(proc, "4 ranks", "mpirun -n 4")
    assert not out.exists()


@pytest.mark.parametrize("world", [WORLD, 1])
def test_failed_build_leaves_no_engine_dir(ckpt, tmp_path, world):
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    flip_middle_bytes(bad / "rank2.safetensors")
    out = tmp_path / "engine"
    proc = build(bad, out, world=world)
    assert_clean_failure(proc, "rank 2", "corrupt")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-built temp dir


def test_failed_forced_rebuild_keeps_previous_engine(ckpt, engine_copy, tmp_path):
    before = tree_hashes(engine_copy, skip=())
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    (bad / "rank1.safetensors").unlink()
    proc = build(bad, engine_copy, "--force")
    assert_clean_failure(proc, "rank 1", "missing")
    assert tree_hashes(engine_copy, skip=()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------- loading

def test_engine_runs_under_mpirun(engine, tmp_path):
    """Baseline for the refusals below: the intact engine loads and generates."""
    outs = completions(_run_engine(engine, WORLD, tmp_path))
    assert [len(c["output_ids"]) for c in outs] == [4, 4]


def test_load_refuses_wrong_world_size(engine, tmp_path):
    proc = _run_engine(engine, 1, tmp_path)  # plain `dist-infer run`, one process
    assert_clean_failure(proc, "tp=2 x pp=2", "4 ranks", "mpirun -n 4")


def test_load_refuses_missing_rank_file(engine_copy, tmp_path):
    (engine_copy / "rank3" / "weights.safetensors").unlink()
    proc = _run_engine(engine_copy, WORLD, tmp_path)
    assert_clean_failure(proc, "rank 3", "missing", "Rebuild the engine")


def test_load_refuses_corrupted_rank_file(engine_copy, tmp_path):
    path = engine_copy / "rank1" / "weights.safetensors"
    size = path.stat().st_size
    flip_middle_bytes(path)
    assert path.stat().st_size == size
    proc = _run_engine(engine_copy, WORLD, tmp_path)
    assert_clean_failure(proc, "rank 1", "corrupt", "sha256", "Rebuild the engine")


def test_load_refuses_newer_format_version(engine_copy, tmp_path):
    path = engine_copy / "engine.json"
    spec = json.loads(path.read_text())
    spec["format_version"] = spec["format_version"] + 1
    path.write_text(json.dumps(spec))
    proc = _run_engine(engine_copy, WORLD, tmp_path)
    assert_clean_failure(proc, "engine format 2", "Upgrade dist_infer")


def test_load_refuses_checkpoint_dir_with_hint(ckpt, tmp_path):
    proc = _run_engine(ckpt, 1, tmp_path)
    assert_clean_failure(proc, "not a dist_infer engine", "dist-infer build")


def test_a_build_failing_mid_file_leaves_no_writer_or_hash_thread(ckpt, tmp_path, monkeypatch):
    """A rank file that fails part-way (a bad tensor, a full disk, Ctrl-C) abandons its writer: its writer
    and piece-hash threads end with the build instead of waiting on a queue for ever."""
    import threading

    from dist_infer.config import BuildConfig
    from dist_infer.engine import build as build_module
    from dist_infer.partition.checkpoint import PartitionedCheckpoint

    real = build_module.engine_tensors

    def first_tensor_then_failure(*args):
        yield next(iter(real(*args)))
        raise OSError("No space left on device")

    def writer_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith(("safetensors-write", "piece-sha256"))}

    monkeypatch.setattr(build_module, "engine_tensors", first_tensor_then_failure)
    before = writer_threads()
    with pytest.raises(OSError, match="No space left"):
        build_module.build_rank(PartitionedCheckpoint(ckpt), 0, tmp_path / "rank0", BuildConfig())
    assert [t.name for t in writer_threads() - before] == []
