"""Baichuan2-7B, mapped onto the Llama path at partition time. Its modeling code lives on the
Hub behind trust_remote_code, which dist_infer neither fetches nor runs; only its checkpoint
layout is read: config.json (`model_type: baichuan`, Llama's field names, RoPE base 10000),
`model.layers.N.self_attn.W_pack.weight` = [q; k; v] ([3H, H]), and `lm_head.weight`, a
NormHead whose rows the model normalises to unit length before use. Partition cuts W_pack
into Llama's q/k/v shards and writes the head's rows normalised once; from there on it is
a Llama engine (same stage layer, same build sources)."""

from __future__ import annotations

from transformers import LlamaConfig

from dist_infer.config import ModelConfig
from dist_infer.errors import CheckpointError
from dist_infer.models import llama
from dist_infer.models.base import FUSED_QKV, LM_HEAD, NORMALIZE_ROWS, Family, WeightRule

QKV = tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.{{param}}" for p in "qkv")
RULES = (
    WeightRule(llama.LAYER + r"self_attn\.W_pack\.(?P<param>weight)", FUSED_QKV, outputs=QKV),
    WeightRule(r"lm_head\.weight", LM_HEAD, transform=NORMALIZE_ROWS),
    *(rule for rule in llama.LLAMA_RULES if rule.kind != LM_HEAD),
)
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "rms_norm_eps", "max_position_embeddings", "hidden_act", "tie_word_embeddings", "bos_token_id",
                 "eos_token_id", "pad_token_id")


class BaichuanConfig(LlamaConfig):
    """Baichuan2's config.json read as the Llama config it is (no remote code)."""

    model_type = "baichuan"


def read_config(raw: dict) -> BaichuanConfig:
    if "max_position_embeddings" not in raw:  # Baichuan2-13B: ALiBi position biases, no RoPE
        raise CheckpointError("this Baichuan checkpoint has no max_position_embeddings: it is a 13B model with ALiBi "
                              "attention biases, which dist_infer does not run (Baichuan2-7B, RoPE, is supported).")
    return BaichuanConfig(**{k: raw[k] for k in CONFIG_FIELDS if k in raw})


def config_from_hf(hf_config) -> ModelConfig:
    return llama.config_from_hf(hf_config, architecture="baichuan")


def required_weights(model: ModelConfig) -> set[str]:
    fused = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(model.num_layers) for p in "qkv"}
    packed = {f"model.layers.{i}.self_attn.W_pack.weight" for i in range(model.num_layers)}
    return (llama.required_weights(model) - fused) | packed


FAMILY = Family(name="baichuan", config_from_hf=config_from_hf, weight_rules=RULES, required_weights=required_weights,
                layer_prefix=llama.FAMILY.layer_prefix, layer_sources=llama.LAYER_SOURCES,
                top_sources=llama.TOP_SOURCES, decoder_layer=llama.LlamaDecoderLayer, read_config=read_config)
