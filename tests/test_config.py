"""dist_infer.config: Mapping rank math (exhaustive), ModelConfig from HF configs,
layout checks and BuildConfig validation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import TINY, TINY_COMMON, hf_classes
from dist_infer.config import BuildConfig, Mapping, ModelConfig, check_layout, tp_problems, valid_tp_sizes
from dist_infer.errors import CheckpointError, DistInferError, LayoutError

SIZES = range(1, 9)


# ------------------------------------------------------------------ Mapping

@pytest.mark.parametrize("tp", SIZES)
@pytest.mark.parametrize("pp", SIZES)
def test_mapping_groups_partition_the_world(tp, pp):
    world = tp * pp
    maps = [Mapping(tp, pp, r) for r in range(world)]
    assert all(m.world_size == world for m in maps)

    tp_groups = {tuple(m.tp_group_ranks) for m in maps}
    pp_groups = {tuple(m.pp_group_ranks) for m in maps}
    assert len(tp_groups) == pp and all(len(g) == tp for g in tp_groups)
    assert len(pp_groups) == tp and all(len(g) == pp for g in pp_groups)
    for groups in (tp_groups, pp_groups):
        members = [r for g in groups for r in g]
        # every rank in exactly one group, and the groups cover the world
        assert sorted(members) == list(range(world))

    for m in maps:
        r = m.rank
        # TP innermost (the documented convention)
        assert m.tp_rank == r % tp and m.pp_rank == r // tp
        assert 0 <= m.tp_rank < tp and 0 <= m.pp_rank < pp
        # a rank sits in its own groups, at its own group rank
        assert m.tp_group_ranks[m.tp_rank] == r
        assert m.pp_group_ranks[m.pp_rank] == r
        # the groups are consistent across their members
        for other in m.tp_group_ranks:
            o = maps[other]
            assert o.tp_group_ranks == m.tp_group_ranks and o.pp_rank == m.pp_rank
        for other in m.pp_group_ranks:
            o = maps[other]
            assert o.pp_group_ranks == m.pp_group_ranks and o.tp_rank == m.tp_rank
        # a TP group and a PP group meet in exactly this rank
        assert set(m.tp_group_ranks) & set(m.pp_group_ranks) == {r}
        # the pp group lists the stages in order
        assert [maps[x].pp_rank for x in m.pp_group_ranks] == list(range(pp))
        assert [maps[x].tp_rank for x in m.tp_group_ranks] == list(range(tp))

        assert m.is_first_stage == (m.pp_rank == 0)
        assert m.is_last_stage == (m.pp_rank == pp - 1)
        if m.is_first_stage:
            assert m.prev_stage_rank is None
        else:
            prev = maps[m.prev_stage_rank]
            assert prev.pp_rank == m.pp_rank - 1 and prev.tp_rank == m.tp_rank
            assert prev.next_stage_rank == r
        if m.is_last_stage:
            assert m.next_stage_rank is None
        else:
            nxt = maps[m.next_stage_rank]
            assert nxt.pp_rank == m.pp_rank + 1 and nxt.tp_rank == m.tp_rank
            assert nxt.prev_stage_rank == r

        sampler = maps[m.sampler_rank]
        assert sampler.is_last_stage and sampler.tp_rank == 0
        assert m.sampler_rank == maps[0].sampler_rank

        assert m.with_rank(0) == maps[0] and m.with_rank(world - 1) == maps[-1]
        # dict round trip, also through JSON (what config.json stores)
        d = m.to_dict()
        assert d == {"tp": tp, "pp": pp}
        assert Mapping.from_dict(d, rank=r) == m
        assert Mapping.from_dict(json.loads(json.dumps(d)), rank=r) == m
    assert Mapping.from_dict(maps[-1].to_dict()) == maps[0]  # rank defaults to 0


@pytest.mark.parametrize("pp", SIZES)
def test_stage_layers_contiguous_balanced_covering(pp):
    for num_layers in [*range(pp, 4 * pp + 3), 30, 32, 80, 126]:
        ranges = [Mapping(1, pp).stage_layers(num_layers, s) for s in range(pp)]
        assert ranges[0].start == 0 and ranges[-1].stop == num_layers
        for a, b in zip(ranges, ranges[1:]):
            assert a.stop == b.start  # contiguous, no gap, no overlap
        sizes = [len(r) for r in ranges]
        assert all(r.step == 1 for r in ranges)
        assert sum(sizes) == num_layers and min(sizes) >= 1
        assert max(sizes) - min(sizes) <= 1  # balanced
        assert sizes == sorted(sizes, reverse=True)  # the first stages take the extra layers
        assert list(range(num_layers)) == [i for r in ranges for i in r]
        # stage=None means "this rank's stage", for every rank of a tp x pp grid
        for tp in (1, 3):
            for rank in range(tp * pp):
                m = Mapping(tp, pp, rank)
                assert m.stage_layers(num_layers) == ranges[m.pp_rank]


def test_stage_layers_examples():
    assert [list(Mapping(1, 3).stage_layers(4, s)) for s in range(3)] == [[0, 1], [2], [3]]
    assert [len(Mapping(1, 4).stage_layers(30, s)) for s in range(4)] == [8, 8, 7, 7]


@pytest.mark.parametrize("kwargs", [dict(tp=0), dict(pp=0), dict(tp=-2), dict(tp=2, pp=2, rank=4),
                                    dict(rank=-1), dict(tp="2"), dict(pp=1.0)])
def test_mapping_rejects_bad_values(kwargs):
    with pytest.raises(LayoutError):
        Mapping(**kwargs)


# ------------------------------------------------------------------ ModelConfig.from_hf

def tiny_hf_config(arch, **overrides):
    config_cls, _ = hf_classes(arch)
    return config_cls(**{**TINY_COMMON, **TINY[arch], **overrides})


def rotary_inv_freq(arch, config):
    module = {"llama": transformers.models.llama.modeling_llama,
              "mistral": transformers.models.mistral.modeling_mistral,
              "qwen2": transformers.models.qwen2.modeling_qwen2}[arch]
    cls = {"llama": "LlamaRotaryEmbedding", "mistral": "MistralRotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding"}[arch]
    rotary = getattr(module, cls)(config)
    return rotary.inv_freq, rotary.attention_scaling


def assert_rope_matches_transformers(arch, hf_config, cfg):
    inv_freq, scaling = rotary_inv_freq(arch, hf_config)
    ours = torch.tensor(cfg.rope_inv_freq, dtype=inv_freq.dtype)
    assert ours.shape == inv_freq.shape
    assert torch.equal(ours, inv_freq), (ours, inv_freq)
    assert cfg.rope_attention_scaling == pytest.approx(float(scaling), rel=0, abs=0)
    # and still exact after the JSON round trip config.json does
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert torch.equal(torch.tensor(back.rope_inv_freq, dtype=inv_freq.dtype), inv_freq)


def test_from_hf_llama_with_llama3_rope_tiny():
    hf = tiny_hf_config("llama")
    cfg = ModelConfig.from_hf(hf)
    assert cfg.architecture == "llama"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (8, 2, 8)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (301, 64, 128, 4)
    assert cfg.max_position_embeddings == 256 and cfg.tie_word_embeddings is False
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (False, False, False)
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert_rope_matches_transformers("llama", hf, cfg)


LLAMA31_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                  num_hidden_layers=32, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                  bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=False)


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
], ids=["default", "linear", "llama3", "yarn"])
def test_from_hf_llama31_shape_rope_variants(rope_scaling):
    kwargs = dict(LLAMA31_8B)
    if rope_scaling:
        kwargs["rope_scaling"] = rope_scaling
    hf = transformers.LlamaConfig(**kwargs)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.head_dim == 128 and len(cfg.rope_inv_freq) == 64
    assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
    assert_rope_matches_transformers("llama", hf, cfg)
    default = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))
    if rope_scaling is None:
        assert torch.equal(torch.tensor(cfg.rope_inv_freq, dtype=torch.float32), default)
    else:  # the scaling really changed the frequencies
        assert not torch.equal(torch.tensor(cfg.rope_inv_freq, dtype=torch.float32), default)
    if rope_scaling and rope_scaling["rope_type"] == "yarn":
        assert cfg.rope_attention_scaling > 1.0


def test_from_hf_mistral():
    hf = tiny_hf_config("mistral")
    cfg = ModelConfig.from_hf(hf)
    assert cfg.architecture == "mistral"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (8, 4, 8)
    assert cfg.sliding_window == 4096
    assert (cfg.qkv_bias, cfg.o_bias) == (False, False)
    assert cfg.tie_word_embeddings is False
    assert_rope_matches_transformers("mistral", hf, cfg)


def test_from_hf_qwen2_biases():
    hf = tiny_hf_config("qwen2")
    cfg = ModelConfig.from_hf(hf)
    assert cfg.architecture == "qwen2"
    assert cfg.qkv_bias is True and cfg.o_bias is False and cfg.mlp_bias is False
    assert cfg.tie_word_embeddings is True
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 16)
    assert cfg.sliding_window is None  # use_sliding_window is off by default
    assert_rope_matches_transformers("qwen2", hf, cfg)


def test_from_hf_llama_attention_bias_covers_o_proj():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", attention_bias=True))
    assert cfg.qkv_bias is True and cfg.o_bias is True


def test_from_hf_explicit_head_dim():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", head_dim=32, rope_scaling=None))
    assert cfg.head_dim == 32 and len(cfg.rope_inv_freq) == 16
    assert cfg.q_size == 8 * 32 and cfg.kv_size == 2 * 32


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_num_params_matches_transformers(arch):
    _, model_cls = hf_classes(arch)
    hf = tiny_hf_config(arch)
    model = model_cls(hf)
    assert ModelConfig.from_hf(hf).num_params() == sum(p.numel() for p in model.parameters())


def test_from_hf_refuses_unsupported():
    with pytest.raises(CheckpointError, match="not supported"):
        ModelConfig.from_hf(transformers.BertConfig())  # GPT-2 became a family (dist_infer/models/gpt2.py)
    with pytest.raises(CheckpointError, match="activation"):
        ModelConfig.from_hf(tiny_hf_config("llama", hidden_act="gelu"))
    with pytest.raises(CheckpointError, match="RoPE type"):
        ModelConfig.from_hf(tiny_hf_config("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_model_config_round_trip(arch):
    cfg = ModelConfig.from_hf(tiny_hf_config(arch, eos_token_id=[3, 7], bos_token_id=1))
    assert cfg.eos_token_ids == (3, 7)
    d = cfg.to_dict()
    assert isinstance(d["rope_inv_freq"], list) and isinstance(d["eos_token_ids"], list)
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(CheckpointError, match="unknown fields"):
        ModelConfig.from_dict({**d, "new_field": 1})


def test_model_config_validates_itself():
    base = ModelConfig.from_hf(tiny_hf_config("llama")).to_dict()
    with pytest.raises(CheckpointError):
        ModelConfig.from_dict({**base, "architecture": "bert"})
    for field, bad in (("norm", "batch"), ("activation", "relu"), ("position_embedding", "alibi"), ("rotary_dim", 3)):
        with pytest.raises(CheckpointError, match=field):
            ModelConfig.from_dict({**base, field: bad})
    with pytest.raises(CheckpointError):
        ModelConfig.from_dict({**base, "num_kv_heads": 3})  # 8 heads not a multiple of 3
    with pytest.raises(CheckpointError):
        ModelConfig.from_dict({**base, "rope_inv_freq": [1.0]})


# ------------------------------------------------------------------ check_layout

def smollm2_like() -> ModelConfig:
    """SmolLM2-135M's shape: 9 heads, 3 KV heads, MLP 1536, 30 layers."""
    hf = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                  tie_word_embeddings=True, rope_theta=100000.0)
    return ModelConfig.from_hf(hf)


def test_smollm2_tp2_refused_with_valid_sizes_and_pp_hint():
    model = smollm2_like()
    assert valid_tp_sizes(model) == [1, 3]
    with pytest.raises(LayoutError) as info:
        check_layout(model, 2, 1)
    message = str(info.value)
    assert "Valid TP sizes for this model: 1, 3" in message
    assert "--tp 1 --pp 2" in message
    assert "9 attention heads" in message
    assert isinstance(info.value, DistInferError)


def test_smollm2_alternatives_for_larger_worlds():
    model = smollm2_like()
    with pytest.raises(LayoutError) as info:
        check_layout(model, 2, 3)  # 6 GPUs
    assert "--tp 1 --pp 6" in str(info.value) and "--tp 3 --pp 2" in str(info.value)
    with pytest.raises(LayoutError) as info:
        check_layout(model, 5, 7)  # 35 GPUs: no valid layout at all
    assert "--tp" not in str(info.value)


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 30), (3, 10), (1, 2)])
def test_smollm2_valid_layouts_accepted(tp, pp):
    check_layout(smollm2_like(), tp, pp)


def test_pp_more_than_layers_refused():
    model = smollm2_like()
    check_layout(model, 1, 30)
    with pytest.raises(LayoutError, match="pp=31"):
        check_layout(model, 1, 31)
    tiny = ModelConfig.from_hf(tiny_hf_config("llama"))
    with pytest.raises(LayoutError, match="4 layers"):
        check_layout(tiny, 2, 5)


def test_tp_problems_kv_heads_and_mlp():
    tiny = ModelConfig.from_hf(tiny_hf_config("llama"))  # 8 heads, 2 KV heads, MLP 128
    assert valid_tp_sizes(tiny) == [1, 2, 4, 8]
    assert tp_problems(tiny, 4) == []  # KV replication
    assert tp_problems(tiny, 8) == []
    gqa6 = ModelConfig.from_hf(tiny_hf_config("llama", num_attention_heads=12, num_key_value_heads=6,
                                              hidden_size=96, rope_scaling=None))
    problems = tp_problems(gqa6, 4)  # 12 % 4 == 0 but 6 KV heads neither split nor replicate over 4
    assert len(problems) == 1 and "6 KV heads" in problems[0]
    with pytest.raises(LayoutError, match="KV heads"):
        check_layout(gqa6, 4, 1)
    mlp = ModelConfig.from_hf(tiny_hf_config("llama", intermediate_size=100))
    assert any("MLP size 100" in p for p in tp_problems(mlp, 8))
    with pytest.raises(LayoutError, match="MLP"):
        check_layout(mlp, 8, 1)
    with pytest.raises(LayoutError):
        check_layout(tiny, 0, 1)


# ------------------------------------------------------------------ BuildConfig

def test_build_config_defaults_and_round_trip():
    b = BuildConfig()
    assert (b.dtype, b.max_batch_size, b.max_seq_len, b.kv_block_size) == ("float32", 8, None, 16)
    b2 = BuildConfig(dtype="bfloat16", max_batch_size=4, max_seq_len=128, kv_block_size=32)
    assert BuildConfig.from_dict(json.loads(json.dumps(b2.to_dict()))) == b2
    with pytest.raises(CheckpointError, match="unknown fields"):
        BuildConfig.from_dict({**b2.to_dict(), "a_future_option": 1})
    q = BuildConfig(quant="int4_wo", quant_group_size=64, quant_lm_head=True)
    assert BuildConfig.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    # engine.json written before quantization existed loads as unquantized.
    old = {k: v for k, v in b2.to_dict().items() if not k.startswith("quant")}
    assert BuildConfig.from_dict(old).quant is None


@pytest.mark.parametrize("kwargs", [dict(dtype="int8"), dict(dtype="fp32"), dict(max_batch_size=0),
                                    dict(max_batch_size=-1), dict(max_batch_size=2.5), dict(max_batch_size="8"),
                                    dict(max_seq_len=0), dict(max_seq_len=-16), dict(kv_block_size=0),
                                    dict(kv_block_size=None)])
def test_build_config_rejects(kwargs):
    with pytest.raises(LayoutError):
        BuildConfig(**kwargs)


def test_build_config_resolved():
    tiny = ModelConfig.from_hf(tiny_hf_config("llama"))  # max_position_embeddings 256
    assert BuildConfig().resolved(tiny).max_seq_len == 256
    assert BuildConfig(max_seq_len=100).resolved(tiny).max_seq_len == 100
    assert BuildConfig(max_seq_len=256).resolved(tiny).max_seq_len == 256
    with pytest.raises(LayoutError, match="max_position_embeddings"):
        BuildConfig(max_seq_len=257).resolved(tiny)
    big = ModelConfig.from_hf(transformers.LlamaConfig(**{**LLAMA31_8B, "num_hidden_layers": 1}))
    assert BuildConfig().resolved(big).max_seq_len == BuildConfig.DEFAULT_MAX_SEQ_LEN == 4096
    assert BuildConfig(dtype="float16").resolved(big).dtype == "float16"
