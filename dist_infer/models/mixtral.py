"""Mixtral: the Llama family's attention with a sparse MoE in place of the MLP (top-k routing
over `num_local_experts` SiLU-gated experts). Experts are split over TP like dense MLPs: every
rank holds its slice of every expert, and one all-reduce per layer sums them."""

from __future__ import annotations

import dataclasses

from dist_infer.config import ModelConfig
from dist_infer.engine.layers import PreNormDecoderLayer, SparseMoE
from dist_infer.models import llama
from dist_infer.models.base import COLUMN, REPLICATE, ROW, Family, WeightRule

MOE = llama.LAYER + r"block_sparse_moe\."
RULES = (
    WeightRule(MOE + r"gate\.weight", REPLICATE),
    WeightRule(MOE + r"experts\.\d+\.w[13]\." + llama.PARAM, COLUMN),
    WeightRule(MOE + r"experts\.\d+\.w2\." + llama.PARAM, ROW),
    *llama.LLAMA_RULES,
)
LAYER_SOURCES = {
    **{k: v for k, v in llama.LAYER_SOURCES.items() if not k.startswith("mlp.")},
    "mlp.router": ("block_sparse_moe.gate",),
    "mlp.experts.{expert}.gate_up_proj": ("block_sparse_moe.experts.{expert}.w1", "block_sparse_moe.experts.{expert}.w3"),
    "mlp.experts.{expert}.down_proj": ("block_sparse_moe.experts.{expert}.w2",),
}


def config_from_hf(hf_config) -> ModelConfig:
    cfg = llama.config_from_hf(hf_config, architecture="mixtral")
    return dataclasses.replace(cfg, num_experts=hf_config.num_local_experts,
                               experts_per_token=hf_config.num_experts_per_tok)


def required_weights(model: ModelConfig) -> set[str]:
    dense = {f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(model.num_layers) for p in ("gate", "up", "down")}
    moe = {f"model.layers.{i}.block_sparse_moe.{m}.weight" for i in range(model.num_layers)
           for m in ["gate"] + [f"experts.{e}.w{w}" for e in range(model.num_experts) for w in (1, 2, 3)]}
    return (llama.required_weights(model) - dense) | moe


class MixtralDecoderLayer(PreNormDecoderLayer):
    mlp_block = SparseMoE


FAMILY = Family(name="mixtral", config_from_hf=config_from_hf, weight_rules=RULES, required_weights=required_weights,
                layer_prefix=llama.FAMILY.layer_prefix, layer_sources=LAYER_SOURCES, top_sources=llama.TOP_SOURCES,
                decoder_layer=MixtralDecoderLayer)
