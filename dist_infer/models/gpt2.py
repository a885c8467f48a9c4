"""GPT-2: learned positions, LayerNorm with bias, GELU (tanh) MLP, biases everywhere, and
Conv1D weights stored [in, out] with q, k, v fused in one `c_attn`; the head is tied to the
token table. Partition transposes the Conv1D shards and cuts `c_attn` into q, k, v."""

from __future__ import annotations

from dist_infer.config import ModelConfig
from dist_infer.engine.layers import MLP, PreNormDecoderLayer
from dist_infer.errors import CheckpointError
from dist_infer.models.base import (COLUMN, EMBED, FIRST, FUSED_QKV, IGNORE, LAST, LM_HEAD, REPLICATE, ROW, Family,
                                    WeightRule)

LAYER = r"transformer\.h\.(?P<layer>\d+)\."
PARAM = r"(?P<param>weight|bias)"
QKV = tuple(f"transformer.h.{{layer}}.attn.{p}_proj.{{param}}" for p in "qkv")
RULES = (
    WeightRule(LAYER + r"attn\.c_attn\." + PARAM, FUSED_QKV, outputs=QKV, transpose=True),
    WeightRule(LAYER + r"(attn|mlp)\.c_proj\." + PARAM, ROW, transpose=True),
    WeightRule(LAYER + r"mlp\.c_fc\." + PARAM, COLUMN, transpose=True),
    WeightRule(LAYER + r"ln_[12]\." + PARAM, REPLICATE),
    WeightRule(r"transformer\.wte\.weight", EMBED),
    WeightRule(r"transformer\.wpe\.weight", FIRST),
    WeightRule(r"transformer\.ln_f\." + PARAM, LAST),
    WeightRule(r"lm_head\.weight", LM_HEAD),
    WeightRule(r".*\.attn\.(masked_)?bias", IGNORE),
)
LAYER_SOURCES = {
    "input_norm": ("ln_1",),
    "self_attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "self_attn.o_proj": ("attn.c_proj",),
    "post_attention_norm": ("ln_2",),
    "mlp.up_proj": ("mlp.c_fc",),
    "mlp.down_proj": ("mlp.c_proj",),
}
TOP_SOURCES = {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "norm": "transformer.ln_f",
               "lm_head": "lm_head"}
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def activation(hf_config) -> str:
    name = hf_config.activation_function
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(f"activation {name!r} is not supported; one of {', '.join(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def config_from_hf(hf_config) -> ModelConfig:
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf_config, "scale_attn_weights", True):
        raise CheckpointError("GPT-2 attention scaled by layer index (or not scaled) is not supported.")
    hidden, heads = hf_config.n_embd, hf_config.n_head
    return ModelConfig(
        architecture="gpt2", vocab_size=hf_config.vocab_size, hidden_size=hidden,
        intermediate_size=hf_config.n_inner or 4 * hidden, num_layers=hf_config.n_layer, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, rms_norm_eps=hf_config.layer_norm_epsilon,
        max_position_embeddings=hf_config.n_positions, tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        qkv_bias=True, o_bias=True, mlp_bias=True, norm="layer", norm_bias=True, activation=activation(hf_config),
        gated_mlp=False, position_embedding="learned", bos_token_id=hf_config.bos_token_id,
        eos_token_ids=() if hf_config.eos_token_id is None else (hf_config.eos_token_id,),
    )


def required_weights(model: ModelConfig) -> set[str]:
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    if not model.tie_word_embeddings:
        names.add("lm_head.weight")
    layer = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    return names | {f"transformer.h.{i}.{m}.{p}" for i in range(model.num_layers) for m in layer
                    for p in ("weight", "bias")}


class GPT2DecoderLayer(PreNormDecoderLayer):
    mlp_block = MLP


FAMILY = Family(name="gpt2", config_from_hf=config_from_hf, weight_rules=RULES, required_weights=required_weights,
                layer_prefix="transformer.h.{layer}.", layer_sources=LAYER_SOURCES, top_sources=TOP_SOURCES,
                decoder_layer=GPT2DecoderLayer)
