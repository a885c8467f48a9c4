"""The fused per-token FP8 activation quantization (quant_gpu.fp8_quantize_per_token) on the GPU:
bit-identical to the reference (quant.quantize_fp8_per_token). Triton's CPU interpreter converts
float32 to e4m3 wrongly (-126 becomes -64), so this runs only where a GPU with FP8 is."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs a GPU with FP8 (compute capability 8.9+)")


@needs_fp8
@pytest.mark.parametrize("rows, n", [(1, 16), (17, 4096), (300, 14336), (5, 4100), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_quantization_equals_the_reference(rows, n, dtype):
    from dist_infer.engine.quant import quantize_fp8_per_token
    from dist_infer.engine.quant_gpu import fp8_quantize_per_token

    x = torch.randn(rows, n, dtype=dtype, device="cuda") * torch.logspace(-3, 3, rows, device="cuda")[:, None].to(dtype)
    x[0, :] = 0  # an all-zero row: scale 1, q 0
    q, scales = fp8_quantize_per_token(x)
    ref_q, ref_scales = quantize_fp8_per_token(x)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@needs_fp8
def test_a_strided_view_is_read_by_its_stride():
    from dist_infer.engine.quant import quantize_fp8_per_token
    from dist_infer.engine.quant_gpu import fp8_quantize_per_token

    x = torch.randn(64, 512, dtype=torch.bfloat16, device="cuda")[:, 128:384]  # rows 512 apart, 256 wide
    q, scales = fp8_quantize_per_token(x)
    ref_q, ref_scales = quantize_fp8_per_token(x.contiguous())
    assert torch.equal(scales, ref_scales) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
