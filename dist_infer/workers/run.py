"""`dist-infer run`: every rank loads its engine; rank 0 coordinates and prints."""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_infer.comm import ParallelGroups, world_from_launch
from dist_infer.comm.base import collective_call
from dist_infer.comm.bootstrap import resolve_device, share_node_cpus
from dist_infer.config import KVCacheConfig
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.engine.sampling import SamplingParams
from dist_infer.errors import DistInferError, RankLostError
from dist_infer.interrupts import sigterm_raises
from dist_infer.workers.llm_engine import Completion, EngineOptions, LLMEngine, Request
from dist_infer.workers.prompts import load_tokenizer, read_prompts, tokenize
from dist_infer.workers.watchdog import StepWatchdog, default_step_timeout, naming_lost_ranks
from dist_infer.workers.worker import RankWorker

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RankEngineOptions:
    """How every rank loads its engine and how rank 0 steps it: what `run` and `serve` share."""

    verify: bool = True
    device: str = "cpu"
    max_num_batched_tokens: int | None = None
    prefix_cache: bool = True
    async_scheduling: bool = True
    pipeline_depth: int | None = None
    num_kv_blocks: int | None = None
    kv_cache: KVCacheConfig = KVCacheConfig()  # --kv-cache-dtype / -free-gpu-memory-fraction / -bytes
    step_timeout: float | None = None  # None: watchdog.default_step_timeout(device)

    def start_worker(self, engine: Path) -> tuple[EngineSpec, RankWorker]:
        return start_worker(engine, self.verify, self.device, max_kv_blocks=self.num_kv_blocks, kv_cache=self.kv_cache,
                            step_timeout=self.step_timeout)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.max_num_batched_tokens, self.prefix_cache, async_scheduling=self.async_scheduling,
                             pipeline_depth=self.pipeline_depth)


@dataclass
class RunOptions(RankEngineOptions):
    engine: Path
    prompts: list[str]
    prompts_file: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: random; S: prompt i draws with seed S + i
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    chat_template: bool = True
    json_output: bool = False
    num_beams: int = 1  # > 1: beam search (greedy sampling options only)
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never"


# Tracked objects made and not yet freed before the collector looks at the young generation
# (Python's default: 700). The step loop makes and drops several per sequence per step (chunks,
# outputs, token lists); at 1,024 sequences the default ran a young collection every fraction of
# a step and promoted the step's objects into the full collections: 16 % of a host-bound max-load
# run's wall time. Steady serving makes about as many as it frees, so collections are now rare,
# and garbage cycles are still found once this many objects accumulate.
GC_YOUNG_THRESHOLD = 50_000


def prepare_gc_for_steps() -> None:
    """Take everything loaded so far (model, tokenizer, torch's and the libraries' state) out of
    the garbage collector's view, so a full collection scans only what serving makes (on the H100
    with 1,024 running requests, full collections had stalled the step loop ~0.3 s every ~19
    steps), and collect only after GC_YOUNG_THRESHOLD more objects are alive."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # (collected at exit as before; bindings report frozen objects as leaks)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def start_worker(engine_dir: Path, verify: bool = True, device: str = "cpu", cuda_graphs: bool = True,
                 max_kv_blocks: int | None = None, kv_cache: KVCacheConfig | None = None,
                 step_timeout: float | None = None) -> tuple[EngineSpec, RankWorker]:
    """Join the launch's world and load this rank's engine (collectively: a
    problem on any rank stops every rank with the same message); with peers,
    start the step watchdog (see workers/watchdog.py)."""
    world = world_from_launch()
    device = collective_call(world, lambda: resolve_device(device, world.rank))
    share_node_cpus(world, device)
    spec = collective_call(world, lambda: EngineSpec.read(engine_dir))
    collective_call(world, lambda: spec.check_world(world.size))
    groups = ParallelGroups.build(world, spec.mapping, device)
    started = time.perf_counter()
    engine = load_rank_engine(spec, groups, device, verify, cuda_graphs, max_kv_blocks=max_kv_blocks,
                              kv_cache=kv_cache)
    log.info("loaded engine rank %d (tp_rank %d, pp_rank %d, layers %d-%d) on %s:%s pid %d in %.2f s",
             groups.mapping.rank, groups.mapping.tp_rank, groups.mapping.pp_rank, engine.model.layer_ids.start,
             engine.model.layer_ids.stop - 1, socket.gethostname(), device, os.getpid(), time.perf_counter() - started)
    worker = RankWorker(engine, groups)
    prepare_gc_for_steps()
    if world.size > 1:
        worker.watchdog = StepWatchdog(world, worker.progress, step_timeout or default_step_timeout(device))
        worker.watchdog.start()
    return spec, worker


def run(opts: RunOptions) -> int:
    spec, worker = opts.start_worker(opts.engine)
    try:
        with naming_lost_ranks(worker.watchdog, worker.groups.world.rank):
            code = _run_rank(opts, spec, worker)
    except RankLostError:
        raise  # no orderly close with a peer gone: the job is aborted
    except DistInferError:
        worker.close()  # every rank got here in step (the error was collective): an orderly shutdown
        raise
    worker.close()  # on any other failure the job is aborted instead: closing could wait on dead peers
    return code


def _run_rank(opts: RunOptions, spec: EngineSpec, worker: RankWorker) -> int:
    if worker.groups.world.rank != 0:
        worker.serve()
        return 0
    llm = None

    def prepare() -> list[Request]:
        nonlocal llm
        tokenizer = load_tokenizer(opts.engine)
        llm = _RunEngine(worker, spec, tokenizer, opts.engine_options())
        ids = tokenize(read_prompts(opts.prompts, opts.prompts_file), tokenizer, opts.chat_template)
        _warn_if_capped(ids, opts.max_new_tokens, spec.build.max_seq_len)
        return [Request(p, opts.max_new_tokens, _sampling(opts, i), tuple(opts.stop), opts.ignore_eos)
                for i, p in enumerate(ids)]

    # Rank 0 prepares; the other ranks are already in serve(), so a bad request
    # must still release them: stop them before re-raising.
    interrupted = False
    try:
        requests = prepare()
        with sigterm_raises():
            completions = llm.generate(requests)
    except DistInferError as exc:
        exc.collective = True  # stop() below releases the other ranks: no abort needed
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (scancel): the finished answers are not lost
        interrupted = True
        _report_interrupted(llm, opts.json_output, exc)
        raise
    finally:
        # After an interrupt the other ranks may be inside the interrupted step: no orderly
        # stop (it could wait forever); rank 0's non-zero exit makes the launcher end them.
        if not interrupted:
            worker.stop()
    _print(completions, opts.json_output)
    return 0


class _RunEngine(LLMEngine):
    """Keeps every request's state, finished ones included, so that an interrupted
    run can still print the answers it finished."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict = {}

    def step(self):
        self.seen.update(self.requests)  # the engine forgets a request once it finishes
        outputs = super().step()
        for out in outputs:
            if out.finished:
                log.debug("request %s finished (%s)", out.request_id, out.finish_reason)
        return outputs

    def finished_so_far(self) -> tuple[list[Completion], int]:
        """(the completions of finished requests, how many requests there were)"""
        self.seen.update(self.requests)
        done = [(int(rid.rsplit("-", 1)[1]), state) for rid, state in self.seen.items()
                if state.finish_reason in ("stop", "length")]
        return [self._completion(i, state) for i, state in sorted(done, key=lambda d: d[0])], len(self.seen)


def _report_interrupted(llm: _RunEngine | None, as_json: bool, exc: KeyboardInterrupt) -> None:
    """Print the answers finished before the interrupt, and say on stderr how many were lost."""
    finished, total = llm.finished_so_far() if llm is not None else ([], 0)
    _print(finished, as_json, numbered=total > 1)
    lost = sorted(set(range(total)) - {c.index for c in finished})
    if not total:
        print(f"dist-infer run: interrupted ({exc or 'SIGINT'}) before generation started.", file=sys.stderr)
        return
    which = f" (prompts {', '.join(map(str, lost[:20]))}{' ...' if len(lost) > 20 else ''})" if lost else ""
    print(f"dist-infer run: interrupted ({exc or 'SIGINT'}): printed the {len(finished)} answers finished so "
          f"far; {len(lost)} of {total} prompts did not finish{which}. Run those again.", file=sys.stderr, flush=True)


def _warn_if_capped(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> None:
    """A prompt whose answer would pass max_seq_len stops there with finish_reason
    'length'. TensorRT-LLM's executor does the same and logs it; we warn once, naming
    the first such prompt, so that a short answer is not mistaken for the model's.
    (A prompt with no room for even one token is refused later, by validation.)"""
    capped = [(i, len(p)) for i, p in enumerate(prompts) if len(p) < max_seq_len < len(p) + max_new_tokens]
    if not capped:
        return
    index, length = capped[0]
    others = f" (and {len(capped) - 1} more prompts)" if len(capped) > 1 else ""
    log.warning("prompt %d has %d tokens: with --max-new-tokens %d that is %d, over the engine's max_seq_len %d, "
                "so it gets at most %d new tokens (finish_reason 'length')%s. Lower --max-new-tokens or rebuild "
                "with a larger --max-seq-len.", index, length, max_new_tokens, length + max_new_tokens, max_seq_len,
                max_seq_len - length, others)


def _sampling(opts: RunOptions, index: int) -> SamplingParams:
    """Each prompt its own stream: duplicate prompts give different samples."""
    seed = None if opts.seed is None else opts.seed + index
    return SamplingParams(opts.temperature, opts.top_k, opts.top_p, seed, num_beams=opts.num_beams,
                          length_penalty=opts.length_penalty, early_stopping=opts.early_stopping)


def _print(completions: list[Completion], as_json: bool, numbered: bool | None = None) -> None:
    numbered = len(completions) > 1 if numbered is None else numbered
    for c in completions:
        if as_json:
            print(json.dumps(asdict(c)), flush=True)
        elif not numbered:
            print(c.text if c.text is not None else " ".join(map(str, c.output_ids)), flush=True)
        else:
            body = c.text if c.text is not None else " ".join(map(str, c.output_ids))
            print(f"[{c.index}] {body}", flush=True)
    sys.stdout.flush()
