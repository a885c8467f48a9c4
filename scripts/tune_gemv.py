"""Device time of gemv_gpu's one-row GEMV per launch config at Llama-3-8B's linears (TP=1), each
call on the next of enough weight copies that no call finds its weight in L2, as in a step.

    python3 scripts/tune_gemv.py
    python3 scripts/tune_gemv.py --block-n 2 4 8 --block-k 1024 2048 4096

Prints per linear the current config's time (PLAIN_LAUNCH, or GATED_LAUNCH for the gated
down_proj) and the five fastest configs; gemv_gpu.py holds the chosen ones.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import time_us  # noqa: E402

from dist_infer.engine import gemv_gpu  # noqa: E402

# (name, out, in, gated): the gated down_proj takes gate_up [2 * in]
SHAPES = [("qkv_proj", 6144, 4096, False), ("o_proj", 4096, 4096, False), ("gate_up_proj", 28672, 4096, False),
          ("down_proj (gated)", 4096, 14336, True), ("lm_head", 128256, 4096, False)]


def sweep(out_f: int, in_f: int, gated: bool, configs: list[tuple[int, int, int, int]], iters: int):
    copies = max(2, -(-400_000_000 // (out_f * in_f * 2)))
    weights = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, (2 if gated else 1) * in_f, device="cuda", dtype=torch.bfloat16)
    turn = itertools.count()
    return sorted((time_us(lambda: gemv_gpu.gemv(x, weights[next(turn) % copies], gated=gated, launch=c), iters), c)
                  for c in configs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--block-n", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--block-k", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    configs = list(itertools.product(args.block_n, args.block_k, args.warps, args.stages))
    for name, out_f, in_f, gated in SHAPES:
        current = gemv_gpu.GATED_LAUNCH if gated else gemv_gpu.PLAIN_LAUNCH
        results = sweep(out_f, in_f, gated, sorted(set(configs) | {current}), args.iters)
        gb = out_f * in_f * 2 / 1e9
        now = next(t for t, c in results if c == current)
        best = "  ".join(f"{c} {t:.1f} us ({gb / t * 1e6:.0f} GB/s)" for t, c in results[:5])
        print(f"{name:>18} {out_f}x{in_f}: current {current} {now:.1f} us ({gb / now * 1e6:.0f} GB/s); best {best}",
              flush=True)


if __name__ == "__main__":
    main()
