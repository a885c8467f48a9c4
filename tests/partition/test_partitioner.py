"""`dist-infer partition` end to end: tiny random HF checkpoints are split for
every TP x PP layout and every original tensor is reassembled bit-exactly from
the rank files; atomic output, refusals before any output, and bounded memory."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model, run_cli
from dist_infer.config import Mapping, ModelConfig
from dist_infer.errors import CheckpointError, LayoutError
from dist_infer.partition import PartitionedCheckpoint, partition
from dist_infer.partition.rules import REPLICATED
from dist_infer.partition.safetensors_stream import StreamingSafetensorsWriter
from dist_infer.partition.sources import SourceCheckpoint

ARCHS = ("llama", "mistral", "qwen2")
LAYOUTS = list(itertools.product([1, 2, 4], [1, 2, 3]))


# ------------------------------------------------------------------ helpers

def load_source(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF safetensors dir (single or multi-file), read independently of dist_infer."""
    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors


def model_config(directory: Path) -> ModelConfig:
    from transformers import AutoConfig

    return ModelConfig.from_hf(AutoConfig.from_pretrained(directory))


def load_ranks(out: Path, world: int) -> dict[int, dict[str, torch.Tensor]]:
    return {r: load_file(out / f"rank{r}.safetensors") for r in range(world)}


def expected_rank_tensors(src: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, pp: int, rank: int):
    """What rank `rank` must hold, derived from what the math needs (not from the rules module):
    column-parallel rows, row-parallel columns, the KV heads its own query heads attend with,
    padded vocab rows, its stage's layers, embed on the first stage, norm + head on the last."""
    m = Mapping(tp, pp, rank)
    t = m.tp_rank
    hd, heads, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

    def rows(x, parts):
        per = x.shape[0] // parts
        return x[t * per:(t + 1) * per]

    def cols(x, parts):
        per = x.shape[1] // parts
        return x[:, t * per:(t + 1) * per]

    q_heads = range(t * heads // tp, (t + 1) * heads // tp)
    kv_heads = sorted({q // (heads // kv) for q in q_heads})
    kv_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kv_heads])

    def vocab(x):
        per = -(-cfg.vocab_size // tp)
        part = x[t * per:min((t + 1) * per, cfg.vocab_size)]
        return torch.cat([part, part.new_zeros((per - part.shape[0], *x.shape[1:]))])

    out = {}
    for layer in m.stage_layers(cfg.num_layers):
        p = f"model.layers.{layer}."
        out[p + "self_attn.q_proj.weight"] = rows(src[p + "self_attn.q_proj.weight"], tp)
        out[p + "self_attn.k_proj.weight"] = src[p + "self_attn.k_proj.weight"][kv_rows]
        out[p + "self_attn.v_proj.weight"] = src[p + "self_attn.v_proj.weight"][kv_rows]
        out[p + "self_attn.o_proj.weight"] = cols(src[p + "self_attn.o_proj.weight"], tp)
        if cfg.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = rows(src[p + "self_attn.q_proj.bias"], tp)
            out[p + "self_attn.k_proj.bias"] = src[p + "self_attn.k_proj.bias"][kv_rows]
            out[p + "self_attn.v_proj.bias"] = src[p + "self_attn.v_proj.bias"][kv_rows]
        out[p + "mlp.gate_proj.weight"] = rows(src[p + "mlp.gate_proj.weight"], tp)
        out[p + "mlp.up_proj.weight"] = rows(src[p + "mlp.up_proj.weight"], tp)
        out[p + "mlp.down_proj.weight"] = cols(src[p + "mlp.down_proj.weight"], tp)
        out[p + "input_layernorm.weight"] = src[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = src[p + "post_attention_layernorm.weight"]
    if m.is_first_stage:
        out["model.embed_tokens.weight"] = vocab(src["model.embed_tokens.weight"])
    if m.is_last_stage:
        out["model.norm.weight"] = src["model.norm.weight"]
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = vocab(src["lm_head.weight"])
        elif pp > 1:  # tied: the last stage needs its own copy of the embedding as the LM head
            out["lm_head.weight"] = vocab(src["model.embed_tokens.weight"])
    return out


def reassemble_from_manifest(out: Path, src: dict[str, torch.Tensor], ranks: dict[int, dict[str, torch.Tensor]]):
    """Rebuild every source tensor from the rank files using only manifest.json's
    shard records; replicas must be identical and padding zero."""
    manifest = json.loads((out / "manifest.json").read_text())
    by_source: dict[str, list[tuple[int, dict]]] = {}
    for rank_str, shards in manifest["shards"].items():
        rank = int(rank_str)
        names = [s["name"] for s in shards]
        assert len(names) == len(set(names)), f"rank {rank} lists a tensor twice"
        assert set(names) == set(ranks[rank]), f"rank {rank}: file tensors differ from the manifest"
        for s in shards:
            assert s["rank"] == rank
            by_source.setdefault(s["source"], []).append((rank, s))
    assert set(by_source) == set(src), "some source tensor is in no rank file (or a shard names no source tensor)"
    for name, source in src.items():
        full = torch.full_like(source, float("nan"))
        covered = torch.zeros(source.shape, dtype=torch.bool)
        for rank, s in by_source[name]:
            piece = ranks[rank][s["name"]]
            assert piece.dtype == source.dtype
            if s["dim"] == REPLICATED:
                assert torch.equal(piece, source), f"{name} replica on rank {rank}"
                covered[...] = True
                full.copy_(piece)
                continue
            dim, start, stop, length = s["dim"], s["start"], s["stop"], s["length"]
            assert piece.shape[dim] == length and length >= stop - start
            expect_shape = list(source.shape)
            expect_shape[dim] = length
            assert list(piece.shape) == expect_shape
            real = piece.narrow(dim, 0, stop - start)
            pad = piece.narrow(dim, stop - start, length - (stop - start))
            assert not pad.any(), f"{name} rank {rank}: padding is not zero"
            target = full.narrow(dim, start, stop - start)
            seen = covered.narrow(dim, start, stop - start)
            if seen.any():  # a replica (e.g. KV heads at tp > kv): must be an identical copy
                assert seen.all()
                assert torch.equal(target, real), f"{name}: replicas on different ranks differ"
            target.copy_(real)
            seen.fill_(True)
        assert covered.all(), f"{name}: not every element is in some rank file"
        assert torch.equal(full, source), f"{name} does not reassemble exactly"


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for arch in ARCHS:
        make_tiny_model(root / arch, arch, seed=1)
        dirs[arch] = root / arch
    return dirs


@pytest.fixture(scope="module")
def partitioned(tiny_dirs, tmp_path_factory):
    """partitioned(arch, tp, pp) -> checkpoint dir, made once per module."""
    root = tmp_path_factory.mktemp("partitioned")
    cache = {}

    def get(arch, tp, pp):
        key = (arch, tp, pp)
        if key not in cache:
            out = root / f"{arch}-tp{tp}-pp{pp}"
            result = partition(tiny_dirs[arch], tp, pp, out, progress=False)
            assert Path(result) == out
            cache[key] = out
        return cache[key]

    return get


# ------------------------------------------------------------------ round trip

@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_exact(arch, tp, pp, tiny_dirs, partitioned):
    out = partitioned(arch, tp, pp)
    src = load_source(tiny_dirs[arch])
    cfg = model_config(tiny_dirs[arch])
    world = tp * pp
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == sorted(f"rank{r}.safetensors" for r in range(world))
    ranks = load_ranks(out, world)
    # 1) every rank holds exactly what the math says it needs
    for rank in range(world):
        expected = expected_rank_tensors(src, cfg, tp, pp, rank)
        assert sorted(ranks[rank]) == sorted(expected), f"rank {rank} holds the wrong set of tensors"
        for name, tensor in expected.items():
            got = ranks[rank][name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, (rank, name)
            assert torch.equal(got, tensor), f"rank {rank}: {name} differs"
    # 2) the manifest's shard records rebuild every source tensor bit-exactly
    reassemble_from_manifest(out, src, ranks)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("arch", ARCHS)
def test_stage_contents_and_metadata(arch, tp, pp, tiny_dirs, partitioned):
    out = partitioned(arch, tp, pp)
    cfg = model_config(tiny_dirs[arch])
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "dist_infer-checkpoint"
    assert config["mapping"] == {"tp": tp, "pp": pp}
    assert ModelConfig.from_dict(config["model"]) == cfg
    assert config["vocab_size_padded"] == -(-301 // tp) * tp
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(f"rank{r}.safetensors" for r in range(tp * pp))
    for fname, entry in manifest["files"].items():
        data = (out / fname).read_bytes()
        assert entry["size"] == len(data)
        assert entry["piece_sha256"] == [hashlib.sha256(data).hexdigest()]  # a small file is one piece
    stage_layers = [set(Mapping(tp, pp).stage_layers(cfg.num_layers, s)) for s in range(pp)]
    assert set().union(*stage_layers) == set(range(cfg.num_layers))
    for rank in range(tp * pp):
        m = Mapping(tp, pp, rank)
        with safe_open(out / f"rank{rank}.safetensors", "pt") as f:
            names = set(f.keys())
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layers == stage_layers[m.pp_rank], f"rank {rank} holds layers {sorted(layers)}"
        assert ("model.embed_tokens.weight" in names) == m.is_first_stage
        assert ("model.norm.weight" in names) == m.is_last_stage
        has_head = m.is_last_stage and (not cfg.tie_word_embeddings or pp > 1)
        assert ("lm_head.weight" in names) == has_head
    # the reader the build step uses agrees and verifies every file
    ckpt = PartitionedCheckpoint(out)
    assert ckpt.mapping == Mapping(tp, pp) and ckpt.model == cfg
    for rank in range(tp * pp):
        assert {s.name for s in ckpt.shards(rank)} == set(ckpt.load_rank(rank, verify=True))


def test_kv_replication_vs_split(tiny_dirs, partitioned):
    """llama (2 KV heads) at tp=4 replicates each KV head on 2 ranks; mistral (4) splits;
    qwen2 (MQA) gives every rank the single KV head."""
    name = "model.layers.0.self_attn.k_proj.weight"
    llama_src = load_source(tiny_dirs["llama"])[name]
    llama = load_ranks(partitioned("llama", 4, 1), 4)
    hd = 8
    assert all(llama[r][name].shape == (hd, 64) for r in range(4))
    assert torch.equal(llama[0][name], llama[1][name]) and torch.equal(llama[2][name], llama[3][name])
    assert torch.equal(llama[0][name], llama_src[:hd]) and torch.equal(llama[2][name], llama_src[hd:])
    assert not torch.equal(llama[1][name], llama[2][name])

    mistral_src = load_source(tiny_dirs["mistral"])[name]
    mistral = load_ranks(partitioned("mistral", 4, 1), 4)
    for r in range(4):
        assert torch.equal(mistral[r][name], mistral_src[r * hd:(r + 1) * hd])

    qwen_src = load_source(tiny_dirs["qwen2"])
    qwen = load_ranks(partitioned("qwen2", 4, 1), 4)
    for r in range(4):
        assert torch.equal(qwen[r][name], qwen_src[name])
        bias = "model.layers.0.self_attn.v_proj.bias"
        assert torch.equal(qwen[r][bias], qwen_src[bias])


def test_tied_lm_head_on_last_stage_equals_embedding(tiny_dirs, partitioned):
    src = load_source(tiny_dirs["qwen2"])
    assert "lm_head.weight" not in src  # tied checkpoint
    out = partitioned("qwen2", 2, 3)
    ranks = load_ranks(out, 6)
    for t in range(2):
        head = ranks[4 + t]["lm_head.weight"]
        embed = ranks[t]["model.embed_tokens.weight"]
        assert torch.equal(head, embed)
        assert torch.equal(head[:151 if t == 0 else 150], src["model.embed_tokens.weight"][t * 151:(t + 1) * 151])
    assert "lm_head.weight" not in ranks[0] and "model.embed_tokens.weight" not in ranks[4]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_round_trip(dtype, tmp_path, tiny_dirs):
    """HF checkpoints are usually bf16: rank files keep the source dtype, bit-exactly."""
    src_dir = tmp_path / "src"
    make_tiny_model(src_dir, "llama", seed=3)
    tensors = {k: v.to(dtype) for k, v in load_file(src_dir / "model.safetensors").items()}
    save_file(tensors, src_dir / "model.safetensors", metadata={"format": "pt"})
    tp, pp = 4, 2
    out = partition(src_dir, tp, pp, tmp_path / "out", progress=False)
    src, cfg = load_source(src_dir), model_config(src_dir)
    ranks = load_ranks(out, tp * pp)
    for rank in range(tp * pp):
        expected = expected_rank_tensors(src, cfg, tp, pp, rank)
        assert sorted(ranks[rank]) == sorted(expected)
        for name, tensor in expected.items():
            assert ranks[rank][name].dtype == dtype and torch.equal(ranks[rank][name], tensor), (rank, name)
    reassemble_from_manifest(out, src, ranks)


# ------------------------------------------------------------------ sources

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_multi_file_source_partitions_identically(arch, tmp_path, tiny_dirs, partitioned):
    multi = tmp_path / "multi"
    make_tiny_model(multi, arch, seed=1, max_shard_size="40KB")
    assert (multi / "model.safetensors.index.json").is_file()
    assert len(list(multi.glob("*.safetensors"))) > 2
    src_single, src_multi = load_source(tiny_dirs[arch]), load_source(multi)
    assert src_single.keys() == src_multi.keys()
    assert all(torch.equal(src_single[k], src_multi[k]) for k in src_single)

    tp, pp = 2, 3
    single_out = partitioned(arch, tp, pp)
    multi_out = partition(multi, tp, pp, tmp_path / "out", progress=False)
    single_ranks, multi_ranks = load_ranks(single_out, tp * pp), load_ranks(multi_out, tp * pp)
    for r in range(tp * pp):
        assert single_ranks[r].keys() == multi_ranks[r].keys()
        for k in single_ranks[r]:
            assert torch.equal(single_ranks[r][k], multi_ranks[r][k]), (r, k)
    key = lambda s: (s["rank"], s["name"])  # noqa: E731
    m1 = json.loads((single_out / "manifest.json").read_text())["shards"]
    m2 = json.loads((multi_out / "manifest.json").read_text())["shards"]
    assert {r: sorted(v, key=key) for r, v in m1.items()} == {r: sorted(v, key=key) for r, v in m2.items()}
    reassemble_from_manifest(multi_out, src_multi, multi_ranks)


def test_tokenizer_and_generation_files_copied(tiny_dirs, partitioned):
    out = partitioned("llama", 2, 1)
    assert (tiny_dirs["llama"] / "generation_config.json").is_file()
    assert (out / "generation_config.json").read_bytes() == (tiny_dirs["llama"] / "generation_config.json").read_bytes()


def test_missing_weight_refused_with_checkpoint_error(tmp_path):
    src = tmp_path / "src"
    make_tiny_model(src, "llama")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "nested" / "out"
    with pytest.raises(CheckpointError) as info:
        partition(src, 1, 1, out, progress=False)
    assert "model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert "lacks" in str(info.value)
    assert not (tmp_path / "nested").exists()


def test_no_weights_and_broken_index_refused(tmp_path):
    src = tmp_path / "src"
    make_tiny_model(src, "llama", max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[3].unlink()
    with pytest.raises(CheckpointError, match=shards[3].name):
        partition(src, 1, 1, tmp_path / "out1", progress=False)
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        partition(src, 1, 1, tmp_path / "out2", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        partition(tmp_path / "nope", 1, 1, tmp_path / "out3", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_extra_layer_and_unknown_tensor_refused(tmp_path):
    src = tmp_path / "src"
    make_tiny_model(src, "mistral")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.4.input_layernorm.weight"] = torch.ones(64)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layer 4"):
        partition(src, 1, 1, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ atomic output

def assert_no_leftovers(parent: Path, before: set[str]):
    assert set(p.name for p in parent.iterdir()) == before
    assert not list(parent.glob(".*tmp*"))


@pytest.mark.parametrize("where", ["writer", "source_read", "metadata", "interrupt"])
def test_failure_mid_way_leaves_nothing(where, tmp_path, tiny_dirs, monkeypatch):
    import dist_infer.partition.partitioner as partitioner

    calls = {"n": 0}
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "out"

    def fail_after(original, n, exc):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > n:
                assert list(parent.glob(".out.tmp-*")), "expected to be writing into a temp dir"
                raise exc
            return original(*args, **kwargs)
        return wrapper

    if where == "writer":
        monkeypatch.setattr(StreamingSafetensorsWriter, "write",
                            fail_after(StreamingSafetensorsWriter.write, 10, OSError("No space left on device")))
        expected = OSError
    elif where == "source_read":
        monkeypatch.setattr(SourceCheckpoint, "read", fail_after(SourceCheckpoint.read, 7, OSError("I/O error")))
        expected = OSError
    elif where == "metadata":
        # the third rank file's hashes fail, after every file is closed: the writers are abandoned then
        monkeypatch.setattr(StreamingSafetensorsWriter, "entry",
                            fail_after(StreamingSafetensorsWriter.entry, 2, RuntimeError("boom")))
        expected = RuntimeError
    else:
        monkeypatch.setattr(StreamingSafetensorsWriter, "write",
                            fail_after(StreamingSafetensorsWriter.write, 5, KeyboardInterrupt()))
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        partition(tiny_dirs["llama"], 2, 2, out, progress=False)
    assert calls["n"] > 1
    assert not out.exists()
    assert_no_leftovers(parent, set())


def test_a_failed_close_abandons_every_other_writer(tmp_path, tiny_dirs, monkeypatch):
    """When one rank file fails at close (the disk filled on its last write), the other ranks' writer
    threads end and their files are closed too: none outlives the failed partition."""
    original_close = StreamingSafetensorsWriter.close

    def close_failing_rank0(self):
        if self.path.name == "rank0.safetensors":
            original_close(self)
            raise OSError("No space left on device")
        original_close(self)

    monkeypatch.setattr(StreamingSafetensorsWriter, "close", close_failing_rank0)
    writers = []
    original_init = StreamingSafetensorsWriter.__init__

    def remember(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        writers.append(self)

    monkeypatch.setattr(StreamingSafetensorsWriter, "__init__", remember)
    with pytest.raises(OSError, match="No space left"):
        partition(tiny_dirs["llama"], 2, 2, tmp_path / "out", progress=False)
    assert len(writers) == 4
    assert [w.path.name for w in writers if w._thread.is_alive()] == [], "writer threads still running"
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert [f for f in open_files if f.startswith(str(tmp_path))] == [], "rank files still open"
    assert not (tmp_path / "out").exists()


def test_a_disk_full_when_a_rank_file_is_allocated_abandons_the_writers_made_before(tmp_path, tiny_dirs,
                                                                                      monkeypatch):
    """Rank files are allocated whole when their writers are made, so a full disk shows up there, for a
    later rank after earlier ranks' writers started: those end and close their files, and nothing is left."""
    import errno

    writers, allocations = [], []
    original_init, original_allocate = StreamingSafetensorsWriter.__init__, os.posix_fallocate

    def remember(self, *args, **kwargs):
        writers.append(self)
        original_init(self, *args, **kwargs)

    def third_file_finds_no_space(fd, offset, length):
        allocations.append(fd)
        if len(allocations) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        original_allocate(fd, offset, length)

    from dist_infer.partition import safetensors_stream

    monkeypatch.setattr(StreamingSafetensorsWriter, "__init__", remember)
    monkeypatch.setattr(safetensors_stream, "MAPPED_WRITE_FILESYSTEMS", {safetensors_stream.filesystem_type(tmp_path)})
    monkeypatch.setattr(os, "posix_fallocate", third_file_finds_no_space)
    with pytest.raises(OSError, match="No space left"):
        partition(tiny_dirs["llama"], 2, 2, tmp_path / "out", progress=False)
    assert len(writers) == 3
    assert [w.path.name for w in writers[:2] if w._thread.is_alive()] == [], "writer threads still running"
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert [f for f in open_files if f.startswith(str(tmp_path))] == [], "rank files still open"
    assert_no_leftovers(tmp_path, set())


def test_failure_with_force_keeps_the_old_checkpoint(tmp_path, tiny_dirs, monkeypatch):
    out = tmp_path / "out"
    partition(tiny_dirs["llama"], 1, 1, out, progress=False)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    original = StreamingSafetensorsWriter.write
    count = {"n": 0}

    def failing(self, name, tensor):
        count["n"] += 1
        if count["n"] > 3:
            raise OSError("disk full")
        return original(self, name, tensor)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", failing)
    with pytest.raises(OSError):
        partition(tiny_dirs["llama"], 2, 1, out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert_no_leftovers(tmp_path, {"out"})


@pytest.mark.parametrize("where", ["out_is_source", "out_contains_source"])
def test_force_never_deletes_the_source_checkpoint(where, tmp_path):
    """`--out` equal to `--model` (or a folder holding it) plus `--force` must be refused:
    replacing `out` would delete the user's source checkpoint."""
    models = tmp_path / "models"
    src = models / "llama"
    make_tiny_model(src, "llama")
    sibling = models / "other"
    sibling.mkdir()
    (sibling / "weights.bin").write_bytes(b"precious")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = src if where == "out_is_source" else models
    with pytest.raises(CheckpointError):
        partition(src, 2, 1, out, force=True, progress=False)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "the source checkpoint (or its neighbours) was deleted or changed"


def test_output_appears_only_when_complete(tmp_path, tiny_dirs, monkeypatch):
    out = tmp_path / "out"
    original = StreamingSafetensorsWriter.write
    seen = []

    def spying(self, name, tensor):
        seen.append(out.exists())
        assert self.path.parent != out
        return original(self, name, tensor)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", spying)
    partition(tiny_dirs["llama"], 2, 1, out, progress=False)
    assert seen and not any(seen)
    assert (out / "manifest.json").is_file() and (out / "config.json").is_file()
    assert_no_leftovers(tmp_path, {"out"})


def test_existing_out_refused_without_force_and_replaced_with_force(tmp_path, tiny_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("keep me")
    with pytest.raises(CheckpointError, match="--force"):
        partition(tiny_dirs["mistral"], 2, 1, out, progress=False)
    assert (out / "marker").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["marker"]

    proc = run_cli("partition", "--model", str(tiny_dirs["mistral"]), "--tp", "2", "--out", str(out), "--quiet")
    assert proc.returncode != 0
    assert "already exists" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["marker"]

    partition(tiny_dirs["mistral"], 2, 1, out, force=True, progress=False)
    assert not (out / "marker").exists()
    assert PartitionedCheckpoint(out).mapping == Mapping(2, 1)
    assert_no_leftovers(tmp_path, {"out"})


def test_tampered_rank_file_detected(tmp_path, tiny_dirs):
    out = partition(tiny_dirs["llama"], 2, 1, tmp_path / "out", progress=False)
    ckpt = PartitionedCheckpoint(out)
    path = out / "rank1.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    ckpt.load_rank(0)
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_rank(1)
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(CheckpointError, match="bytes"):
        ckpt.load_rank(1)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("file, edit, match", [
    ("config.json", lambda d: d["model"].update(num_heads="8"), r"field model\.num_heads must be int, got '8'"),
    ("config.json", lambda d: d["model"].update(rms_norm_eps=None), r"model\.rms_norm_eps must be float"),
    ("config.json", lambda d: d["mapping"].update(pp=True), r"field mapping\.pp must be int"),
    ("config.json", lambda d: d.update(format_version="1"), r"format_version must be int"),
    ("config.json", lambda d: d.pop("model"), r"lacks the field 'model'"),
    ("config.json", lambda d: d["model"].update(bos_token_id=None), None),  # optional: null is fine
    ("manifest.json", None, r"manifest\.json is not valid JSON"),
], ids=["heads-str", "eps-null", "pp-bool", "version-str", "no-model", "bos-null-ok", "manifest-not-json"])
def test_damaged_checkpoint_json_is_a_checkpoint_error(tmp_path, partitioned, file, edit, match):
    """A hand-edited or truncated checkpoint file gives a CheckpointError naming the
    field and the fix, not a TypeError from deep inside the config classes."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(partitioned("llama", 1, 1), ckpt)
    if edit is None:
        (ckpt / file).write_text('{"files": ')
    else:
        _edit_json(ckpt / file, edit)
    if match is None:
        PartitionedCheckpoint(ckpt)
        return
    with pytest.raises(CheckpointError, match=match) as info:
        PartitionedCheckpoint(ckpt)
    assert "Partition the model again" in str(info.value)


def test_file_named_gguf_must_start_with_the_magic(tmp_path, monkeypatch):
    from dist_infer.partition.sources import import_gguf

    monkeypatch.setenv("DIST_INFER_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGU")  # shorter than the magic
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        import_gguf(fake)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ refusals before any output

@pytest.fixture(scope="module")
def smol_like_dir(tmp_path_factory):
    """SmolLM2's head layout (9 heads, 3 KV heads) at toy size, 4 layers."""
    d = tmp_path_factory.mktemp("smol_like") / "model"
    make_tiny_model(d, "llama", num_attention_heads=9, num_key_value_heads=3, hidden_size=72,
                    intermediate_size=96, tie_word_embeddings=True)
    return d


@pytest.mark.parametrize("case", ["heads_not_divisible", "pp_more_than_layers", "smollm2_tp2"])
def test_bad_layout_refused_by_cli_before_output(case, tmp_path, tiny_dirs, smol_like_dir):
    model, tp, pp, needles = {
        "heads_not_divisible": (tiny_dirs["llama"], 3, 1, ["tp=3 does not divide the 8 attention heads",
                                                           "Valid TP sizes for this model: 1, 2, 4, 8"]),
        "pp_more_than_layers": (tiny_dirs["llama"], 1, 5, ["pp=5 is more pipeline stages than the model's 4 layers"]),
        "smollm2_tp2": (smol_like_dir, 2, 1, ["Valid TP sizes for this model: 1, 3", "--tp 1 --pp 2"]),
    }[case]
    out = tmp_path / "a" / "b" / "out"
    proc = run_cli("partition", "--model", str(model), "--tp", str(tp), "--pp", str(pp), "--out", str(out), "--quiet")
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected failure" not in proc.stderr
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tp,pp", [(3, 1), (16, 1), (2, 5), (0, 1)])
def test_bad_layout_refused_by_api_before_output(tp, pp, tmp_path, tiny_dirs):
    with pytest.raises(LayoutError):
        partition(tiny_dirs["llama"], tp, pp, tmp_path / "x" / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_partition_success(tmp_path, tiny_dirs):
    out = tmp_path / "ckpt"
    proc = run_cli("partition", "--model", str(tiny_dirs["qwen2"]), "--tp", "2", "--pp", "2", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    ckpt = PartitionedCheckpoint(out)
    assert ckpt.mapping == Mapping(2, 2)
    reassemble_from_manifest(out, load_source(tiny_dirs["qwen2"]), load_ranks(out, 4))


# ------------------------------------------------------------------ bounded memory

BIG = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4,
           num_hidden_layers=7, vocab_size=4096)


def write_big_checkpoint(directory: Path) -> tuple[int, int]:
    """A random Llama-shaped float32 checkpoint (~440 MB, largest tensor 16 MB),
    one file per layer, written without ever holding more than one layer."""
    from transformers import LlamaConfig

    directory.mkdir(parents=True)
    LlamaConfig(**BIG, max_position_embeddings=512, tie_word_embeddings=False).save_pretrained(directory)
    h, i, v = BIG["hidden_size"], BIG["intermediate_size"], BIG["vocab_size"]
    kv = h // BIG["num_attention_heads"] * BIG["num_key_value_heads"]
    gen = torch.Generator().manual_seed(0)
    weight_map, total, largest = {}, 0, 0

    def save(fname, tensors):
        nonlocal total, largest
        save_file(tensors, directory / fname, metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())

    save("model-embed.safetensors", {"model.embed_tokens.weight": torch.randn(v, h, generator=gen),
                                     "lm_head.weight": torch.randn(v, h, generator=gen),
                                     "model.norm.weight": torch.rand(h, generator=gen)})
    for layer in range(BIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
                  "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
                  "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
                  "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        save(f"model-layer{layer}.safetensors", {p + k: torch.randn(*s, generator=gen) for k, s in shapes.items()})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total, largest


PEAK_RSS_WRAPPER = textwrap.dedent("""
    import json, resource, subprocess, sys
    proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr[-3000:],
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")

BASELINE = ("import dist_infer.cli, dist_infer.log, dist_infer.partition, dist_infer.partition.partitioner, tqdm; "
            "from dist_infer.config import ModelConfig; from dist_infer.partition.sources import open_source; "
            "ModelConfig.from_hf(open_source(sys.argv[1]).hf_config())")
FULL_LOAD = BASELINE + "; from safetensors.torch import load_file; import pathlib; " \
    "state = [{k: v.clone() for k, v in load_file(f).items()} for f in sorted(pathlib.Path(sys.argv[1]).glob('*.safetensors'))]"


def child_peak_rss(cmd: list[str]) -> int:
    """Peak RSS in bytes of `cmd`, run as the only child of a fresh wrapper process."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *cmd], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, report["stderr"]
    return report["maxrss_kb"] * 1024


def test_partition_peak_rss_is_bounded(tmp_path):
    src = tmp_path / "big"
    total, largest = write_big_checkpoint(src)
    assert total > 20 * largest and largest <= 16 * 2**20
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "dist_infer", "--log-level", "WARNING", "partition", "--model", str(src),
           "--tp", "2", "--pp", "2", "--out", str(out), "--quiet"]
    baseline = child_peak_rss([sys.executable, "-c", "import sys; " + BASELINE, str(src)])
    peak = child_peak_rss(cli)
    # control: the same measurement sees a process that loads the whole model
    full = child_peak_rss([sys.executable, "-c", "import sys; " + FULL_LOAD, str(src)])

    # the partition really ran and wrote the whole model
    manifest = json.loads((out / "manifest.json").read_text())
    written = sum(e["size"] for e in manifest["files"].values())
    assert written >= total
    with safe_open(out / "rank3.safetensors", "pt") as f:
        down = f.get_tensor("model.layers.6.mlp.down_proj.weight")
    with safe_open(src / "model-layer6.safetensors", "pt") as f:
        assert torch.equal(down, f.get_tensor("model.layers.6.mlp.down_proj.weight")[:, 2048:])

    delta, full_delta = peak - baseline, full - baseline
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    numbers = {"model_bytes": total, "largest_tensor_bytes": largest, "layout": "tp=2 pp=2",
               "baseline_peak_rss_bytes": baseline, "partition_peak_rss_bytes": peak,
               "partition_minus_baseline_bytes": delta, "full_load_minus_baseline_bytes": full_delta,
               "delta_over_model": round(delta / total, 4), "delta_over_largest_tensor": round(delta / largest, 2)}
    print(f"\n[peak RSS] model {mib(total)} MiB (largest tensor {mib(largest)} MiB); "
          f"import-only baseline {mib(baseline)} MiB; partition tp=2 pp=2 peak {mib(peak)} MiB "
          f"(+{mib(delta)} MiB = {delta / total:.1%} of the model, {delta / largest:.2f}x the largest tensor); "
          f"control full load +{mib(full_delta)} MiB")
    report_dir = os.environ.get("DIST_INFER_TEST_REPORT")
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "partition_peak_rss.json").write_text(json.dumps(numbers, indent=1) + "\n")
    assert full_delta > 0.8 * total, "the RSS measurement does not see memory use; the test would prove nothing"
    assert delta < 0.25 * total, numbers
