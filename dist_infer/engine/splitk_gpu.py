"""What the split-K kernels share (quant_gpu's GEMMs, moe_gpu's down projection): how many
programs fill the GPU, and the reduction of float32 partial sums into the output."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 2  # programs per SM that automatic split-K aims for
REDUCE_BLOCK = 1024  # elements per program of the partial-sum reduction


@triton.jit(do_not_specialize=["SIZE", "SPLITS"])
def _sum_splits_kernel(Partial, Out, SIZE, SPLITS, BLOCK: tl.constexpr):
    # Partial [SPLITS, SIZE] float32 -> Out [SIZE] in the output dtype
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(Partial + s * SIZE + offs, mask=mask, other=0.0)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


def sum_splits(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """partial [splits, *out.shape] float32 -> out (its dtype), summed in split order."""
    size = out.numel()
    _sum_splits_kernel[(triton.cdiv(size, REDUCE_BLOCK),)](partial, out, size, partial.shape[0],
                                                           BLOCK=REDUCE_BLOCK, num_warps=4)
    return out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device; an H100's count under the interpreter (CPU tensors)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 132


def programs_wanted(x: torch.Tensor) -> int:
    """Programs that fill the GPU x lives on, TARGET_PROGRAMS per SM."""
    return TARGET_PROGRAMS * sm_count(x.device)
