"""The kernel seam: every op a model runs that has more than one implementation.

`ReferenceKernels` is the CPU reference (plain torch, the numbers transformers computes);
`GpuKernels` overrides the ops that have a Triton/CUDA implementation (engine/fused_gpu.py,
attention_gpu.py, quant_gpu.py, moe_gpu.py) and inherits the rest. `kernels_for(device)` picks one when
a rank loads its engine; `StageModel.use_kernels` hands it to every layer. Model and family
code call `self.kernels.<op>` and never ask which device or which quantization they run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_infer.engine.kv_cache import PagedKVCache, StepBatch, paged_attention_reference

@dataclass(frozen=True)
class QuantizedActivation:
    """An activation handed to the next linear already quantized per token: values [N, in]
    (float8 e4m3), scales [N, 1] float32 (real = values * scales), dtype the model's (the
    linear's output dtype). Only the FP8 linear takes one; norms and activations produce one
    when asked with quant="fp8" and their kernel can (see GpuKernels)."""

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device


@dataclass(frozen=True)
class GatedActivation:
    """silu(gate) * up not computed yet: gate_up [N, 2I]. GpuKernels hands it to a dense linear
    whose kernel computes the product as it reads its inputs (silu_mul_linear); dense_linear
    of either kernel set takes it."""

    gate_up: torch.Tensor


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


class ReferenceKernels:
    name = "reference"

    def add_rms_norm(self, x, weight, eps: float, residual=None, reduce=None, quant=None):
        """(RMSNorm(x + residual), x + residual): x, residual [N, H]; the sum is the new stream.
        reduce: the TP group x is a partial sum over (its all-reduce comes first), or None.
        quant: the input format of the linear that takes the norm's output ("fp8" or None); a
        kernel may return a QuantizedActivation for it (the reference never does: the linear
        quantizes, to the same values)."""
        if reduce is not None:
            x = reduce.all_reduce(x)
        if residual is not None:
            x = x + residual
        # Normalize in float32 and cast back before the scale, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype), x

    def add_layer_norm(self, x, weight, bias, eps: float, residual=None):
        """(LayerNorm(x + residual), x + residual)."""
        if residual is not None:
            x = x + residual
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps), x

    def silu_mul(self, gate_up, quant=None):
        """gate_up [N, 2I] -> silu(gate) * up [N, I]; quant as in add_rms_norm."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def silu_mul_linear(self, gate_up, linear):
        """linear(silu(gate) * up): gate_up [N, 2I]; linear a layer taking [N, I]. One op so a kernel
        may fold the product into the linear's input reads (GpuKernels: one row, dense weight)."""
        return linear(self.silu_mul(gate_up, linear.method.activation_quant))

    def activation(self, name: str, x):
        return ACTIVATIONS[name](x)

    def rope_tables(self, rotary, positions, dtype):
        """Per-step RoPE cos/sin shared by every layer (None where the kernel computes them itself)."""
        return None if rotary is None else rotary.cos_sin(positions, dtype)

    def rope_write_kv(self, q, k, v, rotary, tables, batch: StepBatch, cache: PagedKVCache, layer: int):
        """RoPE on q [N, heads, hd] and k [N, kv, hd] (none with learned positions); k and v go to
        the layer's cache slots. Returns the rotated q."""
        if rotary is not None:
            q, k = rotary.rotate(q, tables), rotary.rotate(k, tables)
        cache.write(layer, k, v, batch.slot_mapping)
        return q

    def attention(self, q, cache: PagedKVCache, layer: int, batch: StepBatch, scale: float, window):
        return paged_attention_reference(q, cache, layer, batch, scale, window)

    def rope_attention(self, q, k, v, rotary, tables, batch: StepBatch, cache: PagedKVCache, layer: int,
                       scale: float, window):
        """rope_write_kv then attention: q [N, heads, hd], k/v [N, kv, hd] -> [N, heads, hd]. One op
        so a kernel may do both (GpuKernels: small decode steps)."""
        q = self.rope_write_kv(q, k, v, rotary, tables, batch, cache, layer)
        return self.attention(q, cache, layer, batch, scale, window)

    def moe_experts(self, x, weights, chosen, experts):
        """Sparse MoE dispatch: x [N, H]; chosen [N, k] expert ids with their weights [N, k] (float32);
        experts: modules [n, H] -> [n, H]. Each expert runs on its tokens only (data-dependent
        shapes: fine eagerly, not inside a CUDA graph)."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        return out

    def dense_linear(self, x, weight, bias=None):
        """x [N, in] @ weight [out, in]^T + bias -> [N, out]; x may be a GatedActivation."""
        if isinstance(x, GatedActivation):
            x = self.silu_mul(x.gate_up)
        return F.linear(x, weight, bias)

    def quantized_linear(self, name: str):
        """The weight-only/FP8 matmul `name` (int8_linear, int4_linear, fp8_linear): x, *params -> [N, out]."""
        from dist_infer.engine import quant

        return getattr(quant, f"{name}_reference")


class GpuKernels(ReferenceKernels):
    name = "gpu"
    moe_kernel = False  # moe_gpu's grouped kernels at decode sizes: $DIST_INFER_MOE_KERNEL, read in __init__

    def __init__(self):
        from dist_infer.engine import attention_gpu, fused_gpu, gemv_gpu, moe_gpu, quant_gpu

        self.fused, self.attn, self.quant, self.moe, self.gemv = fused_gpu, attention_gpu, quant_gpu, moe_gpu, gemv_gpu
        self.moe_kernel = moe_gpu.kernel_enabled()  # read once: the choice is captured in the graphs
        self.expert_tables = moe_gpu.ExpertTableCache()

    def add_rms_norm(self, x, weight, eps, residual=None, reduce=None, quant=None):
        if reduce is not None:  # one kernel for all-reduce + add + norm where the group has one
            fused = getattr(reduce, "all_reduce_add_rms_norm", None)
            done = fused(x, residual, weight, eps) if fused is not None and residual is not None else None
            if done is not None:
                return done
            x = reduce.all_reduce(x)
        fp8_out = self._fp8_out(x, quant)
        out, residual = self.fused.add_rmsnorm(x, weight, eps, residual, fp8_out=fp8_out)
        return (QuantizedActivation(*out, x.dtype) if fp8_out else out), residual

    def silu_mul(self, gate_up, quant=None):
        fp8_out = self._fp8_out(gate_up, quant)
        out = self.fused.silu_mul(gate_up, fp8_out=fp8_out)
        return QuantizedActivation(*out, gate_up.dtype) if fp8_out else out

    def silu_mul_linear(self, gate_up, linear):
        if linear.method.mode is None and self.gemv.takes(gate_up, linear.weight, gated=True):
            return linear(GatedActivation(gate_up))  # dense_linear below: the gated GEMV
        return super().silu_mul_linear(gate_up, linear)

    def _fp8_out(self, x, quant) -> bool:
        """Whether an op on x's rows emits FP8: its consumer is an FP8 linear and has enough rows to
        run the FP8 GEMM (fewer run weight-only, on the unquantized input)."""
        return quant == "fp8" and self.quant.fp8_takes_quantized_input(x.shape[0])

    def rope_tables(self, rotary, positions, dtype):
        return None if rotary is None or rotary.fusable else super().rope_tables(rotary, positions, dtype)

    def rope_write_kv(self, q, k, v, rotary, tables, batch, cache, layer):
        if rotary is None or not rotary.fusable:  # partial / interleaved RoPE, learned positions
            return super().rope_write_kv(q, k, v, rotary, tables, batch, cache, layer)
        # One kernel: RoPE on q in place, RoPE'd k and v into the cache.
        self.fused.rope_write_kv(q, k, v, batch.positions, rotary.inv_freq, rotary.scaling, cache.k[layer],
                                 cache.v[layer], batch.slot_mapping, cache.k_scale[layer : layer + 1],
                                 cache.v_scale[layer : layer + 1])
        return q

    def attention(self, q, cache, layer, batch, scale, window):
        return self.attn.gpu_attention(q, cache, layer, batch, scale, window)

    def rope_attention(self, q, k, v, rotary, tables, batch, cache, layer, scale, window):
        """A decode step of few sequences (decode_splits > 1) with the fused RoPE: one kernel turns,
        writes and attends over ranges of each context, a second merges them. Otherwise the two ops."""
        splits = 1
        if batch.is_decode and rotary is not None and rotary.fusable and self.attn.rope_fusable(q.shape[-1]):
            splits = self.attn.decode_splits(batch.num_seqs, k.shape[1], q.device)
        if splits == 1:
            return super().rope_attention(q, k, v, rotary, tables, batch, cache, layer, scale, window)
        scales = self.attn.layer_scales(cache, layer)
        return self.attn.rope_decode_split_attention(
            q, k, v, batch.positions, rotary.inv_freq, rotary.scaling, cache.k[layer], cache.v[layer],
            batch.slot_mapping, batch.block_tables, batch.context_lens_tensor, cache.block_size, scale, splits,
            window, *scales)

    def moe_experts(self, x, weights, chosen, experts):
        """Graph-safe MoE (static shapes, no host sync). Decode-size steps (N * k <= 2E, dense
        weights): moe_gpu's grouped kernels read only the chosen experts' weights. Larger steps, or
        quantized experts, or $DIST_INFER_MOE_KERNEL=0: the dense path below."""
        pairs = self.moe.grouped_kernel_weights(x, chosen, experts) if self.moe_kernel else None
        if pairs is not None:
            return self.moe.moe_grouped(x, weights, chosen, self.expert_tables.get(pairs))
        return self._moe_every_expert(x, weights, chosen, experts)

    @staticmethod
    def _moe_every_expert(x, weights, chosen, experts):
        """Every expert runs on every token, scaled by its routing weight, 0 where it was not
        chosen: E/k times the reference's expert FLOPs and every expert's weights read, but the
        GEMMs are cuBLAS's, which is what larger steps (most experts chosen anyway) want."""
        dense = torch.zeros(x.shape[0], len(experts), dtype=x.dtype, device=x.device)
        dense.scatter_(1, chosen, weights.to(x.dtype))  # [N, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            out += expert(x) * dense[:, e : e + 1]
        return out

    def dense_linear(self, x, weight, bias=None):
        """One row (batch-1 decode, one sequence's LM head): gemv_gpu's weight-streaming kernel;
        more rows: cuBLAS. A GatedActivation (from silu_mul_linear, one row) runs the gated GEMV."""
        if isinstance(x, GatedActivation):
            return self.gemv.gemv(x.gate_up, weight, bias, gated=True)
        return self.gemv.gemv(x, weight, bias) if self.gemv.takes(x, weight) else F.linear(x, weight, bias)

    def quantized_linear(self, name):
        return getattr(self.quant, name)


REFERENCE = ReferenceKernels()


@functools.cache
def _gpu() -> GpuKernels:
    return GpuKernels()


def kernels_for(device: torch.device | str) -> ReferenceKernels:
    """The kernels of a device: GPU implementations on CUDA, the reference elsewhere."""
    return _gpu() if torch.device(device).type == "cuda" else REFERENCE
