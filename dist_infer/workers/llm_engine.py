"""Rank 0's engine loop: add_request / abort / step() -> per-request deltas.

Every step the scheduler picks the chunks to run (decodes, prefill chunks
within the token budget, preemptions when the KV pool runs dry); they go to
every rank as one delta StepPlan; the sampled tokens come back and each
request's detokenizer and stop checks run on them. `generate(list)` is a
thin loop over `step()` for `dist-infer run` and `bench`.

A step is always in flight: `step()` collects the oldest launched step's tokens,
records them (EOS and length finishes), launches the next step, and only then
detokenizes and checks stop strings, so the device computes while rank 0
turns tokens into text. A request that a stop string (or an abort) finishes
has one more token computed in the step already launched; it is dropped.
With PP, one step per stage is in flight (micro-batches of disjoint
sequences), so every stage has work: pipelined PP.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dist_infer.engine.runtime import EngineSpec
from dist_infer.engine.sampling import Logprobs, SamplingParams
from dist_infer.errors import LaunchError, RequestError
from dist_infer.scheduler import (BlockManager, IncrementalDetokenizer, ScheduledChunk, Scheduler, SchedulerConfig,
                                  Sequence, SequenceStatus)
from dist_infer.workers.beam_search import BeamSearch, BeamSearchParams
from dist_infer.workers.prompts import generation_eos_ids
from dist_infer.workers.worker import RankWorker, SeqChunk, StepPlan, StepResult

log = logging.getLogger(__name__)

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
STEP_HISTORY = 100_000  # step timings kept (a server runs for weeks)


def resolve_pipeline_depth(requested: int | None, pp: int) -> int:
    """Steps in flight at once (--pipeline-depth): by default one per pipeline stage; 1 runs the
    stages in turn. Checked before any rank loads (serve, bench) and again by LLMEngine (run)."""
    if requested is not None and requested > 1 and pp == 1:
        raise LaunchError(f"--pipeline-depth {requested} needs a pipeline-parallel engine, and this one has pp=1 (a "
                          "single stage keeps its next step queued by async scheduling); drop the flag.")
    return requested or pp


def mixed_graph_tokens(engine) -> int | None:
    """The largest step with prompt tokens in it that the engine replays from a CUDA graph."""
    return max((max(g.buckets) for g in engine.graphs if g.varlen), default=None)


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def beam_search(self) -> bool:
        return self.sampling.num_beams != 1

    @property
    def beam(self) -> BeamSearchParams:
        """The sampling's beam-search fields, validated (a RequestError names a bad one)."""
        s = self.sampling
        return BeamSearchParams(s.num_beams, s.length_penalty, s.early_stopping, s.num_return_sequences)


@dataclass(frozen=True)
class EngineOptions:
    max_num_batched_tokens: int | None = None  # None: max(DEFAULT, max_batch_size)
    enable_prefix_caching: bool = True
    # Tokens in a step that decodes. None: the largest step a CUDA graph replays (uncapped without graphs).
    max_decode_step_tokens: int | None = None
    max_num_seqs: int | None = None  # sequences in the running batch (None: the engine's max batch size)
    # Plan and launch step N+1 while step N runs, its decode inputs read from N's tokens on the
    # device, so the host's bookkeeping hides behind the GPU (one pipeline stage; beams step in turn).
    async_scheduling: bool = True
    pipeline_depth: int | None = None  # PP: steps in flight at once (None: one per stage; 1: stages in turn)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one step added to one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    queue_s: float | None = None  # arrival to first scheduled, with the first token
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token: prompt tokens 1.. (echo)


@dataclass
class Completion:
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: str
    first_token_s: float = 0.0
    beams: list[list[int]] | None = None  # beam search: the num_return_sequences best, best first


@dataclass
class WeightsUpdated:
    """The answer to a weight update: which engine's weights every rank now runs."""

    engine: str
    weights_id: str
    seconds: float


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    prefix_hit_rate: float
    preemptions: int
    steps: int


@dataclass(eq=False)
class _RequestState:
    request_id: str
    request: Request
    seq: Sequence
    detok: IncrementalDetokenizer | None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    scheduled_s: float | None = None
    finish_reason: str | None = None
    prompt_lps: list[TokenLogprob] = field(default_factory=list)
    prompt_lps_asked: int = 0  # prompt positions whose logprobs launched steps compute
    beam: BeamSearch | None = None
    beam_seqs: list[Sequence] = field(default_factory=list)  # the running beams, in the search's order
    beam_rows: dict = field(default_factory=dict)  # seq_id -> (top ids [n], top logprobs [n]) of this step

    @property
    def seqs(self) -> list[Sequence]:
        return self.beam_seqs if self.beam is not None else [self.seq]


@dataclass
class _LaunchedStep:
    plan: StepPlan
    chunks: list[ScheduledChunk]
    started: float


@dataclass
class _Sampled:
    """A token recorded for a request; its text and logprobs are made after the next launch."""

    state: _RequestState
    token: int
    result: StepResult
    row: int
    first: bool


class LLMEngine:
    def __init__(self, worker: RankWorker, spec: EngineSpec, tokenizer=None, options: EngineOptions = EngineOptions()):
        self.worker = worker
        self.spec = spec
        self.tokenizer = tokenizer
        build = spec.build
        self.max_seq_len = build.max_seq_len
        tokens = options.max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, build.max_batch_size)
        depth = resolve_pipeline_depth(options.pipeline_depth, spec.mapping.pp)
        try:
            decode_step = options.max_decode_step_tokens or mixed_graph_tokens(worker.engine)
            seqs = min(options.max_num_seqs or build.max_batch_size, build.max_batch_size)
            config = SchedulerConfig(seqs, tokens, build.max_seq_len, decode_step, depth)
        except ValueError as exc:
            raise RequestError(f"--max-num-batched-tokens: {exc}") from exc
        self.blocks = BlockManager(worker.engine.cache.num_blocks, build.kv_block_size, options.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.eos_ids = set(spec.model.eos_token_ids) | generation_eos_ids(spec.directory)
        self.requests: dict[str, _RequestState] = {}
        self._by_seq: dict[int, _RequestState] = {}
        self._seq_ids = itertools.count()
        self._seeds = random.SystemRandom()
        self.num_steps = 0
        # (tokens in step, seconds from launch to collected tokens) of recent steps; reset by generate()
        self.step_times: deque[tuple[int, float]] = deque(maxlen=STEP_HISTORY)
        self._in_flight: deque[_LaunchedStep] = deque()  # oldest first
        self._async = options.async_scheduling and spec.mapping.pp == 1  # a later stage has no sampled tokens
        self.most_in_flight = 0  # the most steps in flight at once (reset by generate())
        self._num_beam_searches = 0
        self._last_collect = 0.0
        self.weights_id = spec.weights_id  # what the ranks run now (a weight update changes it)
        self._prefix_caching = options.enable_prefix_caching
        self._old_weight_seqs: set[int] = set()  # sequences with KV of the weights before an update
        self._beam_pending: set[str] = set()  # beam searches with rows of some beams this step
        self._beam_done: list[_RequestState] = []  # beam searches finished, their output not yet returned

    # ---- requests -----------------------------------------------------------------------------------

    def validate(self, request: Request, name: str = "prompt") -> None:
        r, vocab = request, self.spec.model.vocab_size
        if not r.prompt_ids:
            raise RequestError(f"{name} is empty.")
        if r.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}.")
        if len(r.prompt_ids) + 1 > self.max_seq_len:
            raise RequestError(f"{name} has {len(r.prompt_ids)} tokens but the engine's max_seq_len is "
                               f"{self.max_seq_len} (room is needed for at least one new token). Shorten the "
                               "prompt or rebuild the engine with a larger --max-seq-len.")
        bad = [t for t in r.prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise RequestError(f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if r.beam_search:
            self._validate_beam(r)
        if r.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this engine has none; use token-id prompts "
                               "without stop strings.")

    def _validate_beam(self, r: Request) -> None:
        beam, s = r.beam, r.sampling
        if not s.greedy or s.top_k or s.top_p < 1:
            raise RequestError("beam search is deterministic: it cannot be combined with temperature > 0, top_k or "
                               "top_p; drop those or use num_beams=1.")
        if r.stop or s.logprobs is not None or s.prompt_logprobs is not None:
            raise RequestError("beam search does not support stop strings or logprobs yet; drop them or use "
                               "num_beams=1.")
        beam.check_candidates(len(self._eos(r)))

    def _eos(self, request: Request) -> set[int]:
        return set() if request.ignore_eos else self.eos_ids

    def add_request(self, request_id: str, request: Request) -> None:
        """Queue a request (validated first: a RequestError leaves the engine untouched)."""
        self._add(request_id, request)

    def _add(self, request_id: str, request: Request) -> _RequestState:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use.")
        self.validate(request)
        if request.sampling.seed is None:  # a concrete seed, so a replay (after a restart) draws the same tokens
            request = replace(request, sampling=replace(request.sampling, seed=self._seeds.getrandbits(63)))
        seq = Sequence.from_prompt(next(self._seq_ids), request.prompt_ids)
        seq.reuse_prefix = request.sampling.prompt_logprobs is None  # cached tokens would have no logits
        if not request.beam_search:  # (beams stop by the search's rule)
            seq.max_tokens = min(len(request.prompt_ids) + request.max_new_tokens, self.max_seq_len)
        detok = IncrementalDetokenizer(self.tokenizer, request.stop) if self.tokenizer is not None else None
        state = _RequestState(request_id, request, seq, detok)
        if request.beam_search:
            self._start_beam_search(state)
        self.requests[request_id] = state
        self._by_seq[seq.seq_id] = state
        self.scheduler.add(seq)
        return state

    def _start_beam_search(self, state: _RequestState) -> None:
        """The prompt runs as one sequence; its first step forks it into the beams. Every beam
        asks the sampler rank for its top `candidates` logprobs (greedy: its own token is unused)."""
        r = state.request
        max_new = min(r.max_new_tokens, self.max_seq_len - len(r.prompt_ids))
        state.beam = BeamSearch(r.beam, self._eos(r), max_new)
        self._num_beam_searches += 1
        state.beam_seqs = [state.seq]
        state.request = replace(r, sampling=replace(r.sampling, logprobs=state.beam.num_candidates))

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks (the ranks forget it with the next plan)."""
        state = self.requests.get(request_id)
        if state is None:
            return False
        self._release(state, "abort")
        return True

    def abort_output(self, request_id: str) -> RequestOutput:
        """Abort a request and return its final delta (finish_reason "abort")."""
        state = self.requests[request_id]
        self._release(state, "abort")
        return self._final(state, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.usage,
                           self.blocks.hit_rate, self.scheduler.num_preemptions, self.num_steps)

    # ---- the step -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Finish the oldest step in flight on every rank (launching steps first if none is in
        flight) and start the next; returns a delta for each request that got a token. With
        async scheduling the next step is launched before this one's tokens are collected (its
        decode inputs are those tokens, still on the device); beam searches need their tokens
        first."""
        self._resume_prefix_cache()
        if not self._in_flight:
            self._fill_pipeline()
        if not self._in_flight:
            return []
        launched = self._in_flight.popleft()
        if self._async and not self._num_beam_searches:
            self._push(self._launch(in_flight=True))
        sampled = self._record(launched, self._collect(launched))
        self._fill_pipeline()  # in turn, or nothing could run before these tokens (and finishes) were in
        return self._outputs(sampled) + self._beam_outputs()

    def _fill_pipeline(self) -> None:
        """Launch steps until each stage has one (one in all without PP or with beam searches,
        which step their beams together), or until nothing more can run before a collect."""
        depth = 1 if self._num_beam_searches else self.scheduler.config.pipeline_depth
        while len(self._in_flight) < depth and self._push(self._launch(in_flight=bool(self._in_flight))):
            pass

    def _push(self, launched: _LaunchedStep | None) -> bool:
        if launched is not None:
            self._in_flight.append(launched)
            self.most_in_flight = max(self.most_in_flight, len(self._in_flight))
        return launched is not None

    def _launch(self, in_flight: bool = False) -> _LaunchedStep | None:
        """Plan and queue a step (`in_flight`: steps are still running, whose samples are pending)."""
        scheduled = self.scheduler.schedule()
        plan = StepPlan([self._chunk_work(c) for c in scheduled.chunks], [s.seq_id for s in scheduled.preempted],
                        scheduled.freed_ids, share_tokens=self._async,
                        pipeline_depth=self.scheduler.config.pipeline_depth)
        if not plan.chunks and not plan.finished and not plan.preempted:
            if not in_flight:  # (with a step in flight its tokens are what the rest waits for)
                self._check_not_stalled()
            return None
        self.scheduler.launched(scheduled)
        started = time.perf_counter()
        self.worker.launch(plan)
        return _LaunchedStep(plan, scheduled.chunks, started)

    def _check_not_stalled(self) -> None:
        """An empty step while sequences wait or run means nothing will ever change (a step is
        the only thing that frees KV): a scheduling bug. Fail loudly instead of spinning, so a
        server's health turns red and its supervisor restarts it rather than hang forever."""
        if self.scheduler.has_work():
            s = self.scheduler
            raise RuntimeError(f"scheduler stall: {len(s.waiting)} sequence(s) waiting and {len(s.running)} running, "
                               f"none schedulable with {self.blocks.num_free} of {self.blocks.num_blocks} KV blocks "
                               "free. This is a bug in dist-infer's scheduler; please report it with this line.")

    def _collect(self, launched: _LaunchedStep) -> StepResult:
        result = self.worker.collect(launched.plan)
        self.num_steps += 1
        now = time.perf_counter()  # a step queued behind another starts when that one is collected
        self.step_times.append((launched.plan.num_tokens, now - max(launched.started, self._last_collect)))
        self._last_collect = now
        return result

    # ---- weight updates -----------------------------------------------------------------------------

    def update_weights(self, directory: Path) -> WeightsUpdated:
        """Every rank takes the weights of the engine in `directory` (a refit of this one), between
        two steps: call finish_in_flight() first. Running requests go on with the new weights (their
        KV so far is the old weights'); nothing cached before counts as a prefix any more."""
        if self._in_flight:
            raise RuntimeError("update_weights between steps only: finish_in_flight() first")
        seconds = self.worker.update_weights(directory)
        self.weights_id = EngineSpec.read(directory).weights_id
        self._forget_prefix_cache()
        log.info("weights of %s in use (%s) after %.2f s; %d running requests continue with them",
                 directory, self.weights_id, seconds, len(self.requests))
        return WeightsUpdated(str(directory), self.weights_id, seconds)

    def _forget_prefix_cache(self) -> None:
        """KV cached by the old weights must not be a new request's prefix. Sequences still running
        would register blocks whose KV mixes both (their earlier tokens' KV is the old weights'), so
        prefix caching pauses until they have all finished."""
        self.blocks.forget_cached()
        self._old_weight_seqs = set(self._by_seq)
        self.blocks.enable_prefix_caching = self._prefix_caching and not self._old_weight_seqs

    def _resume_prefix_cache(self) -> None:
        if self._old_weight_seqs:
            self._old_weight_seqs &= self._by_seq.keys()
            if not self._old_weight_seqs:
                self.blocks.enable_prefix_caching = self._prefix_caching

    def finish_in_flight(self) -> list[RequestOutput]:
        """Collect the steps in flight, launching no other (before shutting the ranks down)."""
        sampled = []
        while self._in_flight:
            launched = self._in_flight.popleft()
            sampled += self._record(launched, self._collect(launched))
        return self._outputs(sampled) + self._beam_outputs()

    def keepalive(self) -> None:
        """An empty step: idle ranks stay inside their collective timeout, and the
        ranks forget sequences that were aborted while nothing ran."""
        freed = self.scheduler.schedule().freed_ids if not self.has_unfinished() else []
        self.worker.step(StepPlan(finished=freed))

    def _chunk_work(self, chunk: ScheduledChunk) -> SeqChunk:
        state = self._by_seq[chunk.seq.seq_id]
        sampling = None
        if chunk.first:
            sampling, state.scheduled_s = state.request.sampling, time.perf_counter() - state.arrival
        return SeqChunk(chunk.seq.seq_id, chunk.token_ids, chunk.start, chunk.new_block_ids, chunk.samples, sampling,
                        self._prompt_targets(state, chunk))

    @staticmethod
    def _prompt_targets(state: _RequestState, chunk: ScheduledChunk) -> list[int] | None:
        """The next prompt token of each chunk token, while prompt logprobs are still missing."""
        seq = state.seq
        if state.request.sampling.prompt_logprobs is None or chunk.start != state.prompt_lps_asked:
            return None  # not asked, or asked already (a recompute after preemption)
        end = min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1)
        targets = seq.token_ids[chunk.start + 1:end + 1]
        state.prompt_lps_asked = max(state.prompt_lps_asked, end)  # (the step may still run: asked, not collected)
        return targets or None

    def _record(self, launched: _LaunchedStep, result: StepResult) -> list[_Sampled]:
        """What the next plan depends on: KV now cached, tokens appended, EOS and length finishes.
        Chunks of requests finished since the launch (stop string, abort) are dropped."""
        sampled = self._record_chunks(launched, result)
        self._advance_beam_searches()
        return sampled

    def _record_chunks(self, launched: _LaunchedStep, result: StepResult) -> list[_Sampled]:
        sampled, row, prompt_row = [], 0, 0
        for chunk, work in zip(launched.chunks, launched.plan.chunks):
            state = self._by_seq.get(chunk.seq.seq_id)
            if work.prompt_targets:
                self._collect_prompt_logprobs(state, work.prompt_targets, result.prompt_logprobs, prompt_row)
                prompt_row += len(work.prompt_targets)
            if state is not None:
                self.scheduler.computed(chunk)
                if chunk.samples and state.beam is not None:
                    self._take_beam_row(state, chunk.seq, result, row)
                elif chunk.samples:
                    sampled.append(self._take_token(state, result, row))
            row += chunk.samples
        return sampled

    # ---- beam search: the beams are sequences; between steps their next tokens are chosen here -----

    def _take_beam_row(self, state: _RequestState, seq: Sequence, result: StepResult, row: int) -> None:
        n = state.beam.num_candidates
        seq.num_pending -= 1  # the search chooses its token
        state.beam_rows[seq.seq_id] = (result.logprobs.top_ids[row, :n].cpu(), result.logprobs.top[row, :n].cpu())
        self._beam_pending.add(state.request_id)

    def _advance_beam_searches(self) -> None:
        """A search steps once every running beam has its row (preemption or a full step can hold
        some beams back a step; the others wait, holding their KV)."""
        for request_id in sorted(self._beam_pending):
            state = self.requests.get(request_id)
            if state is not None and all(s.seq_id in state.beam_rows for s in state.beam_seqs):
                self._beam_pending.discard(request_id)
                self._advance_beams(state)

    def _advance_beams(self, state: _RequestState) -> None:
        rows = [state.beam_rows[s.seq_id] for s in state.beam_seqs]
        state.beam_rows = {}
        if state.first_token_s is None:
            state.first_token_s = time.perf_counter() - state.arrival
        choices = state.beam.step(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
        if state.beam.done:
            self._finish_beam_search(state)
        else:
            state.beam_seqs = self._reorder_beams(state, choices)

    def _reorder_beams(self, state: _RequestState, choices: list) -> list[Sequence]:
        """The next beams: a parent's first child continues the parent's sequence, each further
        child forks it (sharing its full KV blocks); parents with no child are freed."""
        parents, taken, beams = state.beam_seqs, set(), []
        for choice in choices:
            parent = parents[choice.parent]
            if choice.parent in taken:
                beams.append(self._fork(state, parent, choice.token))
            else:
                taken.add(choice.parent)
                beams.append(parent)
        for i, choice in enumerate(choices):
            if beams[i] is parents[choice.parent]:
                beams[i].token_ids.append(choice.token)
        for i, parent in enumerate(parents):
            if i not in taken:
                self._drop_seq(parent)
        return beams

    def _fork(self, state: _RequestState, parent: Sequence, token: int) -> Sequence:
        child = Sequence(next(self._seq_ids), parent.token_ids + [token], parent.num_prompt_tokens)
        child.reuse_prefix = parent.reuse_prefix
        self.scheduler.fork(parent, child)
        self._by_seq[child.seq_id] = state
        return child

    def _drop_seq(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._by_seq.pop(seq.seq_id, None)

    def _finish_beam_search(self, state: _RequestState) -> None:
        """The best hypothesis becomes the request's sequence; every beam's KV is freed."""
        best = state.beam.best()[0].output_ids
        self._release(state, "stop" if best[-1] in state.beam.eos_ids else "length")
        final = Sequence.from_prompt(state.seq.seq_id, state.request.prompt_ids + best)
        final.num_prompt_tokens, final.num_cached_tokens = len(state.request.prompt_ids), state.seq.num_cached_tokens
        final.status = SequenceStatus.FINISHED
        state.seq, state.beam_seqs = final, []
        self._beam_done.append(state)

    def _beam_outputs(self) -> list[RequestOutput]:
        done, self._beam_done = self._beam_done, []
        return [self._beam_output(state) for state in done]

    def _beam_output(self, state: _RequestState) -> RequestOutput:
        ids = state.seq.output_ids
        text = ""
        if state.detok is not None:
            for token in ids:
                state.detok.add(token)
            text = state.detok.delta(finished=True)
        return RequestOutput(state.request_id, ids, text, True, state.finish_reason, state.seq.num_prompt_tokens,
                             len(ids), state.seq.num_cached_tokens, queue_s=state.scheduled_s)

    def _take_token(self, state: _RequestState, result: StepResult, row: int) -> _Sampled:
        token, seq = result.tokens[row], state.seq
        seq.token_ids.append(token)
        seq.num_pending -= 1
        first = state.first_token_s is None
        if first:
            state.first_token_s = time.perf_counter() - state.arrival
        reason = self._finish_reason(state)
        if reason:
            self._release(state, reason)
        return _Sampled(state, token, result, row, first)

    def _outputs(self, sampled: list[_Sampled]) -> list[RequestOutput]:
        outputs = []
        for s in sampled:
            try:
                outputs.append(self._output(s))
            except Exception as exc:  # one request's failure (e.g. its detokenizer) must not stop the others
                log.exception("request %s failed", s.state.request_id)
                self._release(s.state, "error")
                outputs.append(self._final(s.state, [], "", error=f"{type(exc).__name__}: {exc}"))
        return outputs

    @staticmethod
    def _collect_prompt_logprobs(state: _RequestState | None, targets: list[int], lp: Logprobs, row: int) -> None:
        """Rows row.. of the step's prompt logprobs belong to this chunk's targets."""
        if state is None:
            return  # finished since the launch
        k = state.request.sampling.prompt_logprobs
        for i, token in enumerate(targets):
            top = list(zip(lp.top_ids[row + i, :k].tolist(), lp.top[row + i, :k].tolist()))
            state.prompt_lps.append(TokenLogprob(token, float(lp.token[row + i]), top))

    def _output(self, s: _Sampled) -> RequestOutput:
        """The request's delta: its token's text (a stop string finishes it here), logprobs."""
        state, seq = s.state, s.state.seq
        if state.detok is not None:
            state.detok.add(s.token)
            if state.detok.stopped_at is not None:
                self._stop_at_string(state)
        sampling = state.request.sampling
        logprobs = None if s.result.logprobs is None or sampling.logprobs is None else \
            [self._token_logprob(s.result, s.row, s.token, sampling.logprobs)]
        reason = state.finish_reason
        text = state.detok.delta(finished=reason is not None) if state.detok is not None else ""
        queue_s = state.scheduled_s if s.first else None
        prompt_lps = state.prompt_lps if s.first and sampling.prompt_logprobs is not None else None
        return RequestOutput(state.request_id, [s.token], text, reason is not None, reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_tokens, logprobs, queue_s=queue_s,
                             prompt_logprobs=prompt_lps)

    def _stop_at_string(self, state: _RequestState) -> None:
        """A stop string outranks a length finish of the same token (the text was cut)."""
        if state.finish_reason is None:
            self._release(state, "stop")
        elif state.finish_reason == "length":
            state.finish_reason = "stop"

    @staticmethod
    def _token_logprob(result: StepResult, row: int, token: int, k: int) -> TokenLogprob:
        lp = result.logprobs
        top = list(zip(lp.top_ids[row, :k].tolist(), lp.top[row, :k].tolist()))
        return TokenLogprob(token, float(lp.token[row]), top)

    def _finish_reason(self, state: _RequestState) -> str | None:
        req, seq = state.request, state.seq
        if not req.ignore_eos and seq.token_ids[-1] in self.eos_ids:
            return "stop"
        if seq.num_output_tokens >= req.max_new_tokens or seq.num_tokens >= self.max_seq_len:
            return "length"
        return None

    def _release(self, state: _RequestState, reason: str) -> None:
        if state.beam is not None and state.request_id in self.requests:
            self._num_beam_searches -= 1
        state.finish_reason = reason
        for seq in state.seqs:
            self._drop_seq(seq)
        self.requests.pop(state.request_id, None)
        self._beam_pending.discard(state.request_id)

    def _final(self, state: _RequestState, ids: list[int], text: str, error: str | None = None) -> RequestOutput:
        seq = state.seq
        return RequestOutput(state.request_id, ids, text, True, state.finish_reason, seq.num_prompt_tokens,
                             len(seq.output_ids), seq.num_cached_tokens, None, error)

    # ---- offline use --------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run a fixed list of requests to completion (in-flight batched)."""
        for i, r in enumerate(requests):
            self.validate(r, f"prompt {i}")
        started = time.perf_counter()
        self.step_times, self.most_in_flight = deque(maxlen=STEP_HISTORY), 0
        states = [self._add(f"generate-{id(requests)}-{i}", r) for i, r in enumerate(requests)]
        while self.has_unfinished():
            outputs = self.step()
            if self.scheduler.waiting and not self.scheduler.running and not self._in_flight:
                raise RuntimeError(f"no request could be scheduled ({self.blocks.num_free} free KV blocks)")
            for out in outputs:
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        completions = [self._completion(i, s) for i, s in enumerate(states)]
        self._log_throughput(completions, time.perf_counter() - started)
        return completions

    def _completion(self, index: int, state: _RequestState) -> Completion:
        ids = state.seq.output_ids
        text = None
        if state.detok is not None:
            ids, text = ids[:state.detok.ids_before_stop()], state.detok.text
        beams = [h.output_ids for h in state.beam.best()] if state.beam is not None and state.beam.done else None
        return Completion(index, state.request.prompt_ids, ids, text, state.finish_reason, state.first_token_s or 0.0,
                          beams)

    def _log_throughput(self, completions: list[Completion], elapsed: float) -> None:
        generated = sum(len(c.output_ids) for c in completions)
        log.info("%d requests, %d tokens in %d steps (at most %d in flight), %.2f s (%.1f tok/s)", len(completions),
                 generated, len(self.step_times), self.most_in_flight, elapsed, generated / max(elapsed, 1e-9))

    def shutdown(self) -> None:
        self.finish_in_flight()
        self.worker.stop()
