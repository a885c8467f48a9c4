"""Quantized linear layers: build-time quantization and the CPU reference forward.

Modes (TensorRT-LLM's names; `dist-infer build --quant MODE`):

    int8_wo  qweight int8 [out, in],        scales float32 [out]           W8A16
    int4_wo  qweight uint8 [out, in/2],     scales float32 [out, in/group] W4A16
             (two INT4 values per byte: even input column in the low nibble, stored + 8)
    fp8      qweight float8_e4m3fn [out, in], scales float32 [out], and each token's
             activations quantized to FP8 with its own scale at run time

All scales are symmetric (no zero points): w ~= q * scale (an INT4 group's scale
may be negative, and is chosen from a few clipped candidates by squared
error: `quantize_int4`). Scales are kept in
float32: they are a small fraction of the bytes (int4 group 128: 1/16 of the
packed weight) and float32 is what torch._scaled_mm takes.

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
activation dtype; FP8 in float32 as `_scaled_mm` accumulates). On CUDA the same
calls go to engine/quant_gpu.py. Model code only ever sees a `LinearMethod`.
"""

from __future__ import annotations

from math import gcd

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.config import ModelConfig, QuantConfig, valid_tp_sizes
from dist_infer.engine.layers import DENSE, LinearMethod
from dist_infer.errors import LayoutError

INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
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


# ---------------------------------------------------------------- INT4, per group of inputs

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], [out, in] -> uint8 [out, in/2]; column 2j in the low nibble, 2j+1 in the high."""
    u = (q.to(torch.int16) - INT4_MIN).to(torch.uint8)  # [0, 15]
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int8 [out, in] in [-8, 7]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1).to(torch.int8) + INT4_MIN


# Scales tried per INT4 group (of the group's absmax): clipping the largest values a little
# often lowers the error of all the others. A negative scale maps the largest magnitude to -8,
# so that all 16 codes cover the group (as llama.cpp's Q4_0 does); dequantization is still q * scale.
_INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _int4_candidate_scales(groups: torch.Tensor) -> torch.Tensor:
    """groups [out, G, group] -> candidate scales [C, out, G]: +absmax/7 and -peak/8, clipped."""
    peak = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # signed, [out, G]
    bases = (_scale(peak.abs(), INT4_MAX), -peak / -INT4_MIN)
    return torch.stack([base * r for r in _INT4_CLIP_RATIOS for base in bases])


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (uint8 [out, in/2], float32 scales [out, in/group]), each group's scale the
    candidate with the least squared error."""
    out, inp = w.shape
    if inp % group_size:
        raise LayoutError(f"int4_wo: {inp} input features are not a multiple of the group size {group_size}.")
    groups = w.float().reshape(out, inp // group_size, group_size)  # [out, G, group]
    best_q, best_scales, best_err = None, None, None
    for scales in _int4_candidate_scales(groups):                    # [out, G] each
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        q = torch.round(groups / scales[..., None]).clamp_(INT4_MIN, INT4_MAX)
        err = (q * scales[..., None] - groups).square().sum(dim=-1)  # [out, G]
        if best_err is None:
            best_q, best_scales, best_err = q, scales, err
            continue
        better = err < best_err
        best_q = torch.where(better[..., None], q, best_q)
        best_scales, best_err = torch.where(better, scales, best_scales), torch.minimum(err, best_err)
    return pack_int4(best_q.reshape(out, inp)), best_scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()                # [out, in]
    group_size = q.shape[1] // scales.shape[1]
    return (q.reshape(q.shape[0], -1, group_size) * scales[..., None]).reshape(q.shape)


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


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales).to(x.dtype))


def fp8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What _scaled_mm computes: FP8 x FP8 products accumulated in float32, then scaled."""
    xq, x_scales = quantize_fp8_per_token(x)
    y = F.linear(dequantize_fp8(xq, x_scales), dequantize_fp8(qweight, scales))
    return y.to(x.dtype)


def _kernel(name: str, x: torch.Tensor):
    """The op for x's device: the reference here on CPU, engine/quant_gpu.py on CUDA."""
    if x.is_cuda:
        from dist_infer.engine import quant_gpu

        return getattr(quant_gpu, name)
    return globals()[f"{name}_reference"]


# ---------------------------------------------------------------- linear methods

class _QuantizedLinear:
    """Weights stored as `qweight` + `scales`, multiplied by the mode's kernel op."""

    kernel: str

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = _kernel(self.kernel, x)(x, layer.qweight, layer.scales)  # [N, out]
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
    """int4_wo: INT4 weights packed two per byte, one float32 scale per `group_size` inputs."""

    mode = "int4_wo"
    kernel = "int4_linear"
    per_channel_scales = False  # groups never straddle TP shards, so each rank's own data decides

    def __init__(self, group_size: int):
        self.group_size = group_size

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        if in_features % self.group_size:
            raise LayoutError(f"int4_wo: a linear layer has {in_features} input features per rank, not a "
                              f"multiple of the group size {self.group_size}; rebuild the engine.")
        layer.qweight = _param(out_features, in_features // 2, dtype=torch.uint8)
        layer.scales = _param(out_features, in_features // self.group_size, dtype=torch.float32)

    def quantize(self, w: torch.Tensor, dtype: torch.dtype, row_absmax=None) -> dict[str, torch.Tensor]:
        q, scales = quantize_int4(w, self.group_size)
        return {"qweight": q, "scales": scales}


class Fp8Linear(_QuantizedLinear):
    """fp8: float8_e4m3fn weights with per-output-channel scales; activations quantized per token."""

    mode = "fp8"
    kernel = "fp8_linear"
    per_channel_scales = True

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
    layers = [("layers.*.self_attn.qkv_proj", cfg.hidden_size, False),
              ("layers.*.self_attn.o_proj", cfg.q_size // tp, True),
              ("layers.*.mlp.gate_up_proj", cfg.hidden_size, False),
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
