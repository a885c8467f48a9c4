"""Tensor-parallel building blocks. Each holds only its rank's shard and calls
the TP group it was handed; a group of size 1 makes every collective a no-op.

Shapes use N = tokens in the step (all sequences concatenated), B = sequences,
H = hidden size, T = tp size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.comm.base import Communicator
from dist_infer.engine.kernels import REFERENCE, ReferenceKernels
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch


class UsesKernels:
    """A module that runs ops through the kernel seam (engine/kernels.py): the reference until
    `StageModel.use_kernels` hands it the device's kernels at load."""

    kernels: ReferenceKernels = REFERENCE


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class LinearMethod(Protocol):
    """How a linear layer stores its weight [out, in] and multiplies by it. The
    dense one is below; the quantized ones (INT8/INT4 weight-only, FP8) are in
    engine/quant.py, chosen from the build's quantization by `linear_methods`."""

    mode: str | None
    per_channel_scales: bool  # one scale per output row: a row-parallel shard needs the full row's absmax
    # The input format it can take already quantized from the kernel before it ("fp8": per token,
    # kernels.QuantizedActivation), or None: apply() then gets x in the model dtype.
    activation_quant: str | None

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
    activation_quant = None

    def create_weights(self, layer, out_features, in_features, dtype):
        layer.weight = _empty(out_features, in_features, dtype=dtype)

    def quantize(self, w, dtype, row_absmax=None):
        return {"weight": w.to(dtype)}

    def apply(self, layer, x, bias=None):
        return layer.kernels.dense_linear(x, layer.weight, bias)


DENSE = DenseLinear()


class ColumnParallelLinear(UsesKernels, nn.Module):
    """y = x W^T + b with W split along its output dim: x [N, in] -> y [N, out/T]. No communication."""

    def __init__(self, in_features: int, out_local: int, bias: bool, dtype: torch.dtype,
                 method: LinearMethod = DENSE):
        super().__init__()
        self.in_features, self.method = in_features, method
        method.create_weights(self, out_local, in_features, dtype)
        self.bias = _empty(out_local, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class RowParallelLinear(UsesKernels, nn.Module):
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


class ParallelLMHead(UsesKernels, nn.Module):
    """Vocab-parallel output projection: x [B, H] -> local logits [B, V/T] ->
    all-gathered full logits [B, V] (padding rows dropped)."""

    def __init__(self, vocab_size: int, vocab_padded: int, hidden: int, dtype: torch.dtype, group: Communicator,
                 method: LinearMethod = DENSE, bias: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.in_features, self.method = hidden, method
        method.create_weights(self, vocab_padded // group.size, hidden, dtype)
        self.bias = _empty(vocab_padded // group.size, dtype=dtype) if bias else None  # vocab-parallel, padded
        self.group = group

    def tie_to(self, embed: VocabParallelEmbedding) -> bool:
        """Share the embedding table as the head's weight where the head stores it densely
        (a quantized head keeps its own copy). Returns whether it is shared."""
        if self.method.mode is not None:
            return False
        self.weight = embed.weight
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply(self, x, self.bias).float()
        if self.group.size > 1:
            parts = self.group.all_gather(logits)  # [T, B, V/T]
            logits = parts.permute(1, 0, 2).reshape(x.shape[0], -1)
        return logits[:, : self.vocab_size]


class RMSNorm(UsesKernels, nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(hidden, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: Communicator | None = None,
                quant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); the sum is the new residual stream.
        reduce: x is a partial sum over this TP group (all-reduced first, fused where it can be).
        quant: the next linear's activation_quant (the kernel may hand its output over quantized)."""
        return self.kernels.add_rms_norm(x, self.weight, self.eps, residual, reduce, quant)


class LayerNorm(UsesKernels, nn.Module):
    def __init__(self, hidden: int, eps: float, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(hidden, dtype=dtype)
        self.bias = _empty(hidden, dtype=dtype) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(LayerNorm(x + residual), x + residual); the output stays unquantized whatever `quant`."""
        return self.kernels.add_layer_norm(x, self.weight, self.bias, self.eps, residual)


def make_norm(cfg, dtype: torch.dtype) -> nn.Module:
    """The model's norm kind (ModelConfig.norm): RMSNorm or LayerNorm."""
    if cfg.norm == "layer":
        return LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_bias, dtype)
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class Rotary(nn.Module):
    """RoPE with precomputed inverse frequencies [rotary_dim/2] (llama3/yarn scaling already folded in).
    It turns the first rotary_dim = 2 * len(inv_freq) dims of each head (GPT-J: fewer than all),
    pairing the two halves (Llama, "neox") or neighbouring dims (interleaved, GPT-J)."""

    def __init__(self, inv_freq: list[float], attention_scaling: float, head_dim: int | None = None,
                 interleaved: bool = False):
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)
        self.scaling = attention_scaling
        self.rotary_dim = 2 * len(inv_freq)
        self.interleaved = interleaved
        # The fused GPU kernel turns whole heads, halves paired.
        self.fusable = not interleaved and head_dim in (None, self.rotary_dim)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, rd/2]
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)  # [N, rd]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def rotate(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [N, heads, hd] with its first rotary_dim dims turned; tables = cos_sin(...)."""
        cos, sin = tables
        if self.rotary_dim == x.shape[-1] and not self.interleaved:
            return Rotary.apply(x, cos, sin)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:  # (x0, x1) -> (-x1, x0) for each neighbouring pair
            turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:
            half = self.rotary_dim // 2
            turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos[:, None, :] + turned * sin[:, None, :], rest), dim=-1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, heads, hd]; cos/sin [N, hd]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]


def make_rotary(cfg) -> Rotary | None:
    """The model's RoPE, or None with learned positions."""
    if cfg.position_embedding != "rope":
        return None
    return Rotary(list(cfg.rope_inv_freq), cfg.rope_attention_scaling, cfg.head_dim, cfg.rope_interleaved)


@dataclass
class StepPositions:
    """What every layer's attention needs about the step's positions: the RoPE (None with
    learned positions) and its per-step cos/sin tables (None where the kernel computes them)."""

    rotary: Rotary | None
    tables: tuple[torch.Tensor, torch.Tensor] | None


# ---------------------------------------------------------------- attention and MLP blocks

def local_heads(cfg, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) one TP rank holds; KV heads are replicated when tp > kv heads."""
    return cfg.num_heads // tp, max(cfg.num_kv_heads // tp, 1)


class Attention(UsesKernels, nn.Module):
    """qkv_proj (column-parallel, q/k/v fused) -> RoPE + paged KV write -> paged attention ->
    o_proj (row-parallel). Engine names: qkv_proj, o_proj. reduce=False leaves o_proj's partial
    sums to the caller (the norm after it all-reduces them in its own kernel)."""

    def __init__(self, cfg, layer_slot: int, tp: Communicator, dtype: torch.dtype, linear: LinearMethod = DENSE,
                 reduce: bool = True):
        super().__init__()
        self.heads, self.kv_heads = local_heads(cfg, tp.size)
        self.head_dim = cfg.head_dim
        self.layer_slot = layer_slot  # index into this stage's KV cache
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        q, kv = self.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.split = (q, kv, kv)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, q + 2 * kv, cfg.qkv_bias, dtype, linear)
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, cfg.o_bias, dtype, tp if reduce else _NoReduce(), linear)
        self.input_quant = linear.activation_quant  # qkv_proj's

    def forward(self, x, positions: StepPositions, batch: StepBatch, cache: PagedKVCache):
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)  # [N, heads*hd], [N, kv*hd] x2
        q = q.view(n, self.heads, self.head_dim)
        k = k.view(n, self.kv_heads, self.head_dim)
        v = v.view(n, self.kv_heads, self.head_dim)
        o = self.kernels.rope_attention(q, k, v, positions.rotary, positions.tables, batch, cache, self.layer_slot,
                                        self.scale, self.sliding_window)  # [N, heads, hd]
        return self.o_proj(o.reshape(n, -1))


class GatedMLP(UsesKernels, nn.Module):
    """down(act(gate) * up), gate/up fused column-parallel: engine names gate_up_proj, down_proj.
    reduce=False leaves down_proj's partial sums [N, H] to the caller (MoE experts: one
    all-reduce for all of them)."""

    def __init__(self, cfg, tp: Communicator, dtype: torch.dtype, linear: LinearMethod = DENSE, reduce: bool = True):
        super().__init__()
        inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, dtype, linear)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, tp if reduce else _NoReduce(),
                                           linear)
        self.input_quant = linear.activation_quant  # gate_up_proj's

    def forward(self, x):
        return self.kernels.silu_mul_linear(self.gate_up_proj(x), self.down_proj)  # gate_up: [N, 2*inter/T]


class MLP(UsesKernels, nn.Module):
    """down(act(up(x))) (GPT-2, GPT-J): engine names up_proj (column), down_proj (row)."""

    def __init__(self, cfg, tp: Communicator, dtype: torch.dtype, linear: LinearMethod = DENSE):
        super().__init__()
        inter = cfg.intermediate_size // tp.size
        self.activation = cfg.activation
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, inter, cfg.mlp_bias, dtype, linear)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, tp, linear)
        self.input_quant = linear.activation_quant  # up_proj's

    def forward(self, x):
        return self.down_proj(self.kernels.activation(self.activation, self.up_proj(x)))  # [N, inter/T] inside


class _NoReduce:
    """A TP group whose all-reduce is deferred: experts' partial sums are reduced once, together."""

    size = 1


class SparseMoE(UsesKernels, nn.Module):
    """Mixtral's sparse MoE: a replicated router [E, H] picks experts_per_token experts per token
    (softmax in float32, top-k, weights renormalised); every expert is a SiLU-gated MLP split over
    TP like a dense one (gate_up column-, down row-parallel); the weighted partial sums of all
    experts are all-reduced once. Engine names: router.weight, experts.{e}.gate_up_proj, .down_proj."""

    input_quant = None  # the router reads the norm's output in the model dtype

    def __init__(self, cfg, tp: Communicator, dtype: torch.dtype, linear: LinearMethod = DENSE):
        super().__init__()
        self.top_k, self.tp = cfg.experts_per_token, tp
        self.router = nn.Module()
        self.router.weight = _empty(cfg.num_experts, cfg.hidden_size, dtype=dtype)
        self.experts = nn.ModuleList(GatedMLP(cfg, tp, dtype, linear, reduce=False) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x, self.router.weight).float().softmax(dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)                   # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.kernels.moe_experts(x, weights, chosen, self.experts)  # [N, H], partial over TP
        return self.tp.all_reduce(out) if self.tp.size > 1 else out


class PreNormDecoderLayer(nn.Module):
    """Pre-norm: x + attn(norm(x)), then + mlp(norm(.)); the residual adds are fused into the norms.
    A family names its MLP block (GatedMLP, MLP, SparseMoE) in `mlp_block`.

    Under TP, o_proj's and down_proj's sums are all-reduced by the RMSNorm that follows them,
    in one kernel with the residual add where the group has one (TensorRT-LLM's fused
    AllReduce+RMSNorm): post_attention_norm takes o_proj's, and the next layer's input_norm
    takes this layer's MLP output (`output_reduce`; the stage all-reduces the last layer's).
    Only for bias-free projections into an RMSNorm: a bias is added after the sum."""

    mlp_block: type[nn.Module] = GatedMLP

    def __init__(self, cfg, layer_slot: int, tp, dtype: torch.dtype, linear):
        super().__init__()
        fuse = tp.size > 1 and cfg.norm != "layer"
        self.attn_reduce = tp if fuse and not cfg.o_bias else None
        self.output_reduce = tp if fuse and self.mlp_block is GatedMLP and not cfg.mlp_bias else None
        self.input_reduce = self.output_reduce if layer_slot > 0 else None  # the previous layer's MLP sum
        self.input_norm = make_norm(cfg, dtype)
        self.self_attn = Attention(cfg, layer_slot, tp, dtype, linear, reduce=self.attn_reduce is None)
        self.post_attention_norm = make_norm(cfg, dtype)
        mlp_kwargs = {"reduce": False} if self.output_reduce is not None else {}
        self.mlp = self.mlp_block(cfg, tp, dtype, linear, **mlp_kwargs)

    def forward(self, x, residual, positions, batch, cache):
        """x: this layer's input [N, H] (the previous layer's MLP output, a partial sum over TP
        when `input_reduce`); residual: the stream before it (None for a stage's first layer).
        Returns (mlp output, partial over TP when `output_reduce`; residual)."""
        h, residual = self._norm(self.input_norm, x, residual, self.input_reduce, self.self_attn.input_quant)
        h = self.self_attn(h, positions, batch, cache)
        h, residual = self._norm(self.post_attention_norm, h, residual, self.attn_reduce, self.mlp.input_quant)
        return self.mlp(h), residual

    @staticmethod
    def _norm(norm, x, residual, reduce, quant):
        return norm(x, residual, quant=quant) if reduce is None else norm(x, residual, reduce, quant=quant)
