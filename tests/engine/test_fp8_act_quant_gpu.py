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


def _quantized(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from dist_infer.engine.quant import quantize_fp8_per_token

    q, scales = quantize_fp8_per_token(values)
    return q.view(torch.uint8), scales


@needs_fp8
@pytest.mark.parametrize("rows, hidden", [(17, 4096), (300, 4096), (33, 4100), (64, 896)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_with_fp8_output_is_the_reference_quantized(rows, hidden, with_residual):
    """The norm's FP8 output is exactly the unquantized kernel's output quantized per token, and
    its residual stream is unchanged."""
    from dist_infer.engine.fused_gpu import add_rmsnorm

    x = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda") * 3
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.rand(hidden, dtype=torch.bfloat16, device="cuda") + 0.5
    out, res = add_rmsnorm(x, weight, 1e-5, residual)
    (q, scales), res_fp8 = add_rmsnorm(x, weight, 1e-5, residual, fp8_out=True)
    ref_q, ref_scales = _quantized(out)
    assert torch.equal(scales, ref_scales) and torch.equal(q.view(torch.uint8), ref_q)
    assert torch.equal(res_fp8, res)


@needs_fp8
@pytest.mark.parametrize("rows, inter", [(17, 14336), (300, 3584), (40, 4100), (20, 8192),
                                         (18, 28672)])  # past SILU_FP8_ONE_BLOCK_MAX: two passes
def test_silu_mul_with_fp8_output_is_the_reference_quantized(rows, inter):
    from dist_infer.engine.fused_gpu import silu_mul

    gate_up = torch.randn(rows, 2 * inter, dtype=torch.bfloat16, device="cuda") * 4
    gate_up[0] = 0  # an all-zero row: scale 1, codes 0
    q, scales = silu_mul(gate_up, fp8_out=True)
    ref_q, ref_scales = _quantized(silu_mul(gate_up))
    assert torch.equal(scales, ref_scales) and torch.equal(q.view(torch.uint8), ref_q)


@needs_fp8
@pytest.mark.parametrize("rows", [16, 17, 512])
def test_kernels_hand_the_fp8_linear_its_input_quantized_only_where_it_runs_the_fp8_gemm(rows):
    """Above FP8_WEIGHT_ONLY_MAX_TOKENS rows the norm and silu_mul return a QuantizedActivation,
    and the FP8 linear gives the same output from it as from the unquantized activation; at or
    below it they return the tensor (the weight-only GEMV reads bf16)."""
    from dist_infer.engine.kernels import QuantizedActivation, kernels_for
    from dist_infer.engine.quant import quantize_fp8
    from dist_infer.engine.quant_gpu import FP8_WEIGHT_ONLY_MAX_TOKENS, fp8_linear

    kernels = kernels_for("cuda")
    x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
    weight = torch.ones(1024, dtype=torch.bfloat16, device="cuda")
    qweight, wscales = (t.cuda() for t in quantize_fp8(torch.randn(256, 1024) * 0.05))
    plain, _ = kernels.add_rms_norm(x, weight, 1e-5)
    hinted, _ = kernels.add_rms_norm(x, weight, 1e-5, quant="fp8")
    act = kernels.silu_mul(torch.cat([x, x], dim=1), "fp8")
    quantized = rows > FP8_WEIGHT_ONLY_MAX_TOKENS
    assert isinstance(hinted, QuantizedActivation) == quantized == isinstance(act, QuantizedActivation)
    assert torch.equal(fp8_linear(hinted, qweight, wscales), fp8_linear(plain, qweight, wscales))


@needs_fp8
def test_fp8_linear_keeps_leading_dims():
    from dist_infer.engine.quant import quantize_fp8
    from dist_infer.engine.quant_gpu import fp8_linear

    qweight, scales = (t.cuda() for t in quantize_fp8(torch.randn(32, 64) * 0.05))
    for shape in [(2, 20, 64), (1, 3, 64)]:  # above and below FP8_WEIGHT_ONLY_MAX_TOKENS rows
        x = torch.randn(*shape, dtype=torch.bfloat16, device="cuda")
        assert fp8_linear(x, qweight, scales).shape == (*shape[:-1], 32)
