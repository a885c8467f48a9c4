"""Device time of the paged varlen (prefill) attention kernel per launch config, bf16 and FP8 KV, beside
torch's flash SDPA on contiguous K/V (the same causal prompts without pages or decodes: a reference).
Llama-3-8B heads: 32 query heads over 8 KV heads, head dim 128; 16-token pages, scattered.

    python3 scripts/tune_prefill_attention.py --shapes 4:2048 64:128 1:8192 3:2048+124@2100
    python3 scripts/tune_prefill_attention.py --current-only --shapes 4:2048 64:128

A shape P:L[+D@C] is P fresh prompts of L tokens in one step, plus D decoding sequences at context C (a
mixed step). Prints microseconds per call and TFLOP/s of the prompts' causal attention (4 * heads *
head_dim * L * (L + 1) / 2 a prompt); the best config per KV dtype (summed over the shapes) last.
VARLEN_LAUNCH in dist_infer/engine/attention_gpu.py holds the chosen one. --current-only times the
config in use (best of 3), through the call's defaults, so it also runs against trees from before the launch
argument: run it with PYTHONPATH=TREE for two trees to compare their kernels.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from tune_decode_attention import time_us  # scripts/ is first on sys.path when a script runs

from dist_infer.engine import attention_gpu

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CONFIGS = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]


def parse_shape(shape: str) -> tuple[int, int, int, int]:
    prompts, _, decodes = shape.partition("+")
    p, length = map(int, prompts.split(":"))
    d, context = map(int, decodes.split("@")) if decodes else (0, 0)
    return p, length, d, context


def make_case(rows: list[tuple[int, int]], kv_dtype: torch.dtype):
    """rows: (context after the step, new tokens) per sequence; its pages scattered over the pool."""
    pages = [-(-ctx // PAGE) for ctx, _ in rows]
    slots = (sum(pages) + 1) * PAGE
    k = torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda").to(kv_dtype)
    v = torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda").to(kv_dtype)
    order = (1 + torch.randperm(sum(pages), device="cuda")).int()
    tables = torch.zeros(len(rows), max(pages), dtype=torch.int32, device="cuda")
    for i, (offset, n) in enumerate(zip(itertools.accumulate([0] + pages), pages)):
        tables[i, :n] = order[offset:offset + n]
    lens = torch.tensor([ctx for ctx, _ in rows], device="cuda", dtype=torch.int32)
    starts = torch.tensor(list(itertools.accumulate([0] + [new for _, new in rows])), device="cuda",
                          dtype=torch.int32)
    q = torch.randn(int(starts[-1]), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    unscaled = kv_dtype == torch.bfloat16
    scales = (None, None) if unscaled else (torch.ones(1, device="cuda"), torch.ones(1, device="cuda"))
    return q, k, v, tables, starts, lens, scales


def sdpa_us(prompts: int, length: int) -> float:
    """torch's flash attention on [prompts, heads, length, head_dim] with GQA: no pages, no varlen."""
    q = torch.randn(prompts, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(prompts, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return min(time_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
                   for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["4:2048", "64:128", "1:8192", "3:2048+124@2100"],
                        help="PROMPTS:LENGTH[+DECODES@CONTEXT]")
    parser.add_argument("--current-only", action="store_true", help="time the configs in use only (best of 3)")
    args = parser.parse_args()
    totals: dict[tuple, float] = {}
    dtypes = (torch.bfloat16, torch.float8_e4m3fn)
    for shape in args.shapes:
        prompts, length, decodes, context = parse_shape(shape)
        flop = 4 * HEADS * HEAD_DIM * length * (length + 1) / 2 * prompts
        for kv_dtype in dtypes:
            current = getattr(attention_gpu, "VARLEN_LAUNCH", None)  # None: a tree from before the constant
            q, k, v, tables, starts, lens, scales = make_case([(length, length)] * prompts + [(context, 1)] * decodes,
                                                              kv_dtype)
            for cfg in [current] if args.current_only else CONFIGS:
                runs, reps = (3, 20) if args.current_only else (1, 10)
                launch = {} if args.current_only else {"launch": cfg}  # the tree's own default: any tree runs
                try:
                    us = min(time_us(lambda: attention_gpu.paged_varlen_attention(
                        q, k, v, tables, starts, lens, PAGE, 0.088, None, *scales, **launch), reps)
                        for _ in range(runs))
                except Exception as exc:  # a config past the shared memory or registers: not a candidate
                    print(f"{shape:>16} {str(kv_dtype)[6:]:>14} {cfg}: failed ({type(exc).__name__})")
                    us = float("inf")
                totals[kv_dtype, cfg] = totals.get((kv_dtype, cfg), 0.0) + us
                mark = " (current)" if cfg == current else ""
                print(f"{shape:>16} {str(kv_dtype)[6:]:>14} {cfg}: {us:9.1f} us {flop / us / 1e6:6.0f} TFLOP/s{mark}")
            del q, k, v
        if not prompts:
            continue
        us = sdpa_us(prompts, length)
        print(f"{shape:>16} {'sdpa flash':>14} (prompts only, contiguous): {us:9.1f} us {flop / us / 1e6:6.0f} TFLOP/s")
    if args.current_only:
        return
    for kv_dtype in dtypes:
        best = min(CONFIGS, key=lambda c: totals[kv_dtype, c])
        current = attention_gpu.VARLEN_LAUNCH
        print(f"best {kv_dtype}: {best} total {totals[kv_dtype, best]:.0f} us; current {current} "
              f"total {totals[kv_dtype, current]:.0f} us")


if __name__ == "__main__":
    main()
