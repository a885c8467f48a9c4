"""Tensor-parallel building blocks. Each holds only its rank's shard and calls
the TP group it was handed; a group of size 1 makes every collective a no-op.

Shapes use N = tokens in the step (all sequences concatenated), B = sequences,
H = hidden size, T = tp size.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.comm.base import Communicator


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class LinearMethod(Protocol):
    """How a linear layer stores its weight [out, in] and multiplies by it. The
    dense one is below; the quantized ones (INT8/INT4 weight-only, FP8) are in
    engine/quant.py, chosen from the build's quantization by `linear_methods`."""

    mode: str | None
    per_channel_scales: bool  # one scale per output row: a row-parallel shard needs the full row's absmax

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        """Register the layer's weight parameters (their names are the engine file's)."""

    def quantize(self, w: torch.Tensor, dtype: torch.dtype, row_absmax: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """Build time: w [out, in] (this rank's shard) -> {parameter name: tensor}."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, in] -> x W^T + bias [N, out], in x's dtype."""


class DenseLinear:
    """The weight in the model dtype, as `weight`."""

    mode = None
    per_channel_scales = False

    def create_weights(self, layer, out_features, in_features, dtype):
        layer.weight = _empty(out_features, in_features, dtype=dtype)

    def quantize(self, w, dtype, row_absmax=None):
        return {"weight": w.to(dtype)}

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


DENSE = DenseLinear()


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output dim: x [N, in] -> y [N, out/T]. No communication."""

    def __init__(self, in_features: int, out_local: int, bias: bool, dtype: torch.dtype,
                 method: LinearMethod = DENSE):
        super().__init__()
        self.in_features, self.method = in_features, method
        method.create_weights(self, out_local, in_features, dtype)
        self.bias = _empty(out_local, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class RowParallelLinear(nn.Module):
    """W split along its input dim: x [N, in/T] -> partial sums, all-reduced -> y [N, out].
    The bias is replicated and added once, after the reduction."""

    def __init__(self, in_local: int, out_features: int, bias: bool, dtype: torch.dtype, group: Communicator,
                 method: LinearMethod = DENSE):
        super().__init__()
        self.in_features, self.method = in_local, method
        method.create_weights(self, out_features, in_local, dtype)
        self.bias = _empty(out_features, dtype=dtype) if bias else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.group.size > 1:
            y = self.group.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [T_rank * V/T, (T_rank+1) * V/T) of the (padded) table. Tokens
    outside the shard look up zeros; the all-reduce fills them in."""

    def __init__(self, vocab_padded: int, hidden: int, dtype: torch.dtype, group: Communicator):
        super().__init__()
        self.rows = vocab_padded // group.size
        self.start = group.rank * self.rows
        self.weight = _empty(self.rows, hidden, dtype=dtype)
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [N] -> [N, H]
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(x)


class ParallelLMHead(nn.Module):
    """Vocab-parallel output projection: x [B, H] -> local logits [B, V/T] ->
    all-gathered full logits [B, V] (padding rows dropped)."""

    def __init__(self, vocab_size: int, vocab_padded: int, hidden: int, dtype: torch.dtype, group: Communicator,
                 method: LinearMethod = DENSE):
        super().__init__()
        self.vocab_size = vocab_size
        self.in_features, self.method = hidden, method
        method.create_weights(self, vocab_padded // group.size, hidden, dtype)
        self.group = group

    def tie_to(self, embed: VocabParallelEmbedding) -> bool:
        """Share the embedding table as the head's weight where the head stores it densely
        (a quantized head keeps its own copy). Returns whether it is shared."""
        if self.method.mode is not None:
            return False
        self.weight = embed.weight
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply(self, x).float()
        if self.group.size > 1:
            parts = self.group.all_gather(logits)  # [T, B, V/T]
            logits = parts.permute(1, 0, 2).reshape(x.shape[0], -1)
        return logits[:, : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(hidden, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); the sum is the new residual stream."""
        if x.is_cuda:
            from dist_infer.engine.fused_gpu import add_rmsnorm

            return add_rmsnorm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        # Normalize in float32 and cast back before the scale, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype), x


class Rotary(nn.Module):
    """RoPE with precomputed inverse frequencies (llama3/yarn scaling already folded in)."""

    def __init__(self, inv_freq: list[float], attention_scaling: float):
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)
        self.scaling = attention_scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)                       # [N, hd]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, heads, hd]; cos/sin [N, hd]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]
