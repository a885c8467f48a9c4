"""The Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v bias). RMSNorm, SiLU-gated MLP, RoPE
over the two halves of each head, separate q/k/v and gate/up projections (the build fuses them).
HF weights are [out, in]."""

from __future__ import annotations

import torch

from dist_infer.config import ModelConfig
from dist_infer.engine.layers import GatedMLP, PreNormDecoderLayer
from dist_infer.errors import CheckpointError
from dist_infer.models.base import (COLUMN, EMBED, IGNORE, KV_COLUMN, LAST, LM_HEAD, REPLICATE, ROW, Family,
                                    WeightRule)

# RoPE variants whose frequencies do not depend on the sequence length, so they
# can be computed once at partition time.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER = r"model\.layers\.(?P<layer>\d+)\."
# A linear's tensors: dense `weight`, or a pre-quantized checkpoint's engine-form `qweight`,
# `scales`, `offsets` (partition/prequantized.py), and `bias`.
PARAM = r"(?P<param>weight|qweight|scales|offsets|bias)"
LLAMA_RULES = (
    WeightRule(LAYER + r"self_attn\.q_proj\." + PARAM, COLUMN),
    WeightRule(LAYER + r"self_attn\.[kv]_proj\." + PARAM, KV_COLUMN),
    WeightRule(LAYER + r"mlp\.(gate|up)_proj\." + PARAM, COLUMN),
    WeightRule(LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\." + PARAM, ROW),
    WeightRule(LAYER + r"(input|post_attention)_layernorm\.weight", REPLICATE),
    WeightRule(r"model\.embed_tokens\.weight", EMBED),
    WeightRule(r"lm_head\.weight", LM_HEAD),
    WeightRule(r"model\.norm\.weight", LAST),
    WeightRule(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)", IGNORE),
)
LAYER_WEIGHTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
# Engine module inside layers.N -> the checkpoint modules concatenated (dim 0) into it.
LAYER_SOURCES = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
    "input_norm": ("input_layernorm",),
    "post_attention_norm": ("post_attention_layernorm",),
}
TOP_SOURCES = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def config_from_hf(hf_config, architecture: str | None = None) -> ModelConfig:
    """Llama, Mistral or Qwen2 (`architecture` names a family mapped onto this path, e.g. baichuan)."""
    arch = architecture or hf_config.model_type
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise CheckpointError(f"activation {hf_config.hidden_act!r} is not supported (only silu).")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    inv_freq, attention_scaling = rope_frequencies(hf_config)
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four.
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=attention_bias and arch != "qwen2",
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        rope_inv_freq=tuple(inv_freq.tolist()),
        rope_attention_scaling=float(attention_scaling),
        sliding_window=sliding_window(hf_config),
        bos_token_id=hf_config.bos_token_id,
        eos_token_ids=eos_token_ids(hf_config),
    )


def eos_token_ids(hf_config) -> tuple[int, ...]:
    eos = getattr(hf_config, "eos_token_id", None)
    return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def rope_frequencies(hf_config):
    """RoPE inverse frequencies exactly as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise CheckpointError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}.")
    if rope_type == "default":
        base = params.get("rope_theta", 10000.0)
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config)


def sliding_window(hf_config) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if window is None or (hf_config.model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False)):
        return None
    layer_types = getattr(hf_config, "layer_types", None) or []
    if layer_types and len(set(layer_types)) > 1:
        raise CheckpointError("models that mix sliding-window and full-attention layers are not supported yet.")
    if layer_types and layer_types[0] == "full_attention":
        return None
    return int(window)


def required_weights(model: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not model.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(model.num_layers):
        names.update(f"model.layers.{i}.{w}" for w in LAYER_WEIGHTS)
        if model.qkv_bias:
            names.update(f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv")
    return names


class LlamaDecoderLayer(PreNormDecoderLayer):
    mlp_block = GatedMLP


FAMILY = Family(
    name="llama",
    config_from_hf=config_from_hf,
    weight_rules=LLAMA_RULES,
    required_weights=required_weights,
    layer_prefix="model.layers.{layer}.",
    layer_sources=LAYER_SOURCES,
    top_sources=TOP_SOURCES,
    decoder_layer=LlamaDecoderLayer,
    quantizable_linears=LINEARS,
    fused_linears=FUSED,
)
