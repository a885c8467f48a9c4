"""The per-rank process: every rank runs the same step plan.

Step data flow (PP stages are TP groups; TP rank t talks to TP rank t of the
neighbouring stages):
    rank 0 broadcasts a StepPlan -> first stage embeds tokens -> each stage runs
    its layers, sends hidden [N, H] to the next -> last stage computes logits
    [B, V] -> its TP rank 0 samples -> tokens [S] (and logprobs) go to rank 0.

With PP the stages form a pipeline: rank 0 keeps up to `pp` steps in flight
(micro-batches of disjoint sequences), so stage 0 runs step N+1 while stage 1
runs step N. Every rank does its host-side messages in one order: launch step
N+1, then deliver step N. So the last stage's token send to rank 0 never meets
rank 0 blocked in the next plan's broadcast (it would deadlock), and on a GPU
the last stage queues N+1 before it waits for N's tokens. A rank delivers its
oldest step when a launch fills its pipeline, or when rank 0 says so
(`CollectOldest`: it collects with fewer steps in flight).

Plans are deltas. Every rank keeps each sequence's block table; a sequence's
sampling parameters travel once (with its first chunk), and after that a plan
carries only the tokens to run, the blocks added since the last step, and the
ids of sequences preempted (table dropped, sampler kept) or finished (both
dropped).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_infer.comm.base import collective_call
from dist_infer.comm.groups import ParallelGroups
from dist_infer.engine.kv_cache import StepBatch
from dist_infer.engine.runtime import RankEngine
from dist_infer.engine.sampling import Logprobs, Sampler, SamplingParams
from dist_infer.engine.transfer import ready_event, to_device, to_host_async
from dist_infer.errors import DistInferError
from dist_infer.scheduler.scheduler import PENDING_TOKEN
from dist_infer.workers.watchdog import StepProgress

log = logging.getLogger(__name__)


@dataclass
class SeqChunk:
    """One sequence's share of a step."""

    seq_id: int
    token_ids: list[int]   # the tokens to run: a prompt (chunk), or the last sampled token
    start_pos: int         # position of token_ids[0]
    new_blocks: list[int]  # appended to the sequence's block table
    sample: bool = True    # the chunk ends at the sequence's last token: sample the next one
    sampling: SamplingParams | None = None  # with the sequence's first chunk only
    # Prompt logprobs: the prompt token that follows each token of the chunk (the last
    # chunk of a prompt has one fewer: its last row predicts a sampled token, not a prompt one).
    prompt_targets: list[int] | None = None

    def __reduce__(self):
        # Plans travel pickled to every rank at every step. As a tuple of its fields a chunk pickles
        # in half the bytes and unpickles 1.9x faster than the dataclass's default (its __dict__):
        # 0.5 ms a step less on every receiving rank at 512 sequences.
        return SeqChunk, _seq_chunk_fields(self)


_seq_chunk_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(SeqChunk)))


@dataclass
class StepPlan:
    chunks: list[SeqChunk] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # block tables to drop (recomputed later)
    finished: list[int] = field(default_factory=list)   # sequences to forget
    return_logits: bool = False                          # [B, V] logits of every chunk back to rank 0
    # Keep this step's sampled tokens on the device (every TP rank gets a copy): the next plan,
    # made before they reach the host, runs them as its PENDING_TOKEN inputs (one stage only).
    share_tokens: bool = False
    # Steps rank 0 keeps in flight: a rank delivers its oldest once it holds this many (PP: one per stage).
    pipeline_depth: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass
class StepResult:
    tokens: list[int] | torch.Tensor    # one per sampling chunk, in plan order (on the device until delivered)
    logprobs: Logprobs | None = None    # for those chunks, when any of their sequences asked
    logits: torch.Tensor | None = None  # [B, V] float32 when the plan asked
    prompt_logprobs: Logprobs | None = None  # every chunk's prompt_targets, concatenated in plan order
    ready: torch.cuda.Event | None = None    # on a GPU: the host copies of the fields above have landed


@dataclass(frozen=True)
class WeightUpdate:
    """A control message in the plan stream (between two steps): every rank stages its rank file
    of the engine in `directory`, and only once all have it checked does each swap it in."""

    directory: Path


@dataclass(frozen=True)
class CollectOldest:
    """A control message in the plan stream: every rank delivers its oldest step in flight."""


class RankWorker:
    def __init__(self, engine: RankEngine, groups: ParallelGroups):
        self.engine = engine
        self.groups = groups
        self.mapping = groups.mapping
        self.sampler = Sampler(engine.device) if self.mapping.rank == self.mapping.sampler_rank else None
        self.block_tables: dict[int, list[int]] = {}
        # The last step's sampled tokens [S] on the device, and each sampling sequence's row in them.
        self.sampled: tuple[torch.Tensor, dict[int, int]] | None = None
        self.params: dict[int, SamplingParams] = {}  # every rank: rank 0 sizes the logprobs it receives
        self.progress = StepProgress()  # read by the step watchdog's thread
        self.watchdog = None  # a StepWatchdog when the rank has peers (workers/run.py: start_worker)
        self.depth = 1  # rank 0: the pipeline depth of the plans it launches
        self._launched: deque[tuple[StepPlan, StepResult | None]] = deque()  # oldest first

    def _apply(self, plan: StepPlan) -> None:
        for seq_id in plan.finished:
            self.block_tables.pop(seq_id, None)
            if self.sampler is not None:
                self.sampler.drop(seq_id)
        for seq_id in plan.preempted:
            self.block_tables.pop(seq_id, None)
        for c in plan.chunks:
            if c.sampling is not None:
                self.params[c.seq_id] = c.sampling
                if self.sampler is not None:
                    self.sampler.add(c.seq_id, c.sampling)
            self.block_tables.setdefault(c.seq_id, []).extend(c.new_blocks)

    def prompt_logprobs_width(self, plan: StepPlan) -> int | None:
        asks = [self.params[c.seq_id].prompt_logprobs or 0 for c in plan.chunks if c.prompt_targets]
        return max(asks) if asks else None

    def logprobs_width(self, plan: StepPlan) -> int | None:
        """Top-k logprobs this step returns: None if no sampled sequence asked for logprobs."""
        asks = [self.params[c.seq_id].logprobs for c in plan.chunks if c.sample]
        asks = [k for k in asks if k is not None]
        return max(asks) if asks else None

    def _follow(self, plan: StepPlan) -> None:
        """Ranks other than 0: queue the step; once the plan's depth are in flight deliver the
        oldest (rank 0 collects it next, telling no one)."""
        self._launched.append((plan, self._start(plan)))
        if len(self._launched) >= plan.pipeline_depth:
            self._finish(*self._launched.popleft())

    def _start(self, plan: StepPlan) -> StepResult | None:
        self.progress.begin()
        return self._launch(plan)

    def _finish(self, plan: StepPlan, launched: StepResult | None) -> StepResult | None:
        result = self._deliver(plan, launched)
        # A sequence finished by this plan may be in the steps launched before it (a stop string or
        # an abort ends a request between steps): rank 0 sized their outputs by its parameters.
        for seq_id in plan.finished:
            self.params.pop(seq_id, None)
        self.progress.end()
        return result

    def _launch(self, plan: StepPlan) -> StepResult | None:
        """Queue this rank's part of a step on the device; the sampler rank's tokens stay there."""
        self._apply(plan)
        if not plan.chunks:
            return StepResult([]) if self.groups.world.rank == 0 else None
        m, engine = self.mapping, self.engine
        batch = StepBatch.build([(c.token_ids, c.start_pos, self.block_tables[c.seq_id]) for c in plan.chunks],
                                engine.spec.build.kv_block_size, engine.device)
        last_rows = self._logit_rows(plan, batch)
        self._fill_pending(plan, batch)
        if m.is_first_stage:
            x = batch.input_ids
        else:
            x = torch.empty(batch.num_tokens, engine.spec.model.hidden_size, dtype=engine.dtype, device=engine.device)
            self.groups.pp.recv(x, src=m.pp_rank - 1)
        out = engine.step(x, batch)  # hidden [N, H], or logits [B, V] on the last stage
        if not m.is_last_stage:
            self.groups.pp.send(out, dst=m.pp_rank + 1)
        result = None
        if self.sampler is not None:
            prompt = self._prompt_logprobs(plan, out, last_rows)
            logits = out if last_rows is None else out[to_device(last_rows, torch.int64, out.device)]
            result = self._sample(plan, logits)
            result.prompt_logprobs = prompt
        if plan.share_tokens:
            self._share_sampled(plan, result)
        return None if result is None else self._stage_for_host(result)

    def _stage_for_host(self, result: StepResult) -> StepResult:
        """Queue the copies of the step's outputs to pinned host memory now, right behind the
        sampler, and an event after them: rank 0 then waits for this step alone, not also for
        the next one that async scheduling queues behind it on the same stream."""
        if self.engine.device.type != "cuda":
            return result
        host = lambda lp: None if lp is None else Logprobs(*(to_host_async(t) for t in (lp.token, lp.top_ids, lp.top)))
        return StepResult(to_host_async(result.tokens), host(result.logprobs), result.logits,
                          host(result.prompt_logprobs), ready_event(self.engine.device))

    def _fill_pending(self, plan: StepPlan, batch: StepBatch) -> None:
        """A chunk whose last input is PENDING_TOKEN runs the token its sequence sampled in the
        previous step: copied from that step's tokens on the device, so no host wait."""
        at, rows = [], []
        for i, c in enumerate(plan.chunks):
            if c.token_ids[-1] == PENDING_TOKEN:
                if self.sampled is None or c.seq_id not in self.sampled[1]:
                    raise RuntimeError(f"sequence {c.seq_id}: its input is the token sampled by the previous step, "
                                       "which did not sample it. This is a bug in dist-infer's scheduler.")
                at.append(batch.query_starts[i + 1] - 1)
                rows.append(self.sampled[1][c.seq_id])
        if at:
            where = to_device(at + rows, torch.int64, batch.input_ids.device)
            batch.input_ids[where[: len(at)]] = self.sampled[0][where[len(at):]]

    def _share_sampled(self, plan: StepPlan, result: StepResult | None) -> None:
        """Keep the tokens on every TP rank of the (only) stage: the sampler sends its copy."""
        rows = {c.seq_id: r for r, c in enumerate(c for c in plan.chunks if c.sample)}
        tp = self.groups.tp
        if result is not None:
            tokens = result.tokens
            for peer in range(1, tp.size) if rows else ():
                tp.send(tokens, dst=peer)
        else:
            tokens = torch.empty(len(rows), dtype=torch.int64, device=self.engine.device)
            if rows:
                tp.recv(tokens, src=0)
        self.sampled = (tokens, rows)

    @staticmethod
    def _logit_rows(plan: StepPlan, batch: StepBatch) -> list[int] | None:
        """With prompt logprobs, logits of every token of those chunks: widen the batch's
        logits index, and return where each chunk's last token landed (None: nothing widened)."""
        if not any(c.prompt_targets for c in plan.chunks):
            return None
        rows, last = [], []
        for i, c in enumerate(plan.chunks):
            qs, qe = batch.query_starts[i], batch.query_starts[i + 1]
            rows.extend(range(qs, qe) if c.prompt_targets else [qe - 1])
            last.append(len(rows) - 1)
        batch.last_token_index = to_device(rows, torch.int64, batch.positions.device)
        return last

    def _prompt_logprobs(self, plan: StepPlan, logits: torch.Tensor, last_rows: list[int] | None) -> Logprobs | None:
        if last_rows is None:
            return None
        rows, targets = [], []
        for c, last in zip(plan.chunks, last_rows):
            if c.prompt_targets:
                first = last - len(c.token_ids) + 1
                rows.extend(range(first, first + len(c.prompt_targets)))
                targets.extend(c.prompt_targets)
        rows_at, target = to_device(rows, torch.int64, logits.device), to_device(targets, torch.int64, logits.device)
        return Sampler.logprobs(logits[rows_at], target, self.prompt_logprobs_width(plan))

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> StepResult:
        rows = [i for i, c in enumerate(plan.chunks) if c.sample]
        sampled = logits[to_device(rows, torch.int64, logits.device)] if len(rows) < len(plan.chunks) else logits
        tokens = self.sampler(sampled, [plan.chunks[i].seq_id for i in rows])
        width = self.logprobs_width(plan)
        logprobs = None if width is None else self.sampler.logprobs(sampled, tokens, width)
        # (a copy: the CUDA graph's output buffer is overwritten by the next step, maybe queued already)
        return StepResult(tokens, logprobs, logits.clone() if plan.return_logits else None)

    def _deliver(self, plan: StepPlan, result: StepResult | None) -> StepResult | None:
        """Tokens (and logprobs, logits if asked) from the sampler rank to rank 0."""
        world, src = self.groups.world, self.mapping.sampler_rank
        if not plan.chunks:
            return result  # nothing ran: rank 0 has its empty result already
        if src == 0:
            return self._on_host(result) if world.rank == 0 else None
        if world.rank == src:
            if result.ready is not None:
                result.ready.synchronize()
            for t in self._result_tensors(result):
                world.send(t.cpu().contiguous(), dst=0)
            return None
        if world.rank != 0:
            return None
        return self._receive(plan, src)

    @staticmethod
    def _on_host(result: StepResult) -> StepResult:
        """Tokens as a list: the step's one wait for the device (for its own copies only)."""
        if result.ready is not None:
            result.ready.synchronize()
        if isinstance(result.tokens, torch.Tensor):
            result.tokens = result.tokens.tolist()
        return result

    @staticmethod
    def _result_tensors(result: StepResult) -> list[torch.Tensor]:
        out = [torch.as_tensor(result.tokens, dtype=torch.int64).cpu()]
        if result.logprobs is not None:
            out += [result.logprobs.token, result.logprobs.top_ids, result.logprobs.top]
        if result.logits is not None:
            out.append(result.logits.float())
        if result.prompt_logprobs is not None:
            out += [result.prompt_logprobs.token, result.prompt_logprobs.top_ids, result.prompt_logprobs.top]
        return out

    def _receive(self, plan: StepPlan, src: int) -> StepResult:
        world = self.groups.world
        s = sum(c.sample for c in plan.chunks)
        tokens = world.recv(torch.empty(s, dtype=torch.int64), src=src).tolist()
        logprobs = None
        if (k := self.logprobs_width(plan)) is not None:
            logprobs = self._receive_logprobs(s, k, src)
        logits = None
        if plan.return_logits:
            shape = (len(plan.chunks), self.engine.spec.model.vocab_size)
            logits = world.recv(torch.empty(shape, dtype=torch.float32), src=src)
        prompt = None
        if (k := self.prompt_logprobs_width(plan)) is not None:
            t = sum(len(c.prompt_targets) for c in plan.chunks if c.prompt_targets)
            prompt = self._receive_logprobs(t, k, src)
        return StepResult(tokens, logprobs, logits, prompt)

    def _receive_logprobs(self, rows: int, k: int, src: int) -> Logprobs:
        world = self.groups.world
        return Logprobs(world.recv(torch.empty(rows), src=src), world.recv(torch.empty(rows, k, dtype=torch.int64),
                        src=src), world.recv(torch.empty(rows, k), src=src))

    def serve(self) -> None:
        """Ranks other than 0: run whatever rank 0 plans until it sends None."""
        while (message := self.groups.world.broadcast_object(None)) is not None:
            if isinstance(message, WeightUpdate):
                self._follow_weight_update(message)
            elif isinstance(message, CollectOldest):
                self._finish(*self._launched.popleft())
            else:
                self._follow(message)

    def update_weights(self, directory: Path) -> float:
        """Rank 0, between steps: every rank takes the weights of the engine in `directory`; the
        seconds it took. All or nothing: a rank that cannot stage them (EngineError: another build,
        a missing or corrupt file) fails the update on every rank before any rank swaps."""
        started = time.perf_counter()
        update = WeightUpdate(Path(directory))
        self.groups.world.broadcast_object(update)
        self._apply_weight_update(update)
        return time.perf_counter() - started

    def _apply_weight_update(self, update: WeightUpdate) -> None:
        world = self.groups.world
        staged = collective_call(world, lambda: self.engine.stage_weights(update.directory))
        # Every rank holds its checked copy: swap (same shapes and dtypes, nothing left to fail),
        # and agree that all have, so rank 0 answers only once every rank runs the new weights.
        collective_call(world, lambda: self.engine.swap_weights(staged))
        log.info("rank %d: weights of %s swapped in", world.rank, update.directory)

    def _follow_weight_update(self, update: WeightUpdate) -> None:
        try:
            self._apply_weight_update(update)
        except DistInferError as exc:  # collective: rank 0 answers the caller; keep serving the old weights
            log.warning("rank %d: weight update refused, keeping the loaded weights: %s", self.groups.world.rank, exc)

    def step(self, plan: StepPlan) -> StepResult:
        """Rank 0: broadcast the plan and run it."""
        self.launch(plan)
        return self.collect(plan)

    def launch(self, plan: StepPlan) -> None:
        """Rank 0: broadcast the plan and queue rank 0's part; `collect` waits for the result.
        In between rank 0's host is free (the device runs the step). With PP, at most the plan's
        pipeline_depth steps: the other ranks delivered the oldest on this launch if it filled them."""
        if plan.pipeline_depth > 1 and len(self._launched) >= plan.pipeline_depth:
            raise RuntimeError(f"{len(self._launched)} steps in flight in a pipeline of {plan.pipeline_depth}: collect "
                               "one before launching another. This is a bug in dist-infer's engine loop.")
        self.depth = plan.pipeline_depth
        self.groups.world.broadcast_object(plan)
        self._launched.append((plan, self._start(plan)))

    def collect(self, plan: StepPlan) -> StepResult:
        """Rank 0: the oldest launched step's sampled tokens (and logprobs, logits), on the host."""
        oldest, launched = self._launched.popleft()
        if oldest is not plan:
            raise RuntimeError("steps are collected in the order they were launched. This is a bug in dist-infer's "
                               "engine loop.")
        if len(self._launched) + 1 < self.depth:  # the last launch did not fill the pipeline
            self.groups.world.broadcast_object(CollectOldest())
        return self._finish(plan, launched)

    @property
    def num_in_flight(self) -> int:
        return len(self._launched)

    def stop(self) -> None:
        """Rank 0: release the other ranks from `serve`."""
        self.groups.world.broadcast_object(None)

    def close(self) -> None:
        """Shut down in order: CUDA graphs, then device communicators (MPI finalizes at exit)."""
        self.engine.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.groups.close()
