"""Where the wall time of a max-load run goes (issue #12): one GPU, TP=1, random weights at a
preset's shape, every request submitted at once through the real LLMEngine (as `dist-infer bench
--num-requests`). Prints the device time of the steps (prefill-bearing and pure decode) from CUDA
events, and the host time of each phase of the engine loop that the GPU may wait on.

    python3 scripts/profile_max_load.py --model llama-3-8b --num-requests 1024 --max-batch-size 1024
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import functools
import pstats
import time

import torch

from dist_infer.bench import max_load_requests, preset_config, random_rank_weights, run_max_load
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig, KVCacheConfig, Mapping, ModelConfig, QUANT_MODES
from dist_infer.engine.build import DTYPES
from dist_infer.engine.kv_cache import StepBatch
from dist_infer.engine.model import StageModel
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.workers.llm_engine import EngineOptions, LLMEngine
from dist_infer.workers.run import prepare_gc_for_steps
from dist_infer.workers.worker import RankWorker

PHASES = ("_collect", "_record", "_launch", "_outputs")  # LLMEngine methods the step loop runs in turn
INNER = ("schedule", "build")  # host work inside _launch: the scheduler's plan, the step's index tensors


def timed(phases: dict[str, float], name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - t0
    return wrapper


def watch_gc() -> dict[int, list]:
    """The garbage collector's collections from now on: generation -> [count, seconds]."""
    import gc
    stats: dict[int, list] = collections.defaultdict(lambda: [0, 0.0])
    began = [0.0]

    def callback(phase, info):
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            entry = stats[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - began[0]

    gc.callbacks.append(callback)
    return stats


def trace_steps(llm: LLMEngine, first: int, stop: int) -> None:
    """Wrap llm.step: torch.profiler runs from its first-th call (counting the warm-up's) to the stop-th."""
    from torch.profiler import ProfilerActivity, profile
    step, calls, prof = llm.step, [0], profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                              with_stack=True)

    def traced():
        calls[0] += 1
        if calls[0] == first:
            prof.start()
        out = step()
        if calls[0] == stop - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.stop()
            print(prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=12,
                                                              max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        return out

    llm.step = traced


def write_timeline(path: str, launches: list[tuple[float, int, int]], events) -> None:
    """Per step: host launch time, device start and end (ms from the first step's device start),
    and the device's idle time before it."""
    first = events[0][0]
    t0 = launches[0][0]
    with open(path, "w") as f:
        f.write("step\ttokens\tseqs\thost_launch_ms\tgpu_start_ms\tgpu_end_ms\tgpu_idle_before_ms\n")
        prev_end = None
        for i, ((host, tokens, seqs), (start, end, _)) in enumerate(zip(launches, events)):
            s, e = first.elapsed_time(start), first.elapsed_time(end)
            idle = 0.0 if prev_end is None else s - prev_end
            f.write(f"{i}\t{tokens}\t{seqs}\t{(host - t0) * 1e3:.1f}\t{s:.1f}\t{e:.1f}\t{idle:.1f}\n")
            prev_end = e


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--max-batch-size", type=int, default=1024)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=None, help="the engine's (default: input + output + 16)")
    p.add_argument("--device", default="cuda:0", help="cpu: a smoke run of the script, host phases only")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", choices=QUANT_MODES, default=None, help="random codes in the mode's storage dtype")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--sync-scheduling", action="store_true", help="plan each step after the last one's tokens are back")
    p.add_argument("--trace-steps", default="", help="A:B: torch.profiler (host and device) over steps A..B-1, "
                   "the host's CUDA calls by Python stack")
    p.add_argument("--timeline", default="", help="write each step's host and device times to this TSV file")
    p.add_argument("--cprofile", type=int, default=0, help="print the top N host functions (cProfile)")
    args = p.parse_args()

    device = torch.device(args.device)
    gpu_events = device.type == "cuda"
    if gpu_events:
        torch.cuda.set_device(device)
    cfg = ModelConfig.from_hf(preset_config(args.model))
    build = BuildConfig(dtype=args.dtype, max_batch_size=args.max_batch_size,
                        max_seq_len=args.max_seq_len or args.input_len + args.output_len + 16, quant=args.quant)
    spec = EngineSpec(None, cfg, Mapping(), build, cfg.vocab_size, {})
    groups = ParallelGroups.build(LocalCommunicator(), Mapping(), str(device))
    with torch.device("meta"):
        shapes = StageModel(cfg, groups.mapping, groups.tp, cfg.vocab_size, DTYPES[args.dtype], build.quant_config)
    engine = load_rank_engine(spec, groups, str(device), verify=False, weights=random_rank_weights(shapes, device, 0),
                              kv_cache=KVCacheConfig(dtype=args.kv_cache_dtype))
    tokens = args.max_num_batched_tokens
    llm = LLMEngine(RankWorker(engine, groups), spec,
                    options=EngineOptions(tokens, False, max_decode_step_tokens=tokens, max_num_seqs=args.max_batch_size,
                                         async_scheduling=not args.sync_scheduling))
    prepare_gc_for_steps()
    requests = max_load_requests(args.num_requests, args.input_len, args.output_len, cfg.vocab_size)
    run_max_load(llm, requests[: args.max_batch_size])  # warm-up of every shape the run takes

    phases: dict[str, float] = collections.defaultdict(float)
    collections_by_gen = watch_gc()
    for name in PHASES:
        setattr(llm, name, timed(phases, name, getattr(llm, name)))
    llm.scheduler.schedule = timed(phases, "schedule", llm.scheduler.schedule)
    build = StepBatch.build
    StepBatch.build = staticmethod(timed(phases, "build", build))
    engine.step_events = [] if gpu_events else None
    launches: list[tuple[float, int, int]] = []  # (host time at launch, tokens, sequences) of steps that run
    launch = llm.worker.launch

    def timed_launch(plan):
        if plan.chunks:
            launches.append((time.perf_counter(), plan.num_tokens, len(plan.chunks)))
        return launch(plan)

    llm.worker.launch = timed_launch
    if args.trace_steps:
        trace_steps(llm, *map(int, args.trace_steps.split(":")))
    profiler = cProfile.Profile() if args.cprofile else None
    if profiler:
        profiler.enable()
    result = run_max_load(llm, requests)
    if profiler:
        profiler.disable()
    events = engine.step_events[-result.steps:] if gpu_events else []
    if gpu_events:
        torch.cuda.synchronize(device)
    gpu = collections.defaultdict(list)
    for start, end, decode in events:
        gpu["decode" if decode else "with prefill"].append(start.elapsed_time(end) / 1e3)
    out = result.output_tokens
    mode = "sync" if args.sync_scheduling else "async"
    print(f"{args.model} {args.quant or args.dtype} kv={args.kv_cache_dtype} {args.input_len}/{args.output_len} "
          f"x {args.num_requests}, batch {args.max_batch_size}, {mode}: "
          f"{out / result.wall_s:.0f} tok/s, wall {result.wall_s:.2f} s, {result.steps} steps")
    for kind, times in gpu.items():
        print(f"  GPU {kind:>12}: {len(times):4d} steps, {sum(times):6.2f} s, {1e3 * sum(times) / len(times):7.2f} ms each")
    busy = sum(sum(t) for t in gpu.values())
    print(f"  GPU busy {busy:.2f} s of {result.wall_s:.2f} s ({100 * busy / result.wall_s:.0f} %)")
    for gen, (count, seconds) in sorted(collections_by_gen.items()):
        print(f"  host gc gen {gen}: {count:5d} collections, {seconds:6.3f} s")
    for name in PHASES + INNER:
        print(f"  host {name:>9}: {phases[name]:6.2f} s, {1e3 * phases[name] / result.steps:6.2f} ms a step")
    if args.timeline and gpu_events:
        write_timeline(args.timeline, launches[-len(events):], events)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    llm.shutdown()


if __name__ == "__main__":
    main()
