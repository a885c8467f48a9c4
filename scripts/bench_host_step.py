"""Host time of one step's bookkeeping at max-load sizes, no model (issue #12: with PP the host's
planning is on the pipeline's critical path). Times StepBatch.build (the step's index tensors) for
1,024 one-token rows and for 64 prompts of 128 tokens, one scheduler cycle (schedule, launched,
computed) of 1,024 decodes, and a KV block allocation from pools of GPU sizes. Compare trees by running it with each on PYTHONPATH, alternated:

    for t in .base .; do PYTHONPATH=$t python scripts/bench_host_step.py; done

On a noisy host, `--against TREE` times StepBatch.build of TREE and of this tree in one process instead,
rounds alternated, best of 7 (engine/kv_cache.py imports nothing of the package, so both load side by side):

    python scripts/bench_host_step.py --against .base
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

from dist_infer.engine.kv_cache import StepBatch
from dist_infer.scheduler import BlockManager, Scheduler, SchedulerConfig, Sequence

BLOCK = 16


def per_call_ms(fn, repeats: int = 100, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def decode_rows(n: int) -> list[tuple[list[int], int, list[int]]]:
    rng = random.Random(0)
    return [([rng.randrange(1000)], 128 + i % 100, list(range(i * BLOCK, (i + 1) * BLOCK))) for i in range(n)]


def prompt_rows(n: int, length: int) -> list[tuple[list[int], int, list[int]]]:
    return [(list(range(length)), 0, list(range(i * BLOCK, (i + 1) * BLOCK))) for i in range(n)]


def decode_cycle(n: int):
    """A scheduler holding n decoding sequences; each call plans, launches and records one step."""
    s = Scheduler(SchedulerConfig(n, 8 * n, 4096, 8 * n), BlockManager(n * 64, BLOCK, False))
    for i in range(n):
        s.add(Sequence.from_prompt(i, list(range(128))))

    def cycle():
        out = s.schedule()
        s.launched(out)
        for c in out.chunks:
            s.computed(c)
            if c.samples:
                c.seq.token_ids.append(5)
                c.seq.num_pending -= 1
    cycle()  # the prefill
    return cycle


def allocation_us(num_blocks: int, n: int = 1024) -> float:
    """Microseconds per KV block taken, n sequences growing to 24 blocks while half of them are
    freed between rounds (the free queue churns as at max load)."""
    blocks = BlockManager(num_blocks, BLOCK, False)
    seqs = [Sequence.from_prompt(i, list(range(128))) for i in range(n)]
    started, taken = time.perf_counter(), 0
    for _ in range(3):
        for s in seqs:
            while len(s.block_ids) < 24 and blocks.allocate(s, BLOCK * (len(s.block_ids) + 1) - s.num_computed):
                taken += 1
        for s in seqs[: n // 2]:
            blocks.free_sequence(s)
    return (time.perf_counter() - started) / taken * 1e6


def load_kv_cache(tree: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, tree / "dist_infer" / "engine" / "kv_cache.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def compare_build(other: Path, rounds: int = 7, calls: int = 50) -> None:
    """StepBatch.build of `other` and of this tree, alternated, best round of each."""
    trees = {"before": load_kv_cache(other, "kv_cache_before"),
             "after": load_kv_cache(Path(__file__).parents[1], "kv_cache_after")}
    cases = {"1,024 decode rows": decode_rows(1024), "64 x 128 prompt tokens": prompt_rows(64, 128),
             "16 decode rows": decode_rows(16)}
    for label, rows in cases.items():
        best = dict.fromkeys(trees, float("inf"))
        for _ in range(rounds):
            for tag, module in trees.items():
                started = time.perf_counter()
                for _ in range(calls):
                    module.StepBatch.build(rows, BLOCK)
                best[tag] = min(best[tag], (time.perf_counter() - started) / calls * 1e3)
        print(f"StepBatch.build, {label}: before {best['before']:.3f} ms, after {best['after']:.3f} ms "
              f"({best['before'] / best['after']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another tree: compare its StepBatch.build with this one's")
    args = parser.parse_args()
    if args.against:
        return compare_build(args.against)
    decode, prompts = decode_rows(1024), prompt_rows(64, 128)
    print(f"StepBatch.build, 1,024 decode rows: {per_call_ms(lambda: StepBatch.build(decode, BLOCK)):.2f} ms")
    print(f"StepBatch.build, 64 x 128 prompt tokens: {per_call_ms(lambda: StepBatch.build(prompts, BLOCK)):.2f} ms")
    print(f"scheduler cycle, 1,024 decodes: {per_call_ms(decode_cycle(1024), repeats=50):.2f} ms")
    for pool in (4096, 30000, 60000):
        print(f"KV block allocation, pool of {pool:,} blocks: {allocation_us(pool):.2f} us a block")


if __name__ == "__main__":
    main()
