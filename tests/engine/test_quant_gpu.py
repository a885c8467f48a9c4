"""GPU quantized linear ops (engine/quant_gpu.py) against the CPU reference (engine/quant.py).
Tolerances: INT8/INT4 dequantize exactly, so only bf16 matmul rounding differs (rel. 1e-2);
FP8 _scaled_mm accumulates in float32 like the reference (rel. 2e-2, bf16 output)."""

from __future__ import annotations

import pytest
import torch

from dist_infer.engine import quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("mode", ["int8_wo", "int4_wo", "fp8"])
def test_gpu_quantized_linear_matches_reference(mode, tokens):
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    from dist_infer.engine import quant_gpu

    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 0.02
    x = torch.randn(tokens, 1024, dtype=torch.bfloat16)
    method = {"int8_wo": quant.Int8WeightOnly(), "int4_wo": quant.Int4WeightOnly(128), "fp8": quant.Fp8Linear()}[mode]
    q = method.quantize(w, torch.bfloat16)
    name = {"int8_wo": "int8_linear", "int4_wo": "int4_linear", "fp8": "fp8_linear"}[mode]
    ref = getattr(quant, f"{name}_reference")(x.float(), q["qweight"], q["scales"])
    gpu = getattr(quant_gpu, name)(x.cuda(), q["qweight"].cuda(), q["scales"].cuda())
    assert gpu.dtype == torch.bfloat16 and gpu.shape == (tokens, 512)
    assert _rel_err(gpu.cpu(), ref) < (2e-2 if mode == "fp8" else 1e-2)
