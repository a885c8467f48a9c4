"""A rank's weights read by a thread while its start-up goes on (engine/weight_loader.py):
every parameter gets the file's bytes, a tied head stays tied, a file whose tensors do not fit
the model is the engine's error naming the tensor, and a start-up that fails leaves no
reader thread behind."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import flip_middle_bytes, mpirun_prefix, run_bounded
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig
from dist_infer.engine.build import rank_weights_file
from dist_infer.engine.random_engine import build_random_engine
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.engine.weight_loader import allocate_parameters
from dist_infer.errors import EngineError
from dist_infer.partition.safetensors_stream import file_entry

BUILD = BuildConfig(dtype="float32", max_batch_size=4, max_seq_len=128)


@pytest.fixture(scope="module")
def engine_dir(smollm2_dir, tmp_path_factory) -> Path:
    return build_random_engine("tiny-llama", tmp_path_factory.mktemp("wl") / "engine", 1, 1, BUILD,
                               tokenizer_dir=smollm2_dir, seed=3)


def _load(directory: Path, **kwargs):
    spec = EngineSpec.read(directory)
    return load_rank_engine(spec, ParallelGroups.build(LocalCommunicator(), spec.mapping), "cpu", **kwargs)


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("weights")]


def _rewrite_rank_file(engine: Path, tmp_path: Path, change) -> Path:
    """A copy of the engine whose rank-0 tensors went through `change`, engine.json's entry
    updated to match (so only the loader can object)."""
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    path = copy / rank_weights_file(0)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    spec = json.loads((copy / "engine.json").read_text())
    spec["files"][rank_weights_file(0)] = file_entry(path)
    (copy / "engine.json").write_text(json.dumps(spec))
    return copy


def test_a_tied_head_is_the_loaded_embedding(smollm2_engine):
    """SmolLM2 ties its head to the embedding: the file holds the table once, and after the
    threaded read both names are one parameter holding those bytes; no reader thread is left."""
    engine_path = smollm2_engine(1, 1)
    engine = _load(engine_path, verify=True)
    try:
        stored = load_file(engine_path / rank_weights_file(0))
        assert "lm_head.weight" not in stored and engine.model.ties_lm_head
        assert engine.model.lm_head.weight is engine.model.embed.weight
        assert torch.equal(engine.model.lm_head.weight.detach(), stored["embed.weight"])
        assert not _reader_threads()
    finally:
        engine.close()


def test_shared_parameters_stay_shared_on_the_new_device():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False)
            self.head.weight = self.embed.weight
            self.norm = nn.LayerNorm(4)

    model = Tied()
    params = allocate_parameters(model, torch.device("meta"))
    assert set(params) == {"embed.weight", "norm.weight", "norm.bias"}
    assert model.head.weight is model.embed.weight and model.embed.weight.is_meta
    assert all(p.is_meta and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("change, named", [
    (lambda t: t.__setitem__("norm.weight", torch.ones(7)), "norm.weight"),
    (lambda t: t.__setitem__("norm.weight", t["norm.weight"].bfloat16()), "torch.bfloat16"),
])
def test_a_tensor_that_does_not_fit_the_model_is_an_engine_error(engine_dir, tmp_path, change, named):
    bad = _rewrite_rank_file(engine_dir, tmp_path, change)
    with pytest.raises(EngineError) as caught:
        _load(bad, verify=True)
    message = str(caught.value)
    assert named in message and "norm.weight" in message and "Rebuild the engine" in message
    assert not _reader_threads()


def test_a_missing_tensor_is_refused_before_anything_is_read(engine_dir, tmp_path):
    bad = _rewrite_rank_file(engine_dir, tmp_path, lambda t: t.pop("norm.weight"))
    with pytest.raises(EngineError, match=r"missing \['norm.weight'\].*Rebuild the engine"):
        _load(bad)
    assert not _reader_threads()


def test_a_failed_start_up_stops_the_weight_read(engine_dir):
    """The KV pool is refused after the read started: the reader is stopped and joined."""
    with pytest.raises(EngineError, match="fewer than one 128-token sequence"):
        _load(engine_dir, max_kv_blocks=2)
    assert not _reader_threads()


LOAD_WITH_A_COLLECTIVE_CAPTURE = r"""
import json, sys, torch
from dist_infer.comm import ParallelGroups, world_from_launch
from dist_infer.engine import runtime
from dist_infer.errors import EngineError
world = world_from_launch()
runtime.RankEngine.capture_graphs = lambda self: world.all_reduce(torch.ones(1))  # a GPU capture's TP collectives
spec = runtime.EngineSpec.read(sys.argv[1])
try:
    runtime.load_rank_engine(spec, ParallelGroups.build(world, spec.mapping), "cpu").close()
    print(json.dumps({"rank": world.rank, "error": None}))
except EngineError as exc:
    print(json.dumps({"rank": world.rank, "error": str(exc)}))
"""


def test_no_rank_captures_before_every_ranks_weights_are_verified(smollm2_dir, tmp_path):
    """tp=2, rank 1's file corrupt: rank 1 finds it only once its read ends, after the warm-up. If rank 0
    went on into the capture (TP collectives; simulated here by an all-reduce) the job would hang; both
    ranks must raise rank 1's error instead."""
    engine = build_random_engine("tiny-llama", tmp_path / "e", 2, 1, BUILD, tokenizer_dir=smollm2_dir, seed=4)
    flip_middle_bytes(engine / rank_weights_file(1))
    proc = run_bounded([*mpirun_prefix(2), sys.executable, "-c", LOAD_WITH_A_COLLECTIVE_CAPTURE, str(engine)],
                       timeout=60)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(reports) == 2, proc.stderr[-3000:]
    for report in reports:
        assert "rank 1" in report["error"] and "corrupt" in report["error"], report
