"""CUDA ops behind engine/quant.py's `_kernel` seam (imported only for CUDA tensors).

Status: correct, not yet fast for INT8/INT4. They dequantize the weight to the
activation dtype and run a dense matmul, so a decode step reads the small
weights *and* writes and reads a dense copy: the memory saving holds, the
batch-1 speed-up does not. The planned kernel is a Triton GEMV that reads the
INT8/INT4 weights once and dequantizes in registers. FP8 runs on the tensor
cores through torch._scaled_mm (per-token x per-channel scales, float32
accumulation), on GPUs with FP8 (compute capability 8.9+: Ada, Hopper).
All ops are plain torch calls, so they are captured in the decode CUDA graphs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dist_infer.engine.quant import dequantize_int4, fp8_linear_reference, quantize_fp8_per_token
from dist_infer.errors import EngineError


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x [N, in] bf16/fp16/fp32; qweight int8 [out, in]; scales float32 [out] -> [N, out]
    return F.linear(x, qweight.to(x.dtype) * scales.to(x.dtype)[:, None])


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales).to(x.dtype))


@functools.cache
def _check_fp8(device_index: int) -> None:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 9):
        raise EngineError(f"--quant fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                          f"{torch.cuda.get_device_name(device_index)} is {major}.{minor}. Rebuild the engine with "
                          "--quant int8_wo (or int4_wo).")


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [N, in] -> [N, out]: x quantized per token, then FP8 x FP8 on the tensor cores."""
    _check_fp8(x.device.index or 0)
    out_features, in_features = qweight.shape
    if in_features % 16 or out_features % 16:  # _scaled_mm's alignment; such layers are rare and small
        return fp8_linear_reference(x, qweight, scales)
    xq, x_scales = quantize_fp8_per_token(x.reshape(-1, in_features))  # [N, in] fp8, [N, 1] float32
    y = torch._scaled_mm(xq, qweight.t(), scale_a=x_scales, scale_b=scales[None, :], out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], out_features)
