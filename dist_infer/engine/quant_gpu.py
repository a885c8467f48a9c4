"""CUDA ops behind engine/quant.py's `_kernel` seam (imported only for CUDA tensors).

INT8 / INT4 weight-only: Triton kernels that read the quantized weight once and
dequantize in registers, for up to FUSED_MAX_TOKENS rows (decode, and the
small mixed steps): a [tokens, in] x [in, out] GEMM tiled over out (and over in,
"split-K", when out alone gives too few programs to keep every SM reading). A
weight tile is loaded as int8 / packed nibbles / fp8, converted exactly to the
activation dtype and multiplied, and the scales are applied to the float32
partial sums, never to the weight tile:

    INT8:  y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
    INT4:  y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] q[n, k]
                      + offset[n, g] * sum_{k in g} x[m, k]

Each kernel has two inner products, picked per launch (`LaunchConfig.dot`):
tl.dot on the tensor cores (rows padded to 16), or a broadcast multiply + sum
on the CUDA cores (a GEMV: no padding, any tile width; for 1 to a few rows).
Split-K writes float32 partial sums [splits, tokens, out] that one small
kernel adds up and casts.

Launch configs (tile sizes, split-K, warps, pipeline stages, which inner
product) come from a table per mode and row bucket, with per-shape entries
(`TUNED_CONFIGS`, filled from scripts/tune_quant_kernels.py's JSON, or a JSON
named by $DIST_INFER_QUANT_CONFIGS); a shape without an entry takes its
bucket's "default", and a mode or bucket without one takes `LaunchConfig()`.

Past FUSED_MAX_TOKENS (prefill) the step is compute-bound: the weight is
dequantized to the activation dtype and cuBLAS runs the GEMM.

FP8: up to FP8_WEIGHT_ONLY_MAX_TOKENS rows (decode at small batch) the FP8
weights go through the INT8 kernel (an FP8 load instead of an int8 one; e4m3
converts exactly to bf16/fp16) with bf16/fp16 activations: W8A16, which reads
the same weight bytes as W8A8 without the activation-quantization kernels.
Past that, torch._scaled_mm on the FP8 tensor cores (per-token x per-channel
scales), on GPUs with FP8 (compute capability 8.9+), with fast accumulation
(FP8_FAST_ACCUM, as vLLM's and TensorRT-LLM's Hopper FP8 GEMMs run).

CUDA graphs: every op is a fixed sequence of kernel launches for a given
shape, chosen from the table by shapes alone, with no host synchronisation;
the only allocations are the output (and the split-K buffer) from torch's
caching allocator, the same size at every replay. Triton compiles a kernel
variant on its first call, which the graph runner's warm-up (two eager steps
per bucket) does before capturing; the row count is not specialised
(`do_not_specialize`), so one variant serves every row count of a BLOCK_M.

The kernels also run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1), which is how CI checks them (tests/engine/test_quant_kernels.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dist_infer.engine.kernels import QuantizedActivation
from dist_infer.engine.quant import dequantize_int4, fp8_linear_reference
from dist_infer.engine.splitk_gpu import programs_wanted, sum_splits
from dist_infer.errors import EngineError

FUSED_MAX_TOKENS = 64             # rows up to which the fused kernels run; beyond, dequantize + cuBLAS
FP8_WEIGHT_ONLY_MAX_TOKENS = 16   # rows up to which fp8 runs weight-only (W8A16); beyond, _scaled_mm
# Hopper's FP8 MMA accumulates in fewer bits than float32; without fast accumulation the GEMM adds its partial
# sums into float32 registers every few k-steps, which cost 12 % of the Llama-3-8B layer's GEMM time on an H100
# (scripts/bench_gemm.py). The error it adds is measured in tests/engine/test_quant_gpu.py and docs/PERFORMANCE.md.
FP8_FAST_ACCUM = True
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # row counts the table is tuned at; a call takes the next one up


# ---------------------------------------------------------------- launch configs


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_n: int = 64      # output features per program
    block_k: int = 128     # inputs per loop step (INT4: at most the group size)
    split_k: int = 0       # programs along the input dim; 0: enough for splitk_gpu.TARGET_PROGRAMS per SM
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = True       # tl.dot (tensor cores, rows padded to 16) or broadcast-multiply-sum (GEMV)


# Best configs per mode -> row bucket (str) -> "default" or "{out}x{in}" -> LaunchConfig fields:
# scripts/tune_quant_kernels.py's best_configs.json, as measured on an H100 80GB (its "meta" says when).
TUNED_CONFIGS = Path(__file__).with_name("quant_launch_configs_h100.json")

_table: dict[str, dict[str, dict[str, dict]]] = {}


def load_launch_configs(configs: dict | str | os.PathLike) -> None:
    """Merge a table (or a JSON file holding one, or a tuner output with a "configs" key) over the current one."""
    if not isinstance(configs, dict):
        with open(configs) as f:
            configs = json.load(f)
    configs = configs.get("configs", configs)
    for mode, buckets in configs.items():
        for bucket, shapes in buckets.items():
            for shape, fields in shapes.items():
                LaunchConfig(**fields)  # a bad field fails here, not at the first launch
                _table.setdefault(mode, {}).setdefault(str(bucket), {})[shape] = dict(fields)
    launch_config.cache_clear()


def clear_launch_configs() -> None:
    """Forget every tuned config: each launch takes LaunchConfig() (tests of the table's lookup)."""
    _table.clear()
    launch_config.cache_clear()


def _m_bucket(tokens: int) -> int:
    return next((b for b in M_BUCKETS if b >= tokens), M_BUCKETS[-1])


@functools.lru_cache(maxsize=None)
def launch_config(mode: str, tokens: int, out_features: int, in_features: int) -> LaunchConfig:
    """The table's config for `mode` at this many rows and this [out, in] weight."""
    shapes = _table.get(mode, {}).get(str(_m_bucket(tokens)), {})
    fields = shapes.get(f"{out_features}x{in_features}", shapes.get("default"))
    return LaunchConfig(**fields) if fields else LaunchConfig()


load_launch_configs(TUNED_CONFIGS)
if os.environ.get("DIST_INFER_QUANT_CONFIGS"):
    load_launch_configs(os.environ["DIST_INFER_QUANT_CONFIGS"])


# ---------------------------------------------------------------- shared tiling


@triton.jit
def _tile_dot(x, w, DOT: tl.constexpr, IEEE: tl.constexpr):
    """x [BLOCK_M, K] @ w [BLOCK_N, K]^T -> float32 [BLOCK_M, BLOCK_N]. w is already in x's dtype when DOT."""
    if DOT:
        if IEEE:  # float32 inputs in full precision (not TF32)
            return tl.dot(x, tl.trans(w), input_precision="ieee")
        return tl.dot(x, tl.trans(w))
    # GEMV: [BLOCK_M, 1, K] * [1, BLOCK_N, K], summed over K on the CUDA cores
    return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _store_tile(Out, acc, offs_m, offs_n, split, M, N):
    # Out: [splits, M, N] float32 partial sums, or [M, N] in the output dtype when splits == 1
    ptrs = Out + split * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _block_m(tokens: int, dot: bool) -> int:
    rows = triton.next_power_of_2(tokens)
    return max(16, rows) if dot else rows  # tl.dot needs >= 16 rows


def _splits(cfg: LaunchConfig, programs: int, k_tiles: int, wanted: int) -> int:
    """cfg.split_k, or (0) enough splits for about `wanted` programs, each with >= 4 K tiles."""
    if cfg.split_k:
        return max(1, min(cfg.split_k, k_tiles))
    return max(1, min(wanted // programs, k_tiles // 4))


def _launch(kernel, x: torch.Tensor, out_features: int, in_features: int, cfg: LaunchConfig, *weights, **constants):
    """x [M, in] -> [M, out] in x's dtype through `kernel`, split-K as cfg says."""
    tokens = x.shape[0]
    block_m = _block_m(tokens, cfg.dot)
    n_blocks, m_blocks = triton.cdiv(out_features, cfg.block_n), triton.cdiv(tokens, block_m)
    k_tiles = triton.cdiv(in_features, cfg.block_k)
    splits = _splits(cfg, n_blocks * m_blocks, k_tiles, programs_wanted(x))
    k_per_split = triton.cdiv(k_tiles, splits) * cfg.block_k
    splits = triton.cdiv(in_features, k_per_split)
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)  # [M, N]
    target = out if splits == 1 else torch.empty(splits, tokens, out_features, dtype=torch.float32, device=x.device)
    kernel[(n_blocks, m_blocks, splits)](
        x, *weights, target, tokens, out_features, in_features, x.stride(0), k_per_split,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT=cfg.dot, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constants)
    return sum_splits(target, out) if splits > 1 else out


def _fused(x: torch.Tensor, max_tokens: int = FUSED_MAX_TOKENS) -> bool:
    return x.shape[0] <= max_tokens and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()  # [M, in]


# ---------------------------------------------------------------- INT8 (and FP8 weight-only), per output channel


@triton.jit(do_not_specialize=["M"])
def _int8_kernel(X, W, Scales, Out, M, N, K, stride_xm, K_PER_SPLIT,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                 IEEE: tl.constexpr):
    # X [M, K] activations; W [N, K] int8 or float8_e4m3fn; Scales [N] float32; Out [splits, M, N] or [M, N]
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)   # [BLOCK_M, BLOCK_K]
        w = tl.load(W + offs_n[:, None] * K + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)   # [BLOCK_N, BLOCK_K]
        acc += _tile_dot(x, w.to(x.dtype), DOT, IEEE)  # int8 / e4m3 -> bf16/fp16/fp32 is exact
    scales = tl.load(Scales + offs_n, mask=offs_n < N, other=0.0)
    _store_tile(Out, acc * scales[None, :], offs_m, offs_n, split, M, N)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *,
                config: LaunchConfig | None = None) -> torch.Tensor:
    # x [..., in] bf16/fp16/fp32; qweight int8 [out, in]; scales float32 [out] -> [..., out]
    out_features, in_features = qweight.shape
    rows = _rows(x)
    if not _fused(rows):
        return F.linear(x, qweight.to(x.dtype) * scales.to(x.dtype)[:, None])
    cfg = config or launch_config("int8_wo", rows.shape[0], out_features, in_features)
    y = _launch(_int8_kernel, rows, out_features, in_features, cfg, qweight, scales)
    return y.reshape(*x.shape[:-1], out_features)


# ---------------------------------------------------------------- INT4, per group, with offsets


@triton.jit(do_not_specialize=["M"])
def _int4_kernel(X, W, Scales, Offsets, Out, M, N, K, stride_xm, K_PER_SPLIT,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                 IEEE: tl.constexpr, GROUP: tl.constexpr):
    # X [M, K]; W [N, K/2] uint8 (input 2j low nibble, 2j+1 high); Scales, Offsets [N, K/GROUP];
    # one K tile lies inside one group (GROUP % BLOCK_K == 0), so its scale/offset are [BLOCK_N] vectors.
    HALF: tl.constexpr = BLOCK_K // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    n_mask, m_mask = offs_n < N, offs_m < M
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):  # K is a multiple of GROUP, so every tile is whole
        offs_p = k0 // 2 + tl.arange(0, HALF)  # packed columns
        packed = tl.load(W + offs_n[:, None] * (K // 2) + offs_p[None, :], mask=n_mask[:, None], other=0)
        # packed: [BLOCK_N, HALF] uint8; x read contiguously as [BLOCK_M, HALF, 2] (even, odd inputs)
        x_ptrs = X + offs_m[:, None, None] * stride_xm + 2 * offs_p[None, :, None] + tl.arange(0, 2)[None, None, :]
        x_even, x_odd = tl.split(tl.load(x_ptrs, mask=m_mask[:, None, None], other=0.0))  # [BLOCK_M, HALF] each
        low = (packed & 0xF).to(x_even.dtype)   # codes of inputs 2j   [BLOCK_N, HALF]
        high = (packed >> 4).to(x_even.dtype)   # codes of inputs 2j+1
        codes_dot = _tile_dot(x_even, low, DOT, IEEE) + _tile_dot(x_odd, high, DOT, IEEE)   # [BLOCK_M, BLOCK_N]
        x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)              # [BLOCK_M]
        g = k0 // GROUP
        scale = tl.load(Scales + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)    # [BLOCK_N]
        offset = tl.load(Offsets + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += codes_dot * scale[None, :] + x_sum[:, None] * offset[None, :]
    _store_tile(Out, acc, offs_m, offs_n, split, M, N)


def int4_block_k(group_size: int, block_k: int = 128) -> int | None:
    """K tile of the INT4 kernel: inside one group (a divisor of it), and >= 32 (16 packed bytes:
    tl.dot's minimum); None when the group allows none."""
    if group_size < 32:
        return None
    block_k = min(block_k, group_size)
    while group_size % block_k:
        block_k //= 2
    return block_k if block_k >= 32 else None


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, *,
                config: LaunchConfig | None = None) -> torch.Tensor:
    # x [..., in]; qweight uint8 [out, in/2]; scales, offsets [out, in/group] -> [..., out]
    out_features, in_features = qweight.shape[0], 2 * qweight.shape[1]
    group_size = in_features // scales.shape[1]
    rows = _rows(x)
    cfg = config or launch_config("int4_wo", rows.shape[0], out_features, in_features)
    block_k = int4_block_k(group_size, cfg.block_k)
    if not _fused(rows) or block_k is None:
        return F.linear(x, dequantize_int4(qweight, scales, offsets).to(x.dtype))
    cfg = dataclasses.replace(cfg, block_k=block_k)
    y = _launch(_int4_kernel, rows, out_features, in_features, cfg, qweight, scales, offsets, GROUP=group_size)
    return y.reshape(*x.shape[:-1], out_features)


# ---------------------------------------------------------------- FP8


@functools.cache
def _check_fp8(device_index: int) -> None:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 9):
        raise EngineError(f"--quant fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                          f"{torch.cuda.get_device_name(device_index)} is {major}.{minor}. Rebuild the engine with "
                          "--quant int8_wo (or int4_wo).")


def fp8_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *,
                           config: LaunchConfig | None = None) -> torch.Tensor:
    """x [..., in] bf16/fp16/fp32 -> [..., out]: FP8 weights dequantized in registers, x unquantized (W8A16)."""
    out_features, in_features = qweight.shape
    rows = _rows(x)
    cfg = config or launch_config("fp8", rows.shape[0], out_features, in_features)
    y = _launch(_int8_kernel, rows, out_features, in_features, cfg, qweight, scales)
    return y.reshape(*x.shape[:-1], out_features)


@triton.jit(do_not_specialize=["N"])
def _fp8_per_token_kernel(X, Q, Scales, N, stride_x, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: pass 1 finds |x|max, pass 2 writes x / scale as e4m3 (the row stays in L2).
    row = tl.program_id(0).to(tl.int64)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        absmax = tl.maximum(absmax, tl.abs(tl.load(X + row * stride_x + offs, mask=offs < N, other=0.0).to(tl.float32)))
    amax = tl.max(absmax, axis=0)
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)  # quant._scale: an all-zero row gets 1
    tl.store(Scales + row, scale)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + offs, mask=offs < N, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)  # rounded as torch divides
        tl.store(Q + row * N + offs, q.to(Q.dtype.element_ty), mask=offs < N)


def fp8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, in] -> (e4m3 [M, in], float32 scales [M, 1]) in one kernel: the same values as
    quant.quantize_fp8_per_token, without its float32 copies of x (at an 8k-token prefill step
    those are 0.5 GB of traffic per down_proj)."""
    rows, n = x.shape
    q = torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        _fp8_per_token_kernel[(rows,)](x, q, scales, n, x.stride(0), FP8_MAX=torch.finfo(q.dtype).max,
                                       BLOCK=min(triton.next_power_of_2(n), 4096), num_warps=8)
    return q, scales


def fp8_takes_quantized_input(rows: int) -> bool:
    """Whether fp8_linear runs the W8A8 GEMM at this row count (and so takes its input quantized)."""
    return rows > FP8_WEIGHT_ONLY_MAX_TOKENS


def fp8_scaled_mm_linear(x: torch.Tensor | QuantizedActivation, qweight: torch.Tensor,
                         scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] (or already quantized per token) -> [..., out]: FP8 x FP8 on the tensor cores."""
    out_features, in_features = qweight.shape
    if in_features % 16 or out_features % 16:  # _scaled_mm's alignment; such layers are rare and small
        return fp8_linear_reference(x, qweight, scales)
    lead = x.shape[:-1]
    if not isinstance(x, QuantizedActivation):
        x = QuantizedActivation(*fp8_quantize_per_token(_rows(x)), x.dtype)  # [N, in] fp8, [N, 1] float32
    y = torch._scaled_mm(x.values, qweight.t(), scale_a=x.scales, scale_b=scales[None, :], out_dtype=x.dtype,
                         use_fast_accum=FP8_FAST_ACCUM)
    return y.reshape(*lead, out_features)


def fp8_linear(x: torch.Tensor | QuantizedActivation, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out]: W8A16 up to FP8_WEIGHT_ONLY_MAX_TOKENS rows, W8A8 _scaled_mm beyond
    (where the norm or activation before may have quantized x already: kernels.QuantizedActivation)."""
    _check_fp8(x.device.index or 0)
    if not isinstance(x, QuantizedActivation) and _fused(_rows(x), FP8_WEIGHT_ONLY_MAX_TOKENS):
        return fp8_weight_only_linear(x, qweight, scales)
    return fp8_scaled_mm_linear(x, qweight, scales)
