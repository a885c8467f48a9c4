"""Quantized linear layers: build-time quantization and the CPU reference forward.

Modes (TensorRT-LLM's names; `dist-infer build --quant MODE`):

    int8_wo  qweight int8 [out, in],          scales float32 [out]             W8A16
    int4_wo  qweight uint8 [out, in/2],       scales, offsets [out, in/group]  W4A16
             (codes 0..15, two per byte: even input column in the low nibble;
             w ~= code * scale + offset, scales and offsets in the model dtype)
    fp8      qweight float8_e4m3fn [out, in], scales float32 [out], and each token's
             activations quantized to FP8 with its own scale at run time

INT8 and FP8 are symmetric (w ~= q * scale, scale = row absmax / qmax), their
scales float32: a small fraction of the bytes, and what torch._scaled_mm takes.
INT4 is asymmetric: each group has its own grid from (clipped) min to max,
chosen among a few clipped ranges by squared error (`quantize_int4`), the
layout AutoAWQ/GPTQ checkpoints import into (partition/prequantized.py).

TP commutes with quantization, so a sharded engine holds exactly the slices of
the unsharded quantized weight:
- column-parallel weights are split by output rows: each row keeps its scale;
- row-parallel weights (o_proj, down_proj) are split by input columns: INT4
  groups must not straddle ranks (in/tp % group == 0, checked before a build),
  and a per-output-channel scale is the row's absmax over *every* TP shard
  (the build reads it from the peers' shards: `row_absmax`).
FP8 activation scales are per token and per TP shard: a row-parallel layer's
input is sharded, and one more collective per layer to share a token's absmax
would cost more than it is worth. That is the one place where a TP engine's
numbers differ from TP=1 (by FP8 rounding of activations, not by weights).

Kernels: on CPU the reference below (dequantize, then an ordinary matmul in the
activation dtype; FP8 in float32, which the GPU's fast-accumulating `_scaled_mm` matches to within a tenth of
FP8's own rounding error). On CUDA the same
calls go to engine/quant_gpu.py, through the kernel seam (engine/kernels.py). Model code only ever sees a `LinearMethod`.
"""

from __future__ import annotations

from math import gcd

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.config import ModelConfig, QuantConfig, valid_tp_sizes
from dist_infer.engine.kernels import QuantizedActivation
from dist_infer.engine.layers import DENSE, LinearMethod
from dist_infer.errors import LayoutError

INT8_MAX = 127
INT4_LEVELS = 16  # codes 0..15
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _scale(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Symmetric scale so that absmax maps to qmax; an all-zero row/group gets 1 (its q is 0 anyway)."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))


# ---------------------------------------------------------------- INT8, per output channel

def quantize_int8(w: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], float32 scales [out]). row_absmax [out]: the absmax of each
    full row when w is one TP shard of it (default: w's own)."""
    w = w.float()
    absmax = w.abs().amax(dim=1) if row_absmax is None else row_absmax
    scales = _scale(absmax, INT8_MAX)
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]  # [out, in] float32


# ---------------------------------------------------------------- INT4, per group of inputs, asymmetric

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes in [0, 15], [out, in] -> uint8 [out, in/2]; column 2j in the low nibble, 2j+1 in the high."""
    u = codes.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> uint8 codes [out, in] in [0, 15]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# Each group's grid is w ~= code * scale + offset, code in [0, 15]: AWQ/GPTQ's zero points, kept as
# the float value of code 0 (offset = -zero * scale), the form TensorRT-LLM's W4A16 kernels take.
# The build tries clipped ranges [lo * a, hi * b] of each group (a, b in the ratios below) and keeps
# the one with the least squared error: clipping a group's extremes a little often lowers the error
# of all its other values.
_INT4_CLIP_RATIOS = (1.0, 0.9, 0.8)


def _int4_grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) of the 16 codes spanning [lo, hi]; a constant group gets scale 1 (codes 0)."""
    span = hi - lo
    return torch.where(span > 0, span / (INT4_LEVELS - 1), torch.ones_like(span)), lo


def _int4_candidate(groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype):
    """groups [out, G, group] on the grid over [lo, hi] ([out, G]) with its scale and offset
    rounded to `dtype` as the engine stores them: (codes, scales, offsets, squared error [out, G])."""
    scales, offsets = (t.to(dtype).float() for t in _int4_grid(lo, hi))
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a span too small for `dtype`
    codes = torch.round((groups - offsets[..., None]) / scales[..., None]).clamp_(0, INT4_LEVELS - 1)
    err = (codes * scales[..., None] + offsets[..., None] - groups).square().sum(-1)
    return codes, scales, offsets, err


def _keep_better(best: tuple, cand: tuple) -> tuple:
    """Per group, the candidate (codes, scales, offsets, err) with the smaller error."""
    better = cand[3] < best[3]  # [out, G]
    codes = torch.where(better[..., None], cand[0], best[0])
    return (codes, *(torch.where(better, c, b) for c, b in zip(cand[1:], best[1:])))


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32):
    """w [out, in] -> (uint8 [out, in/2], scales [out, in/group], offsets [out, in/group]), scales and
    offsets in `dtype`. Each group is quantized from its own values alone, so TP slices commute."""
    out, inp = w.shape
    if inp % group_size:
        raise LayoutError(f"int4_wo: {inp} input features are not a multiple of the group size {group_size}.")
    groups = w.float().reshape(out, inp // group_size, group_size)  # [out, G, group]
    lo, hi = groups.amin(-1), groups.amax(-1)
    best = None
    for a in _INT4_CLIP_RATIOS:
        for b in _INT4_CLIP_RATIOS:
            cand = _int4_candidate(groups, lo * a, hi * b, dtype)
            best = cand if best is None else _keep_better(best, cand)
    codes, scales, offsets, _ = best
    return pack_int4(codes.reshape(out, inp)), scales.to(dtype), offsets.to(dtype)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """-> float32 [out, in]: each code * its group's scale + offset."""
    codes = unpack_int4(packed).float()  # [out, in]
    groups = codes.reshape(codes.shape[0], scales.shape[1], -1)  # [out, G, group]
    return (groups * scales.float()[..., None] + offsets.float()[..., None]).reshape(codes.shape)


# ---------------------------------------------------------------- FP8 e4m3

def quantize_fp8(w: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scales [out]); row_absmax as in quantize_int8."""
    w = w.float()
    absmax = w.abs().amax(dim=1) if row_absmax is None else row_absmax
    scales = _scale(absmax, FP8_MAX)
    return (w / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Weights: scales [out] -> [out, in]; activations: scales [N, 1] -> [N, in] (float32)."""
    return q.float() * (scales[:, None] if scales.ndim == 1 else scales)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] -> (float8_e4m3fn [N, in], float32 scales [N, 1]): one scale per token."""
    x = x.float()
    scales = _scale(x.abs().amax(dim=-1, keepdim=True), FP8_MAX)
    return (x / scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scales


# ---------------------------------------------------------------- CPU reference forwards

def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x [N, in] in the model dtype -> [N, out]
    return F.linear(x, dequantize_int8(qweight, scales).to(x.dtype))


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          offsets: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales, offsets).to(x.dtype))


def fp8_linear_reference(x: torch.Tensor | QuantizedActivation, qweight: torch.Tensor,
                         scales: torch.Tensor) -> torch.Tensor:
    """What _scaled_mm computes: FP8 x FP8 products summed (here in float32), then scaled. x in the
    model dtype (quantized per token here) or already quantized by the kernel before."""
    if not isinstance(x, QuantizedActivation):
        x = QuantizedActivation(*quantize_fp8_per_token(x), x.dtype)
    y = F.linear(dequantize_fp8(x.values, x.scales), dequantize_fp8(qweight, scales))
    return y.to(x.dtype)


# ---------------------------------------------------------------- linear methods

class _QuantizedLinear:
    """Weights stored as `qweight` + `scales` (+ `offsets` for INT4), multiplied by the mode's kernel op."""

    kernel: str
    params: tuple[str, ...] = ("qweight", "scales")  # the kernel's arguments after x, in order
    activation_quant: str | None = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # The device's implementation of the mode's matmul (engine/kernels.py), chosen at load.
        y = layer.kernels.quantized_linear(self.kernel)(x, *(getattr(layer, p) for p in self.params))  # [N, out]
        return y if bias is None else y + bias


class Int8WeightOnly(_QuantizedLinear):
    """int8_wo: INT8 weights, one float32 scale per output channel; activations stay in the model dtype."""

    mode = "int8_wo"
    kernel = "int8_linear"
    per_channel_scales = True

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.qweight = _param(out_features, in_features, dtype=torch.int8)
        layer.scales = _param(out_features, dtype=torch.float32)

    def quantize(self, w: torch.Tensor, dtype: torch.dtype, row_absmax=None) -> dict[str, torch.Tensor]:
        q, scales = quantize_int8(w, row_absmax)
        return {"qweight": q, "scales": scales}


class Int4WeightOnly(_QuantizedLinear):
    """int4_wo: INT4 codes packed two per byte, a scale and an offset per `group_size` inputs
    (in the model dtype: half the bytes of float32 and what the GPU kernel reads)."""

    mode = "int4_wo"
    kernel = "int4_linear"
    params = ("qweight", "scales", "offsets")
    per_channel_scales = False  # groups never straddle TP shards, so each rank's own data decides

    def __init__(self, group_size: int):
        self.group_size = group_size

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        if in_features % self.group_size:
            raise LayoutError(f"int4_wo: a linear layer has {in_features} input features per rank, not a "
                              f"multiple of the group size {self.group_size}; rebuild the engine.")
        layer.qweight = _param(out_features, in_features // 2, dtype=torch.uint8)
        layer.scales = _param(out_features, in_features // self.group_size, dtype=dtype)
        layer.offsets = _param(out_features, in_features // self.group_size, dtype=dtype)

    def quantize(self, w: torch.Tensor, dtype: torch.dtype, row_absmax=None) -> dict[str, torch.Tensor]:
        q, scales, offsets = quantize_int4(w, self.group_size, dtype)
        return {"qweight": q, "scales": scales, "offsets": offsets}


class Fp8Linear(_QuantizedLinear):
    """fp8: float8_e4m3fn weights with per-output-channel scales; activations quantized per token."""

    mode = "fp8"
    kernel = "fp8_linear"
    per_channel_scales = True
    activation_quant = "fp8"  # the norm / activation before may quantize x per token in its own kernel

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.qweight = _param(out_features, in_features, dtype=FP8)
        layer.scales = _param(out_features, dtype=torch.float32)

    def quantize(self, w: torch.Tensor, dtype: torch.dtype, row_absmax=None) -> dict[str, torch.Tensor]:
        q, scales = quantize_fp8(w, row_absmax)
        return {"qweight": q, "scales": scales}


def linear_methods(quant: QuantConfig | None) -> tuple[LinearMethod, LinearMethod]:
    """(method of the decoder layers' linears, method of the LM head) for a build's quantization."""
    quant = quant or QuantConfig()
    method = {None: lambda: DENSE, "int8_wo": Int8WeightOnly, "fp8": Fp8Linear,
              "int4_wo": lambda: Int4WeightOnly(quant.group_size)}[quant.mode]()
    return method, method if quant.lm_head else DENSE


# ---------------------------------------------------------------- layouts INT4 can shard

def linear_inputs(cfg: ModelConfig, tp: int, lm_head: bool) -> list[tuple[str, int, bool]]:
    """(layer, input features per TP rank, split over TP) of every linear layer kind."""
    up = "gate_up_proj" if cfg.gated_mlp else "up_proj"
    layers = [("layers.*.self_attn.qkv_proj", cfg.hidden_size, False),
              ("layers.*.self_attn.o_proj", cfg.q_size // tp, True),
              (f"layers.*.mlp.{up}", cfg.hidden_size, False),
              ("layers.*.mlp.down_proj", cfg.intermediate_size // tp, True)]
    return layers + ([("lm_head", cfg.hidden_size, False)] if lm_head else [])


def quant_layout_problems(cfg: ModelConfig, tp: int, quant: QuantConfig) -> list[str]:
    """Why `quant` cannot shard this model at this tp (only INT4 groups constrain the layout)."""
    if quant.mode != "int4_wo":
        return []
    problems = []
    for name, per_rank, split in linear_inputs(cfg, tp, quant.lm_head):
        if per_rank % quant.group_size:
            where = (f"its input dim is split over tp={tp}: {per_rank * tp} / {tp} = {per_rank} per rank"
                     if split and tp > 1 else f"{per_rank} input features")
            problems.append(f"{name} ({where}) is not a multiple of the group size {quant.group_size}")
    return problems


def check_quant_layout(cfg: ModelConfig, tp: int, quant: QuantConfig) -> None:
    """Refuse, before anything is written, an INT4 group size that would straddle TP shards."""
    problems = quant_layout_problems(cfg, tp, quant)
    if not problems:
        return
    sizes = [per_rank for _, per_rank, _ in linear_inputs(cfg, tp, quant.lm_head)]
    common = gcd(*sizes)
    group = max((g for g in (16, 32, 64, 128, 256) if common % g == 0), default=None)
    tps = [t for t in valid_tp_sizes(cfg) if not quant_layout_problems(cfg, t, quant)]
    fixes = [f"--quant-group-size {group}" if group else None,
             f"a tp of {', '.join(map(str, tps))} (partition again)" if tps else None,
             "--quant int8_wo (one scale per output channel, no groups)"]
    raise LayoutError(f"--quant int4_wo with group size {quant.group_size} cannot shard this model at tp={tp}: "
                      + "; ".join(problems) + ". INT4 groups must not straddle TP shards. Use "
                      + " or ".join(f for f in fixes if f) + ".")
