"""Device time of the paged decode attention kernel per launch config, bf16 and FP8 KV, at the
max-load shape (Llama-3-8B: 32 query heads over 8 KV heads, head dim 128; 16-token pages).

    python3 scripts/tune_decode_attention.py --batch 64 1024 --context 192 1024
    python3 scripts/tune_decode_attention.py --current-only --shapes 1024:192 1024:1024 256:512 64:1024 16:2048

--current-only times the launch configs in use (best of 3 runs of 50 calls) instead of sweeping: run it from two trees
(PYTHONPATH=TREE) to compare their kernels.

Prints one row per (KV dtype, batch, context, config): microseconds per call and GB/s of KV read;
the best config per KV dtype (summed over the shapes) last. DECODE_LAUNCH in
dist_infer/engine/attention_gpu.py holds the chosen ones (DEFAULT_DECODE_LAUNCH otherwise).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from dist_infer.engine.attention_gpu import decode_launch, paged_decode_attention

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CONFIGS = [(n, w, s) for n, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))]


def make_case(batch: int, context: int, kv_dtype: torch.dtype):
    pages = -(-context // PAGE)
    slots = (batch * pages + 1) * PAGE
    k = torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda").to(kv_dtype)
    v = torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda").to(kv_dtype)
    tables = (1 + torch.randperm(batch * pages, device="cuda")).view(batch, pages)  # scattered pages
    lens = torch.full((batch,), context, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    scales = (torch.ones(1, device="cuda"), torch.ones(1, device="cuda")) if kv_dtype != torch.bfloat16 else (None, None)
    return q, k, v, tables, lens, scales


def time_us(fn, reps: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--context", type=int, nargs="+", default=[192, 1024])
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCH:CONTEXT pairs instead of --batch x --context")
    parser.add_argument("--current-only", action="store_true", help="time the configs in use only (best of 3)")
    args = parser.parse_args()
    shapes = ([tuple(map(int, s.split(":"))) for s in args.shapes] if args.shapes
              else list(itertools.product(args.batch, args.context)))
    totals: dict[tuple, float] = {}
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        current = decode_launch(torch.empty(0, dtype=kv_dtype).element_size())
        for batch, context in shapes:
            q, k, v, tables, lens, scales = make_case(batch, context, kv_dtype)
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k.element_size()
            for cfg in [current] if args.current_only else CONFIGS:
                runs, reps = (3, 50) if args.current_only else (1, 20)
                us = min(time_us(lambda: paged_decode_attention(q, k, v, tables, lens, PAGE, 0.088, None, *scales,
                                                                launch=cfg), reps) for _ in range(runs))
                totals[kv_dtype, cfg] = totals.get((kv_dtype, cfg), 0.0) + us
                mark = " (current)" if cfg == decode_launch(k.element_size()) else ""
                print(f"{str(kv_dtype)[6:]:>14} b{batch:<5} ctx{context:<5} {cfg}: {us:9.1f} us "
                      f"{kv_bytes / us / 1e3:7.0f} GB/s{mark}")
            del q, k, v
    if args.current_only:
        return
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        best = min(CONFIGS, key=lambda c: totals[kv_dtype, c])
        size = torch.empty(0, dtype=kv_dtype).element_size()
        print(f"best {kv_dtype}: {best} total {totals[kv_dtype, best]:.0f} us; current "
              f"{decode_launch(size)} total {totals[kv_dtype, decode_launch(size)]:.0f} us")


if __name__ == "__main__":
    main()
