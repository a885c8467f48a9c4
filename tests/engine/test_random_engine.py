"""Random-weight engines at a preset's shape with a real tokenizer
(dist_infer.engine.random_engine): the directory is an ordinary engine that
EngineSpec.read + load_rank_engine load (sha256 checked), and its tokenizer
loads from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig, Mapping
from dist_infer.engine.build import DTYPES, rank_weights_file
from dist_infer.engine.model import StageModel
from dist_infer.engine.random_engine import _ShapeGroup, build_random_engine, write_random_rank
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.errors import EngineError, LayoutError
from dist_infer.partition.safetensors_stream import file_entry
from dist_infer.presets import PRESETS
from dist_infer.workers.prompts import load_tokenizer

BUILD = BuildConfig(dtype="float32", max_batch_size=4, max_seq_len=128)
# The keys `dist-infer build` writes into engine.json (engine/build.py).
ENGINE_JSON_KEYS = {"format", "format_version", "dist_infer_version", "model", "mapping", "build",
                    "vocab_size_padded", "files", "build_time_s", "host"}


@pytest.fixture(scope="module")
def engine_tp1(smollm2_dir, tmp_path_factory) -> Path:
    return build_random_engine("tiny-llama", tmp_path_factory.mktemp("rand") / "engine", 1, 1, BUILD,
                               tokenizer_dir=smollm2_dir, seed=5)


def test_random_engine_loads_with_its_tokenizer(engine_tp1, smollm2_dir):
    spec = EngineSpec.read(engine_tp1)
    raw = json.loads((engine_tp1 / "engine.json").read_text())
    assert ENGINE_JSON_KEYS <= set(raw)
    assert raw["random_weights"] == {"preset": "tiny-llama", "seed": 5, "tokenizer": str(smollm2_dir)}
    assert spec.mapping == Mapping(1, 1) and spec.build == BUILD

    tok = load_tokenizer(engine_tp1)
    assert tok is not None
    # The vocabulary is the tokenizer's (not the preset's 512), so every id decodes.
    assert spec.model.vocab_size == len(tok) == 49152 != PRESETS["tiny-llama"]["vocab_size"]
    assert spec.vocab_size_padded == len(tok)
    assert spec.model.eos_token_ids == (tok.eos_token_id,) and spec.model.bos_token_id == tok.bos_token_id
    ids = tok("The capital of France is")["input_ids"]
    assert ids and max(ids) < spec.model.vocab_size
    assert tok.decode(ids) == "The capital of France is"
    # The preset's shape otherwise.
    p = PRESETS["tiny-llama"]
    assert (spec.model.hidden_size, spec.model.num_layers, spec.model.num_heads, spec.model.num_kv_heads) == \
        (p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"], p["num_key_value_heads"])

    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    engine = load_rank_engine(spec, groups, "cpu", verify=True)  # sizes + sha256 from engine.json
    try:
        on_disk = load_file(engine_tp1 / rank_weights_file(0))
        params = dict(engine.model.named_parameters())
        assert set(on_disk) == set(params)
        for name, t in on_disk.items():
            assert torch.equal(params[name].detach(), t), name
        w = engine.model.embed.weight.detach()
        assert w.shape == (49152, p["hidden_size"]) and w.dtype == torch.float32
        assert 0.019 < w.std().item() < 0.021 and abs(w.mean().item()) < 1e-3  # normal(0, 0.02), not zeros
        assert torch.equal(engine.model.norm.weight.detach(), torch.ones(p["hidden_size"]))
        assert not torch.equal(engine.model.lm_head.weight.detach()[:100], w[:100])  # untied, distinct draws
    finally:
        engine.close()


def test_multi_rank_engine_has_each_ranks_shapes_and_hashes(smollm2_dir, tmp_path):
    """tp=2 x pp=2 written in one process, one rank file at a time; each file holds exactly
    the tensors RankEngine builds for that rank, and engine.json's sizes/hashes match."""
    out = build_random_engine("tiny-llama", tmp_path / "e", 2, 2, BuildConfig(dtype="bfloat16", max_seq_len=64),
                              tokenizer_dir=smollm2_dir, seed=1)
    spec = EngineSpec.read(out)
    assert spec.mapping == Mapping(2, 2) and sorted(spec.files) == [rank_weights_file(r) for r in range(4)]
    assert load_tokenizer(out) is not None
    for rank in range(4):
        path = out / rank_weights_file(rank)
        assert spec.files[rank_weights_file(rank)] == file_entry(path)
        m = spec.mapping.with_rank(rank)
        with torch.device("meta"):
            model = StageModel(spec.model, m, _ShapeGroup(m.tp_rank, 2), spec.vocab_size_padded, torch.bfloat16)
        want = {n: tuple(p.shape) for n, p in model.named_parameters()}
        got = load_file(path)
        assert {n: tuple(t.shape) for n, t in got.items()} == want
        assert all(t.dtype == torch.bfloat16 for t in got.values())
        assert ("embed.weight" in got) == (m.pp_rank == 0) and ("lm_head.weight" in got) == (m.pp_rank == 1)
    # Ranks draw different weights (seed + rank); the same seed rebuilds identical files.
    a, b = (load_file(out / rank_weights_file(r))["layers.0.mlp.down_proj.weight"] for r in (0, 1))
    assert not torch.equal(a, b)
    again = build_random_engine("tiny-llama", tmp_path / "e2", 2, 2, BuildConfig(dtype="bfloat16", max_seq_len=64),
                                tokenizer_dir=smollm2_dir, seed=1)
    assert EngineSpec.read(again).files == spec.files
    other = build_random_engine("tiny-llama", tmp_path / "e3", 1, 1, BUILD, tokenizer_dir=smollm2_dir, seed=2,
                                vocab_size=PRESETS["tiny-llama"]["vocab_size"] * 100)
    assert EngineSpec.read(other).model.vocab_size == 51200  # kept when given, >= the tokenizer's


def test_default_tokenizer_is_the_embedded_smollm2(smollm2_dir, tmp_path):
    out = build_random_engine("tiny-llama", tmp_path / "e", build=BUILD)
    raw = json.loads((out / "engine.json").read_text())
    assert raw["random_weights"]["tokenizer"] == str(smollm2_dir)
    assert (out / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()


def test_token_id_only_engine_keeps_the_preset_vocab(tmp_path):
    out = build_random_engine("tiny-llama", tmp_path / "e", build=BUILD, with_tokenizer=False)
    spec = EngineSpec.read(out)
    assert spec.model.vocab_size == PRESETS["tiny-llama"]["vocab_size"]
    assert load_tokenizer(out) is None
    engine = load_rank_engine(spec, ParallelGroups.build(LocalCommunicator(), spec.mapping), "cpu")
    engine.close()


def test_refusals(smollm2_dir, tmp_path):
    with pytest.raises(LayoutError, match="smaller than the tokenizer"):
        build_random_engine("tiny-llama", tmp_path / "a", build=BUILD, tokenizer_dir=smollm2_dir, vocab_size=512)
    with pytest.raises(LayoutError, match="tp=3"):  # 4 heads
        build_random_engine("tiny-llama", tmp_path / "b", 3, 1, BUILD, with_tokenizer=False)
    with pytest.raises(LayoutError, match="max_position_embeddings"):
        build_random_engine("tiny-llama", tmp_path / "c", build=BuildConfig(max_seq_len=4096), with_tokenizer=False)
    with pytest.raises(EngineError, match="no tokenizer"):
        build_random_engine("tiny-llama", tmp_path / "d", build=BUILD, tokenizer_dir=tmp_path)
    out = build_random_engine("tiny-llama", tmp_path / "e", build=BUILD, with_tokenizer=False)
    with pytest.raises(EngineError, match="already exists"):
        build_random_engine("tiny-llama", out, build=BUILD, with_tokenizer=False)
    build_random_engine("tiny-llama", out, build=BUILD, with_tokenizer=False, force=True, seed=9)
    assert json.loads((out / "engine.json").read_text())["random_weights"]["seed"] == 9
    assert not list(tmp_path.glob(".*tmp-build*"))  # no temp directory left behind


def test_streamed_safetensors_file_round_trips(tmp_path):
    specs = [("b", (3, 5), torch.bfloat16), ("a.norm.weight", (7,), torch.float32), ("c", (2, 2, 2), torch.float16)]
    entry = write_random_rank(tmp_path / "r" / "w.safetensors", specs, torch.device("cpu"), seed=0)
    path = tmp_path / "r" / "w.safetensors"
    assert entry == file_entry(path)
    got = load_file(path)
    assert {n: (tuple(t.shape), t.dtype) for n, t in got.items()} == {n: (s, d) for n, s, d in specs}
    assert torch.equal(got["a.norm.weight"], torch.ones(7))
    assert got["b"].abs().sum() > 0 and got["c"].abs().sum() > 0
    assert DTYPES["bfloat16"] == torch.bfloat16
