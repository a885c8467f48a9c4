"""Device time of a small decode step's RoPE + KV write + attention: fused_gpu.rope_write_kv and the
plain decode kernel against attention_gpu's split-context kernel (with its merge) per (keys per
iteration, ranges), Llama-3-8B heads (32 over 8 KV heads, head dim 128), bf16 and FP8 KV, graph replays.

    python3 scripts/tune_split_decode.py --batch 1 4 8 --context 192 1024 4096

A `*` marks the ranges attention_gpu.decode_splits picks for the batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import time_us  # noqa: E402

from dist_infer.engine import attention_gpu, fused_gpu  # noqa: E402
from dist_infer.engine.kv_cache import StepBatch  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def case(batch: int, context: int, kv_dtype: torch.dtype) -> dict:
    pages = -(-context // PAGE)
    slots = (batch * pages + 1) * PAGE
    cache = [torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda").to(kv_dtype) for _ in range(2)]
    scales = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda")) if kv_dtype != torch.bfloat16 else (None, None)
    seqs = [([0], context - 1, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(batch)]
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    inv_freq = (1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))).cuda()
    return dict(q=q, k=k, v=v, cache=cache, scales=scales, step=StepBatch.build(seqs, PAGE, "cuda"), inv_freq=inv_freq)


def plain(c: dict):
    b, (kc, vc) = c["step"], c["cache"]
    fused_gpu.rope_write_kv(c["q"], c["k"], c["v"], b.positions, c["inv_freq"], 1.0, kc, vc, b.slot_mapping, *c["scales"])
    return attention_gpu.paged_decode_attention(c["q"], kc, vc, b.block_tables, b.context_lens_tensor, PAGE, 0.088,
                                                None, *c["scales"])


def split(c: dict, splits: int):
    b, (kc, vc) = c["step"], c["cache"]
    return attention_gpu.rope_decode_split_attention(c["q"], c["k"], c["v"], b.positions, c["inv_freq"], 1.0, kc, vc,
                                                     b.slot_mapping, b.block_tables, b.context_lens_tensor, PAGE,
                                                     0.088, splits, None, *c["scales"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--context", type=int, nargs="+", default=[192, 1024, 4096])
    p.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--splits", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    default_block_n = attention_gpu.SPLIT_BLOCK_N
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for batch in args.batch:
            picked = attention_gpu.decode_splits(batch, KV_HEADS, torch.device("cuda"))
            for context in args.context:
                c = case(batch, context, kv_dtype)
                row = [f"{str(kv_dtype)[6:]:>13} b{batch:<3} ctx{context:<5} plain {time_us(lambda: plain(c), args.iters):6.2f}"]
                for block_n in args.block_n:
                    attention_gpu.SPLIT_BLOCK_N = block_n
                    for s in args.splits:
                        t = time_us(lambda: split(c, s), args.iters)
                        row.append(f"n{block_n}s{s}{'*' if s == picked and block_n == default_block_n else ''} {t:6.2f}")
                attention_gpu.SPLIT_BLOCK_N = default_block_n
                print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
