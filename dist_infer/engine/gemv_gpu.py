"""A dense GEMV for one-row steps (batch-1 decode, the LM head of one sequence).

At one row a linear layer is a pure weight read. cuBLAS reads Llama-3-8B's weights at
2.8 TB/s at best, and 1.6 TB/s for o_proj in the graph step (docs/PERFORMANCE.md). This
kernel streams W in [BLOCK_N, BLOCK_K] tiles, a few output rows per program and 2,048
inputs per tile (PLAIN_LAUNCH), with no split-K (no partial sums, no second kernel). Where cuBLAS was
faster (two or more rows) GpuKernels keeps cuBLAS.

Gated (`gated=True`, a Llama MLP's down_proj): the input is the gate_up projection [2K] and each
tile's inputs are silu(gate) * up, rounded as fused_gpu.silu_mul rounds them, so the SiLU·mul
kernel and its output's round trip are gone; with the same launch config the result is bit for
bit the GEMV of silu_mul's output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_infer.engine.fused_gpu import silu_mul_chunk

GEMV_MAX_ROWS = 1  # rows up to which dense linears run here (H100: 2 and 4 rows are faster in cuBLAS)
# (output rows per program, inputs per tile, warps, pipeline stages): swept over 3 x 5 x 2 x 3 configs
# with scripts/bench_gemm.py's timing on the H100 (Llama-3-8B's linears, weights out of L2). Against
# the first config (8, 1024, 4, 2), in us: qkv_proj 21.7 -> 18.1, o_proj 14.5 -> 13.1, gate_up_proj
# 83.0 -> 76.1 (3.09 TB/s), LM head 354.7 -> 329.5 (3.19 TB/s). The gated form computes a tile's
# SiLU·mul once for all its rows: more rows a program pay (down_proj 44.9 -> 42.5).
PLAIN_LAUNCH = (2, 2048, 8, 2)
GATED_LAUNCH = (4, 2048, 4, 3)


@triton.jit
def _gemv_kernel(X, W, Bias, Out, N, K, stride_w, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # X [K] (GATED: [2K], gate | up); W [N, K] (row stride stride_w); Out [N] = W @ X (+ Bias), float32 accumulation
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if GATED:
            x = silu_mul_chunk(X, offs_k, k_mask, K)
        else:
            x = tl.load(X + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Out + offs_n, y.to(Out.dtype.element_ty), mask=n_mask)


def takes(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> bool:
    """Whether gemv() runs this linear: few enough rows, a half-precision weight in x's dtype
    (gated: x holds gate | up, twice the weight's inputs)."""
    rows = x.numel() // x.shape[-1]
    return (0 < rows <= GEMV_MAX_ROWS and weight.dtype == x.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1] * (2 if gated else 1))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
         launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] with one row (gated: [..., 2K], silu(gate) * up taken as the input); weight
    [N, K] -> [..., N] in x's dtype (F.linear's values up to the order of the float32 sums, which
    the launch config sets: `launch` overrides PLAIN_LAUNCH / GATED_LAUNCH)."""
    n, k = weight.shape
    row = x.reshape(x.shape[-1]).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = launch or (GATED_LAUNCH if gated else PLAIN_LAUNCH)
    block_k = min(block_k, max(triton.next_power_of_2(k), 128))  # a narrow layer masks no wasted lanes
    _gemv_kernel[(triton.cdiv(n, block_n),)](row, weight, bias if bias is not None else out, out, n, k,
                                             weight.stride(0), HAS_BIAS=bias is not None, GATED=gated,
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out.reshape(*x.shape[:-1], n)
