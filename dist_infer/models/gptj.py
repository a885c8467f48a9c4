"""GPT-J: RoPE on the first `rotary_dim` dims of each head with neighbouring dims paired
(interleaved), attention and MLP side by side on one LayerNorm's output (parallel residual),
GELU (tanh) MLP with biases, no attention biases, an untied head with a bias."""

from __future__ import annotations

import torch
from torch import nn

from dist_infer.config import ModelConfig
from dist_infer.engine.layers import MLP, Attention, make_norm
from dist_infer.models.base import (COLUMN, EMBED, IGNORE, KV_COLUMN, LAST, LM_HEAD, REPLICATE, ROW, Family,
                                    WeightRule)
from dist_infer.models.gpt2 import activation

LAYER = r"transformer\.h\.(?P<layer>\d+)\."
PARAM = r"(?P<param>weight|qweight|scales|offsets|bias)"
RULES = (
    WeightRule(LAYER + r"attn\.q_proj\." + PARAM, COLUMN),
    WeightRule(LAYER + r"attn\.[kv]_proj\." + PARAM, KV_COLUMN),
    WeightRule(LAYER + r"attn\.out_proj\." + PARAM, ROW),
    WeightRule(LAYER + r"mlp\.fc_in\." + PARAM, COLUMN),
    WeightRule(LAYER + r"mlp\.fc_out\." + PARAM, ROW),
    WeightRule(LAYER + r"ln_1\.(weight|bias)", REPLICATE),
    WeightRule(r"transformer\.wte\.weight", EMBED),
    WeightRule(r"transformer\.ln_f\.(weight|bias)", LAST),
    WeightRule(r"lm_head\.(weight|bias)", LM_HEAD),
    WeightRule(r".*\.attn\.(masked_)?bias", IGNORE),
)
LAYER_SOURCES = {
    "input_norm": ("ln_1",),
    "self_attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "self_attn.o_proj": ("attn.out_proj",),
    "mlp.up_proj": ("mlp.fc_in",),
    "mlp.down_proj": ("mlp.fc_out",),
}
TOP_SOURCES = {"embed": "transformer.wte", "norm": "transformer.ln_f", "lm_head": "lm_head"}
LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")


def rope_inv_freq(rotary_dim: int) -> list[float]:
    """As transformers' GPT-J computes them (base 10000 over rotary_dim)."""
    return (1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))).tolist()


def config_from_hf(hf_config) -> ModelConfig:
    hidden, heads = hf_config.n_embd, hf_config.n_head
    head_dim = hidden // heads
    rotary_dim = hf_config.rotary_dim or head_dim
    return ModelConfig(
        architecture="gptj", vocab_size=hf_config.vocab_size, hidden_size=hidden,
        intermediate_size=hf_config.n_inner or 4 * hidden, num_layers=hf_config.n_layer, num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, rms_norm_eps=hf_config.layer_norm_epsilon,
        max_position_embeddings=hf_config.n_positions, tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        mlp_bias=True, norm="layer", norm_bias=True, activation=activation(hf_config), gated_mlp=False,
        rope_inv_freq=tuple(rope_inv_freq(rotary_dim)), rotary_dim=rotary_dim, rope_interleaved=True,
        parallel_residual=True, lm_head_bias=not hf_config.tie_word_embeddings, bos_token_id=hf_config.bos_token_id,
        eos_token_ids=() if hf_config.eos_token_id is None else (hf_config.eos_token_id,),
    )


def required_weights(model: ModelConfig) -> set[str]:
    names = {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    if not model.tie_word_embeddings:
        names |= {"lm_head.weight", "lm_head.bias"}
    layer = ["ln_1.weight", "ln_1.bias", "mlp.fc_in.bias", "mlp.fc_out.bias"] + [f"{m}.weight" for m in LINEARS]
    return names | {f"transformer.h.{i}.{w}" for i in range(model.num_layers) for w in layer}


class GPTJDecoderLayer(nn.Module):
    """Parallel residual: x + attn(ln_1(x)) + mlp(ln_1(x)); the residual add is fused into ln_1."""

    def __init__(self, cfg: ModelConfig, layer_slot: int, tp, dtype: torch.dtype, linear):
        super().__init__()
        self.input_norm = make_norm(cfg, dtype)
        self.self_attn = Attention(cfg, layer_slot, tp, dtype, linear)
        self.mlp = MLP(cfg, tp, dtype, linear)

    def forward(self, x, residual, positions, batch, cache):
        h, residual = self.input_norm(x, residual)
        return self.self_attn(h, positions, batch, cache) + self.mlp(h), residual


FAMILY = Family(name="gptj", config_from_hf=config_from_hf, weight_rules=RULES, required_weights=required_weights,
                layer_prefix="transformer.h.{layer}.", layer_sources=LAYER_SOURCES, top_sources=TOP_SOURCES,
                decoder_layer=GPTJDecoderLayer, quantizable_linears=LINEARS,
                fused_linears=(("attn.q_proj", "attn.k_proj", "attn.v_proj"),))
