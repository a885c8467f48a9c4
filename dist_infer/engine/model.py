"""Llama-family decoder (Llama, Mistral, Qwen2) for one pipeline stage of one TP rank.

Weights use the engine's fused names (qkv_proj, gate_up_proj) and global layer
indices, so a rank file says which layers it holds. Parameter names:
    embed.weight                          first stage
    layers.{i}.{qkv_proj,o_proj,gate_up_proj,down_proj}.{weight,bias}, layers.{i}.{input,post_attention}_norm.weight
    norm.weight, lm_head.weight           last stage (lm_head tied to embed when both live here)
A quantized build (engine/quant.py) stores a linear layer's weight as
`qweight` + `scales` instead of `weight`; the layers get a `LinearMethod` and
never ask which one it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.comm.base import Communicator
from dist_infer.config import Mapping, ModelConfig, QuantConfig
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch, paged_attention_reference
from dist_infer.engine.layers import (DENSE, ColumnParallelLinear, LinearMethod, ParallelLMHead, RMSNorm, Rotary,
                                      RowParallelLinear, VocabParallelEmbedding)
from dist_infer.engine.quant import linear_methods

AttentionFn = Callable[..., torch.Tensor]


def local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) one TP rank holds; KV heads are replicated when tp > kv heads."""
    return cfg.num_heads // tp, max(cfg.num_kv_heads // tp, 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_slot: int, tp: Communicator, dtype: torch.dtype,
                 linear: LinearMethod = DENSE):
        super().__init__()
        self.heads, self.kv_heads = local_heads(cfg, tp.size)
        self.head_dim = cfg.head_dim
        self.layer_slot = layer_slot  # index into this stage's KV cache
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        q, kv = self.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.split = (q, kv, kv)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, q + 2 * kv, cfg.qkv_bias, dtype, linear)
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, cfg.o_bias, dtype, tp, linear)

    def forward(self, x, rope: Rotary, cos_sin, batch: StepBatch, cache: PagedKVCache, attention: AttentionFn):
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)  # [N, heads*hd], [N, kv*hd] x2
        q = q.view(n, self.heads, self.head_dim)
        k = k.view(n, self.kv_heads, self.head_dim)
        v = v.view(n, self.kv_heads, self.head_dim)
        if x.is_cuda:  # one kernel: RoPE on q in place, RoPE'd k and v into the cache
            from dist_infer.engine.fused_gpu import rope_write_kv

            layer = self.layer_slot
            rope_write_kv(q, k, v, batch.positions, rope.inv_freq, rope.scaling, cache.k[layer], cache.v[layer],
                          batch.slot_mapping, cache.k_scale[layer : layer + 1], cache.v_scale[layer : layer + 1])
        else:
            cos, sin = cos_sin
            q = Rotary.apply(q, cos, sin)
            cache.write(self.layer_slot, Rotary.apply(k, cos, sin), v, batch.slot_mapping)
        o = attention(q, cache, self.layer_slot, batch, self.scale, self.sliding_window)  # [N, heads, hd]
        return self.o_proj(o.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Communicator, dtype: torch.dtype, linear: LinearMethod = DENSE):
        super().__init__()
        inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, dtype, linear)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, tp, linear)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)  # [N, 2 * inter/T]
        if gate_up.is_cuda:
            from dist_infer.engine.fused_gpu import silu_mul

            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_slot: int, tp: Communicator, dtype: torch.dtype,
                 linear: LinearMethod = DENSE):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layer_slot, tp, dtype, linear)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, tp, dtype, linear)

    def forward(self, x, residual, rope, cos_sin, batch, cache, attention):
        """x: this layer's input [N, H] (the previous layer's MLP output); residual: the
        stream before it (None for a stage's first layer). Returns (mlp output, residual)."""
        h, residual = self.input_norm(x, residual)
        h = self.self_attn(h, rope, cos_sin, batch, cache, attention)
        h, residual = self.post_attention_norm(h, residual)
        return self.mlp(h), residual


class StageModel(nn.Module):
    """The layers, embeddings and head that one rank runs. `quant`: the build's
    weight quantization (None: every weight in `dtype`)."""

    def __init__(self, cfg: ModelConfig, mapping: Mapping, tp: Communicator, vocab_padded: int, dtype: torch.dtype,
                 quant: QuantConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.mapping = mapping
        self.dtype = dtype
        linear, head = linear_methods(quant)
        self.layer_ids = mapping.stage_layers(cfg.num_layers)
        self.rotary = Rotary(list(cfg.rope_inv_freq), cfg.rope_attention_scaling)
        self.embed = VocabParallelEmbedding(vocab_padded, cfg.hidden_size, dtype, tp) if mapping.is_first_stage else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, slot, tp, dtype, linear)
                                     for slot, i in enumerate(self.layer_ids)})
        self._tied = False
        if mapping.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = ParallelLMHead(cfg.vocab_size, vocab_padded, cfg.hidden_size, dtype, tp, head)
            if cfg.tie_word_embeddings and self.embed is not None:
                self._tied = self.lm_head.tie_to(self.embed)
        else:
            self.norm = self.lm_head = None

    @property
    def ties_lm_head(self) -> bool:
        """The head's weight is the embedding table (tied, both on this stage, head not quantized)."""
        return self._tied

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache,
                attention: AttentionFn = paged_attention_reference) -> torch.Tensor:
        """First stage: x = token ids [N]; later stages: hidden [N, H]. Returns hidden [N, H]."""
        if self.embed is not None:
            x = self.embed(x)
        # CPU computes cos/sin once per step; the CUDA path fuses RoPE into one kernel per layer.
        cos_sin = None if x.is_cuda else self.rotary.cos_sin(batch.positions, x.dtype)
        residual = None
        for layer in self.layers.values():
            x, residual = layer(x, residual, self.rotary, cos_sin, batch, cache, attention)
        return x if residual is None else x + residual

    def logits(self, hidden: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Last stage: float32 logits [B, vocab] at each sequence's last token."""
        normed, _ = self.norm(hidden[batch.last_token_index])
        return self.lm_head(normed)
