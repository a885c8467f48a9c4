"""Sharding rules (dist_infer.partition.rules) checked against what attention,
the MLP and the vocabulary split need, independently of the partitioner."""

from __future__ import annotations

import itertools

import pytest
import transformers

from conftest import TINY, TINY_COMMON, hf_classes
from dist_infer.config import Mapping, ModelConfig, tp_problems
from dist_infer.errors import CheckpointError
from dist_infer.partition.rules import REPLICATED, kv_head_range, padded_vocab, plan_tensor


def tiny(arch, **overrides) -> ModelConfig:
    config_cls, _ = hf_classes(arch)
    return ModelConfig.from_hf(config_cls(**{**TINY_COMMON, **TINY[arch], **overrides}))


def model_with_heads(heads: int, kv: int) -> ModelConfig:
    hf = transformers.LlamaConfig(vocab_size=97, hidden_size=heads * 4, intermediate_size=5040, num_hidden_layers=2,
                                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    return ModelConfig.from_hf(hf)


HEAD_SHAPES = [(8, 2), (8, 4), (8, 8), (4, 1), (9, 3), (12, 4), (16, 2), (32, 8), (6, 6), (2, 1)]


@pytest.mark.parametrize("heads,kv", HEAD_SHAPES)
def test_kv_head_range_serves_the_rank_query_heads(heads, kv):
    """Under GQA, query head q attends with KV head q // (heads / kv). Each TP
    rank must hold exactly the KV heads its own query heads need."""
    model = model_with_heads(heads, kv)
    group = heads // kv
    checked = 0
    for tp in range(1, 17):
        if tp_problems(model, tp):
            continue
        checked += 1
        q_per_rank = heads // tp
        held = []
        for t in range(tp):
            q_heads = range(t * q_per_rank, (t + 1) * q_per_rank)
            needed = sorted({q // group for q in q_heads})
            got = kv_head_range(model, tp, t)
            assert list(got) == needed, (tp, t)
            held.append(list(got))
        if tp <= kv:  # split: every KV head on exactly one rank
            assert sorted(h for hs in held for h in hs) == list(range(kv))
        else:  # replicated: every KV head on tp / kv ranks, one head per rank
            assert all(len(hs) == 1 for hs in held)
            assert sorted(hs[0] for hs in held) == sorted(list(range(kv)) * (tp // kv))
    assert checked >= 2


def test_padded_vocab():
    m = tiny("llama")  # vocab 301
    assert [padded_vocab(m, t) for t in (1, 2, 3, 4, 8)] == [301, 302, 303, 304, 304]


def shards_by_rank(shards):
    out = {}
    for s in shards:
        assert s.rank not in out, f"two shards of one tensor for rank {s.rank}"
        out[s.rank] = s
    return out


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("pp", [1, 2])
def test_embedding_vocab_split_with_padding(tp, pp):
    m = tiny("llama")
    per_rank = padded_vocab(m, tp) // tp
    shards = shards_by_rank(plan_tensor("model.embed_tokens.weight", (301, 64), m, tp, pp))
    assert sorted(shards) == list(range(tp))  # first stage only
    covered = []
    for t in range(tp):
        s = shards[t]
        assert (s.dim, s.name, s.source, s.length) == (0, "model.embed_tokens.weight", "model.embed_tokens.weight", per_rank)
        assert s.start == t * per_rank and s.stop == min((t + 1) * per_rank, 301)
        covered.extend(range(s.start, s.stop))
    assert covered == list(range(301))
    lm = shards_by_rank(plan_tensor("lm_head.weight", (301, 64), m, tp, pp))
    last = [(pp - 1) * tp + t for t in range(tp)]
    assert sorted(lm) == last
    assert [(lm[r].start, lm[r].stop, lm[r].length) for r in last] == \
           [(shards[t].start, shards[t].stop, shards[t].length) for t in range(tp)]


def test_vocab_smaller_than_tp_gives_empty_padded_shards():
    m = tiny("llama", vocab_size=5)
    shards = shards_by_rank(plan_tensor("model.embed_tokens.weight", (5, 64), m, 8, 1))
    assert [(s.start, s.stop, s.length) for s in shards.values()] == \
           [(0, 1, 1), (1, 2, 1), (2, 3, 1), (3, 4, 1), (4, 5, 1), (5, 5, 1), (6, 6, 1), (7, 7, 1)]


@pytest.mark.parametrize("pp", [1, 2, 3])
def test_tied_embeddings(pp):
    m = tiny("qwen2")
    assert m.tie_word_embeddings
    tp = 2
    shards = plan_tensor("model.embed_tokens.weight", (301, 64), m, tp, pp)
    embed = [s for s in shards if s.name == "model.embed_tokens.weight"]
    head = [s for s in shards if s.name == "lm_head.weight"]
    assert sorted(s.rank for s in embed) == [0, 1]
    if pp == 1:
        assert head == []  # the single stage reuses its embedding
    else:
        assert sorted(s.rank for s in head) == [(pp - 1) * tp, (pp - 1) * tp + 1]
        assert all(s.source == "model.embed_tokens.weight" for s in head)
    # a tied checkpoint that also stores lm_head: the copy is ignored
    assert plan_tensor("lm_head.weight", (301, 64), m, tp, pp) == []
    assert len(shards) == len(embed) + len(head)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 3), (2, 2)])
def test_final_norm_on_last_stage_replicated(tp, pp):
    m = tiny("llama")
    shards = plan_tensor("model.norm.weight", (64,), m, tp, pp)
    assert sorted(s.rank for s in shards) == [(pp - 1) * tp + t for t in range(tp)]
    assert all(s.dim == REPLICATED and (s.start, s.stop, s.length) == (0, 64, 64) for s in shards)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tp,pp", list(itertools.product([1, 2, 4], [1, 2, 3])))
def test_layer_rules(arch, tp, pp):
    m = tiny(arch)
    hd, q, kv, inter, hidden = m.head_dim, m.q_size, m.kv_size, m.intermediate_size, m.hidden_size
    shapes = {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
              "post_attention_layernorm.weight": (hidden,)}
    if m.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    for layer in range(m.num_layers):
        stage = next(s for s in range(pp) if layer in Mapping(tp, pp).stage_layers(m.num_layers, s))
        for param, shape in shapes.items():
            name = f"model.layers.{layer}.{param}"
            shards = shards_by_rank(plan_tensor(name, shape, m, tp, pp))
            assert sorted(shards) == [stage * tp + t for t in range(tp)], name
            for rank, s in shards.items():
                t = rank % tp
                assert s.name == s.source == name
                assert s.length == s.stop - s.start  # only vocab tensors are padded
                if "layernorm" in param:
                    assert (s.dim, s.start, s.stop) == (REPLICATED, 0, hidden)
                elif param.startswith("self_attn.q_proj"):
                    assert (s.dim, s.start, s.stop) == (0, t * q // tp, (t + 1) * q // tp)
                elif param.startswith(("self_attn.k_proj", "self_attn.v_proj")):
                    heads = kv_head_range(m, tp, t)
                    assert (s.dim, s.start, s.stop) == (0, heads.start * hd, heads.stop * hd)
                elif param.startswith(("mlp.gate_proj", "mlp.up_proj")):
                    assert (s.dim, s.start, s.stop) == (0, t * inter // tp, (t + 1) * inter // tp)
                elif param == "self_attn.o_proj.weight":
                    assert (s.dim, s.start, s.stop) == (1, t * q // tp, (t + 1) * q // tp)
                elif param == "mlp.down_proj.weight":
                    assert (s.dim, s.start, s.stop) == (1, t * inter // tp, (t + 1) * inter // tp)
                else:
                    raise AssertionError(param)


def test_row_parallel_biases_replicated():
    m = tiny("llama", attention_bias=True, mlp_bias=True)
    for name in ("model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.down_proj.bias"):
        shards = plan_tensor(name, (64,), m, 4, 1)
        assert [s.rank for s in shards] == [0, 1, 2, 3]
        assert all(s.dim == REPLICATED for s in shards)


def test_unknown_and_ignored_weights():
    m = tiny("llama")
    assert plan_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", (4,), m, 2, 1) == []
    with pytest.raises(CheckpointError, match="unknown weight"):
        plan_tensor("transformer.wte.weight", (301, 64), m, 1, 1)
    with pytest.raises(CheckpointError, match="unknown layer weight"):
        plan_tensor("model.layers.0.mlp.experts.0.weight", (64, 64), m, 1, 1)
    with pytest.raises(CheckpointError, match="4 layers"):
        plan_tensor("model.layers.4.input_layernorm.weight", (64,), m, 1, 1)
