"""Fused Triton kernels for the decode step's small operations.

At batch 1 a decode step is ~5 ms of weight reads; unfused, the norms, RoPE
and activation add ~40 tiny kernels per layer (~3 ms on an H100 even inside a
CUDA graph). Each function here is one kernel:
- `add_rmsnorm`: residual add + RMSNorm (float32 statistics, as transformers);
- `rope_write_kv`: RoPE on q (in place) and k, then k/v into the paged cache
  (quantized to FP8 with the layer's scales for --kv-cache-dtype fp8);
- `silu_mul`: SiLU(gate) * up on the fused gate_up projection.
`add_rmsnorm` and `silu_mul` can hand their output to an FP8 linear already quantized
per token (e4m3 + one float32 scale per row), which spares it a quantization kernel and
a round trip of the activation through memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


FP8_MAX = tl.constexpr(448.0)  # e4m3's largest finite value


@triton.jit
def _fp8_scale(amax):
    """quant._scale for e4m3: |y|max maps to 448; an all-zero row gets 1 (its codes are 0 anyway)."""
    return tl.where(amax > 0, amax / FP8_MAX, 1.0)


@triton.jit
def _store_fp8(QRow, cols, mask, y, scale):
    """y (float32, already rounded to the model dtype) / scale as e4m3, rounded as torch divides."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -FP8_MAX), FP8_MAX)
    tl.store(QRow + cols, q.to(QRow.dtype.element_ty), mask=mask)


@triton.jit
def _add_rmsnorm_kernel(X, Residual, W, Out, ResidualOut, Scales, stride_x, stride_r, stride_o, stride_ro, eps,
                        n_cols, HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(ResidualOut.dtype.element_ty)  # the residual stream stays in the model dtype
        tl.store(ResidualOut + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    normed = (x32 * rstd).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(X.dtype.element_ty)
    if FP8_OUT:  # the next linear's FP8 input, quantized per token here instead of by a kernel of its own
        scale = _fp8_scale(tl.max(tl.abs(y.to(tl.float32)), 0))  # masked columns hold 0
        tl.store(Scales + row, scale)
        _store_fp8(Out + row * stride_o, cols, mask, y.to(tl.float32), scale)
    else:
        tl.store(Out + row * stride_o + cols, y, mask=mask)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                fp8_out: bool = False) -> tuple:
    """x [N, H] (+ residual [N, H]) -> (RMSNorm(x + residual) * weight, x + residual). fp8_out:
    the normed rows as (e4m3 [N, H], float32 scales [N, 1]), per token, as the FP8 GEMM takes them."""
    n, h = x.shape
    out = torch.empty(n, h, dtype=torch.float8_e4m3fn if fp8_out else x.dtype, device=x.device)
    scales = torch.empty(n, 1, dtype=torch.float32, device=x.device) if fp8_out else out
    residual_out = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(h)
    _add_rmsnorm_kernel[(n,)](x, residual if residual is not None else x, weight, out, residual_out, scales,
                              x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                              residual_out.stride(0), eps, h, HAS_RESIDUAL=residual is not None, FP8_OUT=fp8_out,
                              BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return ((out, scales) if fp8_out else out), residual_out


@triton.jit
def to_cache_dtype(x, Scale, Cache, FP8: tl.constexpr):
    """A float32 value as the cache stores it: FP8 holds x / scale, clamped to e4m3's +-448."""
    if FP8:
        x = tl.clamp(x / tl.load(Scale), -448.0, 448.0)
    return x.to(Cache.dtype.element_ty)


@triton.jit
def _rope_write_kv_kernel(Q, K, V, Positions, InvFreq, KCache, VCache, Slots, KScale, VScale, scaling,
                          stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cs, stride_ch,
                          NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
                          HALF: tl.constexpr, HALF_PAD: tl.constexpr, FP8: tl.constexpr):
    # Grid: (tokens, query-head groups + KV-head groups); a program turns HEADS_PER_PROGRAM heads
    # of one token with one cos/sin table: [HEADS_PER_PROGRAM, HALF_PAD] tiles.
    token = tl.program_id(0)
    group = tl.program_id(1)
    q_groups = tl.cdiv(NUM_Q_HEADS, HEADS_PER_PROGRAM)
    i = tl.arange(0, HALF_PAD)
    pos = tl.load(Positions + token).to(tl.float32)
    freq = pos * tl.load(InvFreq + i, mask=i < HALF, other=0.0)
    cos = (tl.cos(freq) * scaling)[None, :]
    sin = (tl.sin(freq) * scaling)[None, :]
    if group < q_groups:
        h = group * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
        mask = (h < NUM_Q_HEADS)[:, None] & (i < HALF)[None, :]
        base = Q + token * stride_qn + h[:, None] * stride_qh + i[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(base, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mask)
        tl.store(base + HALF, (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=mask)
    else:
        h = (group - q_groups) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
        mask = (h < NUM_KV_HEADS)[:, None] & (i < HALF)[None, :]
        slot = tl.load(Slots + token)  # int64: slot * stride_cs passes 2^31 in large pools
        cache = slot * stride_cs + h[:, None] * stride_ch + i[None, :]
        kbase = K + token * stride_kn + h[:, None] * stride_kh + i[None, :]
        x1 = tl.load(kbase, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(kbase + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(KCache + cache, to_cache_dtype(x1 * cos - x2 * sin, KScale, KCache, FP8), mask=mask)
        tl.store(KCache + cache + HALF, to_cache_dtype(x2 * cos + x1 * sin, KScale, KCache, FP8), mask=mask)
        vbase = V + token * stride_vn + h[:, None] * stride_vh + i[None, :]
        v1 = tl.load(vbase, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(vbase + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(VCache + cache, to_cache_dtype(v1, VScale, VCache, FP8), mask=mask)
        tl.store(VCache + cache + HALF, to_cache_dtype(v2, VScale, VCache, FP8), mask=mask)


# Heads a program turns: 8 where there are many tokens (a prefill of 8,192 tokens, Llama-3-8B: 77 us
# against 203 us at one head a program, 40k programs instead of 328k); 1 for a few tokens, where
# the step wants every head in parallel (batch 1: 1.96 us against 2.44 us at 8 heads a program).
ROPE_HEADS_PER_PROGRAM = 8
ROPE_ONE_HEAD_MAX_TOKENS = 16


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, scaling: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """q [N, heads, hd] rotated in place; rotated k [N, kv, hd] and v go to cache slots.
    An FP8 cache (float8_e4m3fn) stores value / scale: k_scale, v_scale are its layer's
    one-element float32 scales."""
    n, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    half = head_dim // 2
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an FP8 KV cache needs its k_scale and v_scale")
    per_program = 1 if n <= ROPE_ONE_HEAD_MAX_TOKENS else min(ROPE_HEADS_PER_PROGRAM,
                                                               triton.next_power_of_2(max(heads, kv_heads)))
    groups = triton.cdiv(heads, per_program) + triton.cdiv(kv_heads, per_program)
    _rope_write_kv_kernel[(n, groups)](
        q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else k_cache, v_scale if fp8 else v_cache, scaling,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        NUM_Q_HEADS=heads, NUM_KV_HEADS=kv_heads, HEADS_PER_PROGRAM=per_program, HALF=half,
        HALF_PAD=triton.next_power_of_2(half), FP8=fp8, num_warps=1 if per_program * half <= 256 else 4)


@triton.jit
def silu_mul_chunk(GateUpRow, cols, mask, n_cols):
    """silu(gate) * up for columns `cols` of one row, rounded to the model dtype as the reference
    rounds (silu's output first), returned in float32."""
    dtype = GateUpRow.dtype.element_ty
    gate = tl.load(GateUpRow + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUpRow + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (act * up).to(dtype).to(tl.float32)


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_g, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = silu_mul_chunk(GateUp + row * stride_g, cols, mask, n_cols)
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_fp8_kernel(GateUp, Q, Scales, stride_g, stride_q, n_cols, BLOCK: tl.constexpr,
                         ONE_BLOCK: tl.constexpr):
    # One program per row. ONE_BLOCK: the whole row's product stays in registers between its |y|max
    # and its store. Otherwise pass 1 finds |y|max and pass 2 recomputes y (the row's gate/up are
    # still in L2) and stores it. No bf16 product is written either way.
    row = tl.program_id(0).to(tl.int64)
    gate_up = GateUp + row * stride_g
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = silu_mul_chunk(gate_up, cols, mask, n_cols)
        scale = _fp8_scale(tl.max(tl.abs(y), 0))
        tl.store(Scales + row, scale)
        _store_fp8(Q + row * stride_q, cols, mask, y, scale)
    else:
        absmax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            absmax = tl.maximum(absmax, tl.abs(silu_mul_chunk(gate_up, cols, cols < n_cols, n_cols)))
        scale = _fp8_scale(tl.max(absmax, 0))
        tl.store(Scales + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            _store_fp8(Q + row * stride_q, cols, mask, silu_mul_chunk(gate_up, cols, mask, n_cols), scale)


SILU_FP8_ONE_BLOCK_MAX = 16384  # widest row (intermediate size per rank) kept in registers whole


def silu_mul(gate_up: torch.Tensor, fp8_out: bool = False):
    """gate_up [N, 2I] -> silu(gate) * up [N, I]; fp8_out: as (e4m3 [N, I], float32 scales [N, 1]),
    per token, as the FP8 GEMM takes them."""
    n, two_i = gate_up.shape
    inter = two_i // 2
    if fp8_out:
        q = torch.empty(n, inter, dtype=torch.float8_e4m3fn, device=gate_up.device)
        scales = torch.empty(n, 1, dtype=torch.float32, device=gate_up.device)
        width = triton.next_power_of_2(inter)
        one_block = width <= SILU_FP8_ONE_BLOCK_MAX
        if n:
            _silu_mul_fp8_kernel[(n,)](gate_up, q, scales, gate_up.stride(0), q.stride(0), inter,
                                       BLOCK=width if one_block else 4096, ONE_BLOCK=one_block,
                                       num_warps=16 if width > 4096 else 8)
        return q, scales
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                     BLOCK=block, num_warps=4)
    return out
