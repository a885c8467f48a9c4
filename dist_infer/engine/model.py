"""The decoder of any model family (dist_infer/models/) for one pipeline stage of one TP rank.

Weights use the engine's fused names (qkv_proj, gate_up_proj) and global layer
indices, so a rank file says which layers it holds. Parameter names:
    embed.weight, pos_embed.weight        first stage (pos_embed: learned positions only)
    layers.{i}.self_attn.{qkv_proj,o_proj}, layers.{i}.mlp.{gate_up_proj or up_proj,down_proj}: .weight, .bias
    layers.{i}.{input,post_attention}_norm.{weight,bias} (bias: LayerNorm; no post_attention_norm: parallel residual)
    norm.{weight,bias}, lm_head.{weight,bias} last stage (lm_head tied to embed when both live here)
A quantized build (engine/quant.py) stores a linear layer's weight as
`qweight` + `scales` instead of `weight`; the layers get a `LinearMethod` and
never ask which one it is.
The decoder layers are the model family's (dist_infer/models/<family>.py); ops with a
GPU implementation run through `self.kernels` (engine/kernels.py), chosen at load.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_infer.comm.base import Communicator
from dist_infer.config import Mapping, ModelConfig, QuantConfig
from dist_infer.engine.kernels import ReferenceKernels, kernels_for
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch
from dist_infer.engine.layers import (ParallelLMHead, StepPositions, UsesKernels, VocabParallelEmbedding,
                                      local_heads, make_norm, make_rotary)
from dist_infer.engine.quant import linear_methods
from dist_infer.models import family_of

__all__ = ["StageModel", "local_heads"]


class PositionEmbedding(nn.Module):
    """A learned position table [max_positions, H], replicated (GPT-2's wpe): x + table[positions]."""

    def __init__(self, max_positions: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.weight[positions]


class StageModel(nn.Module):
    """The layers, embeddings and head that one rank runs. `quant`: the build's
    weight quantization (None: every weight in `dtype`)."""

    def __init__(self, cfg: ModelConfig, mapping: Mapping, tp: Communicator, vocab_padded: int, dtype: torch.dtype,
                 quant: QuantConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.mapping = mapping
        self.dtype = dtype
        self.kernels: ReferenceKernels | None = None  # chosen at load (use_kernels), else at the first step
        family = family_of(cfg.architecture)
        linear, head = linear_methods(quant)
        self.layer_ids = mapping.stage_layers(cfg.num_layers)
        self.rotary = make_rotary(cfg)
        first = mapping.is_first_stage
        self.embed = VocabParallelEmbedding(vocab_padded, cfg.hidden_size, dtype, tp) if first else None
        learned = first and cfg.position_embedding == "learned"
        self.pos_embed = PositionEmbedding(cfg.max_position_embeddings, cfg.hidden_size, dtype) if learned else None
        self.layers = nn.ModuleDict({str(i): family.decoder_layer(cfg, slot, tp, dtype, linear)
                                     for slot, i in enumerate(self.layer_ids)})
        last = list(self.layers.values())[-1] if len(self.layers) else None
        self.output_reduce = getattr(last, "output_reduce", None)
        self._tied = False
        if mapping.is_last_stage:
            self.norm = make_norm(cfg, dtype)
            self.lm_head = ParallelLMHead(cfg.vocab_size, vocab_padded, cfg.hidden_size, dtype, tp, head,
                                          cfg.lm_head_bias)
            if cfg.tie_word_embeddings and self.embed is not None:
                self._tied = self.lm_head.tie_to(self.embed)
        else:
            self.norm = self.lm_head = None

    @property
    def ties_lm_head(self) -> bool:
        """The head's weight is the embedding table (tied, both on this stage, head not quantized)."""
        return self._tied

    def use_kernels(self, kernels: ReferenceKernels) -> None:
        """Run every op through `kernels` (engine/kernels.py `kernels_for(device)`)."""
        self.kernels = kernels
        for module in self.modules():
            if isinstance(module, UsesKernels):
                module.kernels = kernels

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        """First stage: x = token ids [N]; later stages: hidden [N, H]. Returns hidden [N, H]."""
        if self.kernels is None:
            self.use_kernels(kernels_for(x.device))
        if self.embed is not None:
            x = self.embed(x)
        if self.pos_embed is not None:
            x = self.pos_embed(x, batch.positions)
        # RoPE cos/sin once per step where the kernels need them (the fused GPU kernel does not).
        positions = StepPositions(self.rotary, self.kernels.rope_tables(self.rotary, batch.positions, x.dtype))
        residual = None
        for layer in self.layers.values():
            x, residual = layer(x, residual, positions, batch, cache)
        if self.output_reduce is not None:  # the last layer left its MLP's TP sum to the stage
            x = self.output_reduce.all_reduce(x)
        return x if residual is None else x + residual

    def logits(self, hidden: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Last stage: float32 logits [B, vocab] at each sequence's last token."""
        normed, _ = self.norm(hidden[batch.last_token_index])
        return self.lm_head(normed)
