"""Llama-family decoder (Llama, Mistral, Qwen2) for one pipeline stage of one TP rank.

Weights use the engine's fused names (qkv_proj, gate_up_proj) and global layer
indices, so a rank file says which layers it holds. Parameter names:
    embed.weight                          first stage
    layers.{i}.{qkv_proj,o_proj,gate_up_proj,down_proj}.{weight,bias}, layers.{i}.{input,post_attention}_norm.weight
    norm.weight, lm_head.weight           last stage (lm_head tied to embed when both live here)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.comm.base import Communicator
from dist_infer.config import Mapping, ModelConfig
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch, paged_attention_reference
from dist_infer.engine.layers import (ColumnParallelLinear, ParallelLMHead, RMSNorm, Rotary, RowParallelLinear,
                                      VocabParallelEmbedding)

AttentionFn = Callable[..., torch.Tensor]


def local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) one TP rank holds; KV heads are replicated when tp > kv heads."""
    return cfg.num_heads // tp, max(cfg.num_kv_heads // tp, 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_slot: int, tp: Communicator, dtype: torch.dtype):
        super().__init__()
        self.heads, self.kv_heads = local_heads(cfg, tp.size)
        self.head_dim = cfg.head_dim
        self.layer_slot = layer_slot  # index into this stage's KV cache
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        q, kv = self.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.split = (q, kv, kv)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, q + 2 * kv, cfg.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, cfg.o_bias, dtype, tp)

    def forward(self, x, cos, sin, batch: StepBatch, cache: PagedKVCache, attention: AttentionFn):
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)  # [N, heads*hd], [N, kv*hd] x2
        q = Rotary.apply(q.view(n, self.heads, self.head_dim), cos, sin)
        k = Rotary.apply(k.view(n, self.kv_heads, self.head_dim), cos, sin)
        cache.write(self.layer_slot, k, v.view(n, self.kv_heads, self.head_dim), batch.slot_mapping)
        o = attention(q, cache, self.layer_slot, batch, self.scale, self.sliding_window)  # [N, heads, hd]
        return self.o_proj(o.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Communicator, dtype: torch.dtype):
        super().__init__()
        inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, tp)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [N, inter/T] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_slot: int, tp: Communicator, dtype: torch.dtype):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layer_slot, tp, dtype)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, tp, dtype)

    def forward(self, x, cos, sin, batch, cache, attention):
        x = x + self.self_attn(self.input_norm(x), cos, sin, batch, cache, attention)
        return x + self.mlp(self.post_attention_norm(x))


class StageModel(nn.Module):
    """The layers, embeddings and head that one rank runs."""

    def __init__(self, cfg: ModelConfig, mapping: Mapping, tp: Communicator, vocab_padded: int, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.mapping = mapping
        self.dtype = dtype
        self.layer_ids = mapping.stage_layers(cfg.num_layers)
        self.rotary = Rotary(list(cfg.rope_inv_freq), cfg.rope_attention_scaling)
        self.embed = VocabParallelEmbedding(vocab_padded, cfg.hidden_size, dtype, tp) if mapping.is_first_stage else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, slot, tp, dtype) for slot, i in enumerate(self.layer_ids)})
        if mapping.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = ParallelLMHead(cfg.vocab_size, vocab_padded, cfg.hidden_size, dtype, tp)
            if cfg.tie_word_embeddings and self.embed is not None:
                self.lm_head.weight = self.embed.weight
        else:
            self.norm = self.lm_head = None

    @property
    def ties_lm_head(self) -> bool:
        return self.lm_head is not None and self.embed is not None and self.cfg.tie_word_embeddings

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache,
                attention: AttentionFn = paged_attention_reference) -> torch.Tensor:
        """First stage: x = token ids [N]; later stages: hidden [N, H]. Returns hidden [N, H]."""
        if self.embed is not None:
            x = self.embed(x)
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, batch, cache, attention)
        return x

    def logits(self, hidden: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Last stage: float32 logits [B, vocab] at each sequence's last token."""
        return self.lm_head(self.norm(hidden[batch.last_token_index]))
