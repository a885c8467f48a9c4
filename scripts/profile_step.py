"""Per-kernel device time of one decode step (eager, so the profiler sees each
kernel; the CUDA-graph replay runs the same kernels), or with --prefill-len of
one prefill step (every sequence brings that many prompt tokens). One GPU, or with
--tp N one rank of N under mpirun (rank 0 prints its kernels; the all-reduces included).

    python3 scripts/profile_step.py --model llama-3-8b --batch 1 --context 192
    python3 scripts/profile_step.py --model llama-3-8b --batch 64 --prefill-len 128
    python3 scripts/profile_step.py --batch 1024 --quant fp8 --kv-cache-dtype fp8
    mpirun -n 2 -x NCCL_NVLS_ENABLE=0 python3 scripts/profile_step.py --tp 2 --batch 1

Random weights; with --quant, random codes in the mode's storage dtype (the kernels are what is measured).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dist_infer.bench import preset_config, random_rank_weights
from dist_infer.comm import ParallelGroups
from dist_infer.comm.bootstrap import resolve_device, world_from_launch
from dist_infer.config import BuildConfig, KVCacheConfig, Mapping, ModelConfig, QUANT_MODES
from dist_infer.engine.build import DTYPES
from dist_infer.engine.kv_cache import StepBatch
from dist_infer.engine.model import StageModel
from dist_infer.engine.runtime import EngineSpec, load_rank_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--prefill-len", type=int, default=0, help="profile a prefill of this many tokens a sequence")
    parser.add_argument("--quant", choices=QUANT_MODES, default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--unfused-act-quant", action="store_true",
                        help="fp8: quantize each linear's input in a kernel of its own (as before the norms and "
                             "silu_mul emitted FP8), the baseline of the fused path")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch that many ranks)")
    args = parser.parse_args()

    if args.unfused_act_quant:
        from dist_infer.engine import quant_gpu
        quant_gpu.fp8_takes_quantized_input = lambda rows: False  # no producer quantizes; fp8_linear does
    world = world_from_launch()
    device = torch.device(resolve_device("cuda", world.rank))
    cfg = ModelConfig.from_hf(preset_config(args.model))
    context = max(args.context, args.prefill_len)
    build = BuildConfig(dtype="bfloat16", max_batch_size=args.batch, max_seq_len=context + 16,
                        quant=args.quant)
    mapping = Mapping(tp=args.tp)
    vocab = -(-cfg.vocab_size // args.tp) * args.tp
    spec = EngineSpec(None, cfg, mapping, build, vocab, {})
    groups = ParallelGroups.build(world, mapping, str(device))
    with torch.device("meta"):
        shapes = StageModel(cfg, groups.mapping, groups.tp, vocab, DTYPES["bfloat16"], build.quant_config)
    engine = load_rank_engine(spec, groups, str(device), verify=False, cuda_graphs=False,
                              weights=random_rank_weights(shapes, device, groups.mapping.rank),
                              kv_cache=KVCacheConfig(dtype=args.kv_cache_dtype))
    per_seq = spec.blocks_per_seq
    new_tokens, start = ([1] * args.prefill_len, 0) if args.prefill_len else ([1], args.context - 1)
    seqs = [(new_tokens, start, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))) for i in range(args.batch)]
    batch = StepBatch.build(seqs, build.kv_block_size, device)
    x = batch.input_ids
    for _ in range(3):
        engine.step(x, batch)
    torch.cuda.synchronize()
    steps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step(x, batch)
        torch.cuda.synchronize()
    if world.rank == 0:
        print_profile(prof, steps, args, engine)
    engine.close()
    torch.cuda.synchronize()
    groups.close()


def print_profile(prof, steps: int, args, engine) -> None:
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))
    total_us = sum(e.device_time_total for e in prof.key_averages()) / steps
    kind = f"prefill step of {args.batch} x {args.prefill_len} tokens" if args.prefill_len else "decode step"
    print(f"device time per {kind}, tp={args.tp} (eager, sum of kernels): {total_us / 1e3:.3f} ms; "
          f"weights {sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
