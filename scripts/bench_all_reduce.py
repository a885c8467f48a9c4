"""All-reduce latency per message size: the one-shot IPC kernel against NCCL, same ranks, same call.

    mpirun -n 2 -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1 -x NVSHMEM_DISABLE_NVLS=1 \\
        python3 scripts/bench_all_reduce.py [--out FILE.json]

Each op runs `--calls` times back to back inside one CUDA graph (as in a decode step), the graph
is replayed `--replays` times, and rank 0 prints the median microseconds per call (CUDA events).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from dist_infer.comm import ParallelGroups, world_from_launch
from dist_infer.comm.bootstrap import resolve_device
from dist_infer.comm.custom_all_reduce import CustomAllReduce
from dist_infer.config import Mapping

SIZES_KB = [2, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536]


def time_graph(fn, x: torch.Tensor, calls: int, replays: int) -> float:
    """Median microseconds per call of `fn(x)` replayed from a graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)  # warm-up: module load, NCCL's first-use setup
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    per_call = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    world = world_from_launch()
    device = torch.device(resolve_device("cuda", world.rank))
    tp = ParallelGroups.build(world, Mapping(tp=world.size, pp=1), "cuda").tp
    custom = CustomAllReduce(world, device, max_bytes=max(SIZES_KB) * 1024)
    stream_of = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    nccl = lambda x: tp.comm.allreduce(x, x, tp._nccl.SUM, stream=stream_of())  # noqa: E731
    rows = []
    for kb in SIZES_KB:
        x = torch.randn(kb * 512, device=device).to(torch.bfloat16)  # kb KB of bf16
        world.barrier()
        row = {"kb": kb, "nccl_us": time_graph(nccl, x, args.calls, args.replays),
               "one_shot_us": time_graph(custom.all_reduce, x, args.calls, args.replays)}
        row["speedup"] = row["nccl_us"] / row["one_shot_us"]
        rows.append(row)
        if world.rank == 0:
            print(f"[ALLREDUCE] {kb:>6} KB  nccl {row['nccl_us']:8.2f} us  one-shot {row['one_shot_us']:8.2f} us  "
                  f"{row['speedup']:.2f}x", flush=True)
    if world.rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"world": world.size, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    custom.close()


if __name__ == "__main__":
    main()
