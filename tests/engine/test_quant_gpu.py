"""GPU quantized linear ops (engine/quant_gpu.py) against the reference (engine/quant.py).

The reference dequantizes to float32 and multiplies in float32 (run on the GPU here
for speed: it is the same torch code as on CPU, and TF32 is off for matmuls by default).

Tolerances (relative Frobenius error of the [tokens, out] output):
- INT8/INT4: the kernels read the same codes, scales and offsets, convert codes exactly to
  bf16 and accumulate in float32, so only the bf16 output rounding (2^-9) and summation
  order differ: stated 1e-2 (measured ~3e-3).
- FP8 past FP8_WEIGHT_ONLY_MAX_TOKENS rows: _scaled_mm accumulates FP8 x FP8 products in float32 like
  the reference; 2e-2. Up to it, the weight-only kernel (bf16 activations, not quantized) against
  x @ dequantized weights; 1e-2 like INT8.
Every launch variant (tl.dot / GEMV, split-K or not, several tiles) is checked at real shapes too.
"""

from __future__ import annotations

import pytest
import torch

from dist_infer.engine import quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# [out, in]: a small odd one (masks), and Llama-3-8B's o_proj, gate/up, down_proj
SHAPES = [(200, 1024), (4096, 4096), (14336, 4096), (4096, 14336)]
TOKENS = [1, 8, 64, 100]  # 100 > FUSED_MAX_TOKENS: the dequantize + cuBLAS path
TOLERANCE = {"int8_wo": 1e-2, "int4_wo": 1e-2, "fp8": 2e-2}
METHODS = {"int8_wo": lambda: quant.Int8WeightOnly(), "int4_wo": lambda: quant.Int4WeightOnly(128),
           "fp8": lambda: quant.Fp8Linear()}


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _skip_without_fp8(mode):
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")


def _quantized(mode: str, shape: tuple[int, int], dtype=torch.bfloat16) -> tuple[quant._QuantizedLinear, list]:
    """The mode's method and its kernel arguments after x, for a N(0, 0.02) weight, on the GPU."""
    gen = torch.Generator("cuda").manual_seed(shape[0] * 7 + shape[1])
    w = torch.randn(shape, device="cuda", generator=gen) * 0.02
    method = METHODS[mode]()
    params = method.quantize(w, dtype)
    return method, [params[p] for p in method.params]


def _reference(mode, method, x, args):
    from dist_infer.engine import quant_gpu

    if mode == "fp8" and x.shape[0] <= quant_gpu.FP8_WEIGHT_ONLY_MAX_TOKENS:  # W8A16: x is not quantized
        return torch.nn.functional.linear(x.float(), quant.dequantize_fp8(*args))
    return getattr(quant, f"{method.kernel}_reference")(x.float(), *args)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("mode", ["int8_wo", "int4_wo", "fp8"])
def test_gpu_quantized_linear_matches_reference(mode, shape, tokens):
    _skip_without_fp8(mode)
    from dist_infer.engine import quant_gpu

    method, args = _quantized(mode, shape)
    x = torch.randn(tokens, shape[1], dtype=torch.bfloat16, device="cuda")
    ref = _reference(mode, method, x, args)
    y = getattr(quant_gpu, method.kernel)(x, *args)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, shape[0])
    assert _rel_err(y, ref) < TOLERANCE[mode]


CONFIGS = [dict(block_n=64, block_k=128, split_k=1), dict(block_n=32, block_k=256, split_k=4, num_warps=8, num_stages=4),
           dict(block_n=128, block_k=64, split_k=3, num_warps=8, num_stages=2),
           dict(block_n=16, block_k=128, split_k=1, dot=False), dict(block_n=8, block_k=256, split_k=8, dot=False)]
WEIGHT_ONLY_OPS = {"int8_wo": "int8_linear", "int4_wo": "int4_linear", "fp8": "fp8_weight_only_linear"}


@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("mode", ["int8_wo", "int4_wo", "fp8"])
def test_gpu_every_launch_config(mode, config, tokens):
    """Explicit configs (as the tuned table holds): tensor-core and GEMV products, split-K or not."""
    _skip_without_fp8(mode)
    from dist_infer.engine import quant_gpu

    if mode == "fp8" and tokens > quant_gpu.FP8_WEIGHT_ONLY_MAX_TOKENS:
        pytest.skip("fp8 runs _scaled_mm past FP8_WEIGHT_ONLY_MAX_TOKENS")
    method, args = _quantized(mode, (4096, 4096))
    x = torch.randn(tokens, 4096, dtype=torch.bfloat16, device="cuda")
    y = getattr(quant_gpu, WEIGHT_ONLY_OPS[mode])(x, *args, config=quant_gpu.LaunchConfig(**config))
    assert y.shape == (tokens, 4096) and y.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x.float(), quant.dequantize_fp8(*args)) if mode == "fp8" else \
        getattr(quant, f"{method.kernel}_reference")(x.float(), *args)
    assert _rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_gpu_int4_every_group_size(group):
    from dist_infer.engine import quant_gpu

    w = torch.randn(512, 2048, device="cuda") * 0.02
    q, scales, offsets = quant.quantize_int4(w, group, torch.float16)
    x = torch.randn(3, 2048, dtype=torch.float16, device="cuda")
    ref = quant.int4_linear_reference(x.float(), q, scales, offsets)
    assert _rel_err(quant_gpu.int4_linear(x, q, scales, offsets), ref) < 1e-2


@pytest.mark.parametrize("mode", ["int8_wo", "int4_wo", "fp8"])
def test_gpu_quantized_linear_is_captured_in_a_cuda_graph(mode):
    """Warm up (Triton compiles), capture at batch 1, 8 and 32 (fp8: weight-only, then _scaled_mm),
    replay on new inputs: the same results as eager calls, with no host sync inside (capture would fail on one)."""
    _skip_without_fp8(mode)
    from dist_infer.engine import quant_gpu

    method, args = _quantized(mode, (4096, 4096))
    op = getattr(quant_gpu, method.kernel)
    for tokens in (1, 8, 32):
        static_x = torch.randn(tokens, 4096, dtype=torch.bfloat16, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                op(static_x, *args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = op(static_x, *args)
        fresh = torch.randn_like(static_x)
        static_x.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(static_y, op(fresh, *args), rtol=0, atol=0)


@pytest.mark.parametrize("in_features", [4096, 14336])
def test_gpu_fp8_fast_accumulation_adds_an_error_well_below_fp8s_own(in_features):
    """The engine's _scaled_mm accumulates fast (quant_gpu.FP8_FAST_ACCUM). Against float32 sums of the same
    codes its error must stay a small fraction of what FP8 rounding itself costs against the bf16 product
    (H100, 1,024 rows with a few outlier channels: 2.4e-3 at k=4,096 and 3.6e-3 at 14,336 against 3.6e-2;
    float32 accumulation gives 1.7e-3, the bf16 output's rounding)."""
    _skip_without_fp8("fp8")
    from dist_infer.engine import quant_gpu

    assert quant_gpu.FP8_FAST_ACCUM
    gen = torch.Generator("cuda").manual_seed(in_features)
    w = torch.randn(4096, in_features, device="cuda", generator=gen) * 0.02
    x = torch.randn(1024, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    x[:, :8] *= 20  # outlier channels, as real activations have
    qweight, scales = quant.quantize_fp8(w)
    xq, x_scales = quant_gpu.fp8_quantize_per_token(x)
    codes_in_float32 = (xq.float() * x_scales) @ (qweight.float() * scales[:, None]).t()
    y = quant_gpu.fp8_linear(x, qweight, scales)
    fp8_rounding = _rel_err(codes_in_float32, x.float() @ w.t())
    assert _rel_err(y, codes_in_float32) < fp8_rounding / 5  # (it grows with k; not measured past 14,336)
