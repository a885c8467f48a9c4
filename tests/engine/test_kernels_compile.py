"""The Triton kernels of the GPU path compile for the GPUs we serve on (sm_90: H100, H200), on a
machine without one. CI has no GPU and the interpreter tests (test_*_kernels.py,
test_split_decode_attention.py, test_gemv_gpu.py) run the kernels' arithmetic without compiling
them, so a kernel that only fails in Triton's compiler (a type or layout error, a bad constexpr)
would reach main unnoticed. Here each wrapper runs on small CPU tensors with the launch recorded
instead of run, and every recorded launch is compiled to a cubin with its exact constexprs and
launch options.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

from dist_infer.engine import attention_gpu, fused_gpu, gemv_gpu  # noqa: E402
from dist_infer.engine.kv_cache import StepBatch  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
FP8 = torch.float8_e4m3fn
HEADS, KV_HEADS, HEAD_DIM, PAGE = 8, 2, 128, 16


def recorded_launches(call) -> list[tuple[JITFunction, dict, dict]]:
    """(kernel, arguments by parameter name, launch options) of every launch `call()` makes."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        launches.append((self, {**dict(zip([p.name for p in self.params], args)), **kwargs}, options))

    real = JITFunction.run
    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = real
    return launches


def compile_for_sm90(kernel: JITFunction, arguments: dict, options: dict):
    names = [p.name for p in kernel.params]
    signature = {p.name: "constexpr" if p.is_constexpr else mangle_type(arguments[p.name]) for p in kernel.params}
    constexprs = {(names.index(p.name),): arguments[p.name] for p in kernel.params if p.is_constexpr}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=SM90,
                          options=options)


def _decode_step(contexts: list[int]) -> StepBatch:
    pages = -(-max(contexts) // PAGE)
    return StepBatch.build([([0], c - 1, list(range(1 + i * pages, 1 + (i + 1) * pages)))
                            for i, c in enumerate(contexts)], PAGE)


def _cache(kv_dtype):
    k, v = (torch.randn(64 * PAGE, KV_HEADS, HEAD_DIM).to(kv_dtype) for _ in range(2))
    scales = (torch.ones(1), torch.ones(1)) if kv_dtype == FP8 else (None, None)
    return k, v, scales


def split_decode(kv_dtype, window):
    def call():
        k_cache, v_cache, scales = _cache(kv_dtype)
        b = _decode_step([40, 7])
        q = torch.randn(2, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        k, v = (torch.randn(2, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
        inv_freq = torch.rand(HEAD_DIM // 2)
        attention_gpu.rope_decode_split_attention(q, k, v, b.positions, inv_freq, 1.0, k_cache, v_cache,
                                                  b.slot_mapping, b.block_tables, b.context_lens_tensor, PAGE,
                                                  0.1, 8, window, *scales)
    return call


def plain_decode(kv_dtype, window):
    def call():
        k_cache, v_cache, scales = _cache(kv_dtype)
        b = _decode_step([40, 7])
        q = torch.randn(2, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        attention_gpu.paged_decode_attention(q, k_cache, v_cache, b.block_tables, b.context_lens_tensor, PAGE, 0.1,
                                             window, *scales)
    return call


def varlen(kv_dtype, window):
    """A prompt and a decode in one step: the varlen kernel and the decode kernel's second launch."""
    def call():
        k_cache, v_cache, scales = _cache(kv_dtype)
        b = StepBatch.build([([1] * 5, 0, [1]), ([1], 20, [2, 3])], PAGE)
        q = torch.randn(b.num_tokens, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        attention_gpu.paged_varlen_attention(q, k_cache, v_cache, b.block_tables, b.query_starts_tensor,
                                             b.context_lens_tensor, PAGE, 0.1, window, *scales)
    return call


def gemv(gated: bool):
    return lambda: gemv_gpu.gemv(torch.randn(1, (2 if gated else 1) * 1024, dtype=torch.bfloat16),
                                 torch.randn(512, 1024, dtype=torch.bfloat16), gated=gated)


def fused_fp8_producers():
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    fused_gpu.add_rmsnorm(x, torch.ones(256, dtype=torch.bfloat16), 1e-5, x.clone(), fp8_out=True)
    fused_gpu.silu_mul(torch.randn(3, 512, dtype=torch.bfloat16), fp8_out=True)
    k_cache, v_cache, scales = _cache(FP8)
    q = torch.randn(3, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    k, v = (torch.randn(3, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
    fused_gpu.rope_write_kv(q, k, v, torch.arange(3), torch.rand(HEAD_DIM // 2), 1.0, k_cache, v_cache,
                            torch.arange(3), *scales)


CASES = {
    "split decode, bf16 KV": split_decode(torch.bfloat16, None),
    "split decode, FP8 KV, window": split_decode(FP8, 16),
    "plain decode, bf16 KV": plain_decode(torch.bfloat16, None),
    "plain decode, FP8 KV, window": plain_decode(FP8, 16),
    "varlen prefill, bf16 KV": varlen(torch.bfloat16, None),
    "varlen prefill, FP8 KV, window": varlen(FP8, 16),
    "gemv": gemv(False),
    "gated gemv": gemv(True),
    "norm, SiLU-mul and RoPE write with FP8 outputs": fused_fp8_producers,
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_sm90(case):
    launches = recorded_launches(CASES[case])
    assert launches, "the wrapper launched no kernel"
    for kernel, arguments, options in launches:
        compiled = compile_for_sm90(kernel, arguments, options)
        assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin"
