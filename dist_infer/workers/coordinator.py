"""Rank 0's loop: requests -> scheduler -> one StepPlan per step -> tokens.

In-flight batching: each step decodes every running sequence by one token and
prefills newly admitted ones in the same ragged batch; a sequence that
finishes frees its KV blocks at once for the next waiting request.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from dist_infer.engine.runtime import EngineSpec
from dist_infer.engine.sampling import SamplingParams
from dist_infer.errors import RequestError
from dist_infer.workers.worker import RankWorker, SeqWork, StepPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Completion:
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    first_token_s: float = 0.0


@dataclass
class _Sequence:
    seq_id: int  # unique for the coordinator's lifetime (the sampler keys on it)
    index: int   # position in the caller's request list
    request: Request
    blocks: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens already in the KV cache
    started: bool = False
    first_token_s: float = 0.0

    @property
    def next_tokens(self) -> list[int]:
        return self.request.prompt_ids if not self.started else self.output_ids[-1:]


class BlockManager:
    """Hands out KV blocks. Block 0 is the engine's scratch block (CUDA-graph
    padding writes there) and is never given to a sequence. A sequence
    reserves blocks for its whole budget (prompt + max_new_tokens) when it is
    admitted, so a running sequence can never run out of KV mid-generation."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free = deque(range(1, num_blocks))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, seq: _Sequence, tokens: int) -> bool:
        """Give `seq` blocks for `tokens` tokens; False (and nothing taken) if the pool is short."""
        need = self.blocks_for(tokens) - len(seq.blocks)
        if need > len(self.free):
            return False
        seq.blocks.extend(self.free.popleft() for _ in range(need))
        return True

    def release(self, seq: _Sequence) -> None:
        self.free.extend(seq.blocks)
        seq.blocks = []


class Coordinator:
    def __init__(self, worker: RankWorker, spec: EngineSpec, tokenizer=None):
        self.worker = worker
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_batch = spec.build.max_batch_size
        self.max_seq_len = spec.build.max_seq_len
        self.blocks = BlockManager(worker.engine.cache.num_blocks, spec.build.kv_block_size)
        self.eos_ids = set(spec.model.eos_token_ids)
        self._finished_ids: list[int] = []
        self._seq_ids = itertools.count()
        self.step_times: list[tuple[int, float]] = []  # (tokens in step, seconds) of the last generate()

    def validate(self, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            if not r.prompt_ids:
                raise RequestError(f"prompt {i} is empty.")
            if len(r.prompt_ids) >= self.max_seq_len:
                raise RequestError(f"prompt {i} has {len(r.prompt_ids)} tokens but the engine's max_seq_len is "
                                   f"{self.max_seq_len} (room is needed for at least one new token). Shorten the "
                                   "prompt or rebuild the engine with a larger --max-seq-len.")
            if r.max_new_tokens < 1:
                raise RequestError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}.")
            bad = [t for t in r.prompt_ids if not 0 <= t < self.spec.model.vocab_size]
            if bad:
                raise RequestError(f"prompt {i} has token ids outside the vocabulary "
                                   f"[0, {self.spec.model.vocab_size}): {bad[:5]}")
            if r.stop and self.tokenizer is None:
                raise RequestError("stop strings need a tokenizer, and this engine has none; use token-id prompts "
                                   "without --stop.")

    def generate(self, requests: list[Request]) -> list[Completion]:
        self.validate(requests)
        started = time.perf_counter()
        waiting = deque(_Sequence(next(self._seq_ids), i, r) for i, r in enumerate(requests))
        running: list[_Sequence] = []
        done: dict[int, Completion] = {}
        steps = 0
        self.step_times = []
        while waiting or running:
            while waiting and len(running) < self.max_batch and self.blocks.reserve(waiting[0], self._budget(waiting[0])):
                running.append(waiting.popleft())
            if not running:  # the engine guarantees a pool of at least one max_seq_len sequence
                raise RuntimeError(f"KV pool ({len(self.blocks.free)} free blocks) cannot hold one request")
            plan = self._plan(running)
            step_start = time.perf_counter()
            result = self.worker.step(plan)
            steps += 1
            now = time.perf_counter() - started
            self.step_times.append((sum(len(w.token_ids) for w in plan.seqs), time.perf_counter() - step_start))
            for seq, token in zip(list(running), result.tokens):
                seq.cached += len(seq.next_tokens)
                if not seq.started:
                    seq.started, seq.first_token_s = True, now
                seq.output_ids.append(token)
                reason = self._finish_reason(seq)
                if reason:
                    running.remove(seq)
                    self.blocks.release(seq)
                    self._finished_ids.append(seq.seq_id)
                    done[seq.index] = self._complete(seq, reason)
        elapsed = time.perf_counter() - started
        generated = sum(len(c.output_ids) for c in done.values())
        log.info("%d requests, %d tokens in %d steps, %.2f s (%.1f tok/s)", len(requests), generated, steps,
                 elapsed, generated / max(elapsed, 1e-9))
        return [done[i] for i in range(len(requests))]

    def _budget(self, seq: _Sequence) -> int:
        """Most tokens the sequence can ever hold in the KV cache."""
        return min(len(seq.request.prompt_ids) + seq.request.max_new_tokens, self.max_seq_len)

    def _plan(self, running: list[_Sequence]) -> StepPlan:
        work = []
        for seq in running:
            tokens = seq.next_tokens
            work.append(SeqWork(seq.seq_id, list(tokens), seq.cached, list(seq.blocks),
                                None if seq.started else seq.request.sampling))
        finished, self._finished_ids = self._finished_ids, []
        return StepPlan(work, finished)

    def _finish_reason(self, seq: _Sequence) -> str | None:
        req = seq.request
        if not req.ignore_eos and seq.output_ids[-1] in self.eos_ids:
            return "stop"
        if req.stop and any(s in self._decode(seq.output_ids) for s in req.stop):
            return "stop"
        if len(seq.output_ids) >= req.max_new_tokens or seq.cached + 1 >= self.max_seq_len:
            return "length"
        return None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _complete(self, seq: _Sequence, reason: str) -> Completion:
        text = None
        if self.tokenizer is not None:
            text = self._decode(seq.output_ids)
            cut = [text.index(s) for s in seq.request.stop if s in text]
            if cut:
                text = text[: min(cut)]
        return Completion(seq.index, seq.request.prompt_ids, seq.output_ids, text, reason, seq.first_token_s)

    def shutdown(self) -> None:
        self.worker.stop()
