"""The model definition API itself: the registry, and the sharding kinds families declare
(fused q/k/v with KV-head replication, Conv1D transposes, NormHead rows)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from dist_infer.config import ModelConfig
from dist_infer.errors import CheckpointError
from dist_infer.models import family_of
from dist_infer.partition.partitioner import shard_shape
from dist_infer.partition.rules import REPLICATED, plan_tensor


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(CheckpointError, match=r"'bert' is not supported; dist_infer runs llama, .*gpt2"):
        family_of("bert")


def test_every_family_reads_its_own_names_only():
    assert family_of("gpt2").rule_for("transformer.h.0.attn.c_attn.weight")[0].transpose
    assert family_of("llama").rule_for("transformer.h.0.attn.c_attn.weight") == (None, None)
    with pytest.raises(CheckpointError, match="unknown layer weight.*gpt2-family"):
        plan_tensor("transformer.h.0.attn.W_pack.weight", (64, 64), _gpt2(), 1, 1)


def _gpt2(**changes) -> ModelConfig:
    import transformers

    cfg = ModelConfig.from_hf(transformers.GPT2Config(vocab_size=301, n_embd=64, n_layer=4, n_head=4, n_positions=64))
    return dataclasses.replace(cfg, **changes)


def test_fused_qkv_split_with_kv_head_replication():
    """Baichuan-style W_pack [q; k; v] ([8*16 + 2*2*16, 128], 2 KV heads) at tp=4: each rank takes
    its quarter of q and the one KV head its query heads use (ranks 0, 1 head 0; ranks 2, 3 head 1)."""
    base = ModelConfig.from_dict({**_gpt2().to_dict(), "architecture": "baichuan", "norm": "rms", "norm_bias": False,
                                  "position_embedding": "rope", "rope_inv_freq": [1.0] * 8, "hidden_size": 128,
                                  "num_heads": 8, "num_kv_heads": 2, "head_dim": 16, "gated_mlp": True})
    shards = plan_tensor("model.layers.1.self_attn.W_pack.weight", (192, 128), base, 4, 1)
    by_rank = {(s.rank, s.name.split(".")[-2]): (s.dim, s.start, s.stop) for s in shards}
    for r in range(4):
        assert by_rank[(r, "q_proj")] == (0, 32 * r, 32 * (r + 1))
        assert by_rank[(r, "k_proj")] == (0, 128 + 16 * (r // 2), 128 + 16 * (r // 2 + 1))
        assert by_rank[(r, "v_proj")] == (0, 160 + 16 * (r // 2), 160 + 16 * (r // 2 + 1))


def test_conv1d_shards_are_cut_along_the_source_and_transposed():
    m = _gpt2()
    q = [s for s in plan_tensor("transformer.h.0.attn.c_attn.weight", (64, 192), m, 2, 1) if "q_proj" in s.name]
    assert [(s.rank, s.dim, s.start, s.stop, s.transform) for s in q] == [(0, 1, 0, 32, "transpose"),
                                                                         (1, 1, 32, 64, "transpose")]
    assert shard_shape(q[1], (64, 192)) == (32, 64)  # [out/tp, in]
    row = plan_tensor("transformer.h.0.mlp.c_proj.weight", (256, 64), m, 2, 1)
    assert [(s.dim, s.start, s.stop) for s in row] == [(0, 0, 128), (0, 128, 256)]  # inputs are the rows
    assert shard_shape(row[0], (256, 64)) == (64, 128)
    bias = plan_tensor("transformer.h.0.mlp.c_proj.bias", (64,), m, 2, 1)
    assert all(s.dim == REPLICATED and s.transform == "" for s in bias)


def test_normhead_rows_and_tied_head_names():
    head = plan_tensor("lm_head.weight", (301, 64), ModelConfig.from_dict({**_gpt2().to_dict(),
                       "architecture": "baichuan", "tie_word_embeddings": False}), 2, 1)
    assert {s.transform for s in head} == {"normalize_rows"}
    tied = plan_tensor("transformer.wte.weight", (301, 64), _gpt2(), 1, 2)
    assert [(s.rank, s.name) for s in tied] == [(0, "transformer.wte.weight"), (1, "lm_head.weight")]


def test_families_from_the_environment(tmp_path):
    """DIST_INFER_MODELS adds a family in every process (mpirun ranks inherit it)."""
    (tmp_path / "fam.py").write_text("from dist_infer.models.gpt2 import FAMILY\n")
    code = "from dist_infer.models import family_of; print(family_of('mygpt').name)"
    env = {**os.environ, "DIST_INFER_MODELS": "mygpt=fam", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "gpt2", proc.stderr
    env["DIST_INFER_MODELS"] = "mygpt=no_such_module"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "cannot be loaded" in proc.stderr
