"""In-flight batching under a per-step token budget.

Each step:
1. running sequences get their tokens, decodes (1 token) first and then the
   rest of partly prefilled prompts, chunked to what the budget leaves; when
   the KV pool runs dry, the most recently admitted sequence is preempted
   (its blocks freed, its tokens kept; it is recomputed when readmitted);
2. if nothing was preempted, waiting sequences are admitted while the batch
   has room: first their cached prefix, then a prefill chunk within the budget.

With pipeline parallelism several steps are in flight at once, one per stage
(`pipeline_depth`): each is a micro-batch of its own sequences. A sequence whose
sampled token is still on its way sits out until it is back (also when it was
preempted meanwhile), so the steps in flight sample disjoint sequences and up
to `pipeline_depth x max_num_seqs` run at once.

So a long prompt is spread over several steps and never stalls the decoding
streams, and the tokens one step runs (hence its activation memory) are bounded
by `max_num_batched_tokens`. A step that decodes is held to the smaller
`max_decode_step_tokens` when set: on the GPU that is the largest step a CUDA
graph replays, so the running streams' inter-token latency stays that of a
graph step however many prompts arrive at once; prompts that arrive while
nothing decodes still get the whole `max_num_batched_tokens`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dist_infer.scheduler.block_manager import BlockManager
from dist_infer.scheduler.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int              # sequences in one step (the engine's max batch size)
    max_num_batched_tokens: int    # tokens in one step, prefill chunks and decodes together
    max_model_len: int             # prompt + output of one sequence
    max_decode_step_tokens: int | None = None  # tokens in a step that decodes (None: max_num_batched_tokens)
    pipeline_depth: int = 1        # steps in flight at once (PP stages): micro-batches of disjoint sequences

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_decode_step_tokens",
                     "pipeline_depth"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs}) so that every running sequence can decode "
                             "in one step.")


PENDING_TOKEN = -1  # a chunk's input sampled by the step in flight: the ranks read it on the device


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int                    # position of the chunk's first token (= tokens already in the KV cache)
    num_tokens: int
    new_block_ids: list[int]      # blocks the ranks have not seen yet
    first: bool                   # the ranks meet this sequence for the first time
    samples: bool                 # the chunk reaches the sequence's last token: its logits give the next one
    preemptions: int = 0          # the sequence's preemption count when scheduled

    @property
    def token_ids(self) -> list[int]:
        known = self.seq.token_ids[self.start:self.start + self.num_tokens]
        return known + [PENDING_TOKEN] * (self.num_tokens - len(known))


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence] = field(default_factory=list)
    freed_ids: list[int] = field(default_factory=list)  # finished or aborted since the last step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._freed: list[int] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        chunks: dict[int, ScheduledChunk] = {}
        preempted: list[Sequence] = []
        decoding, prefilling = self._ready_by_kind()
        budget = self._schedule_running(decoding, self.config.max_num_batched_tokens, chunks, preempted)
        budget = self._schedule_running(prefilling, self._prefill_budget(budget, chunks), chunks, preempted)
        if not preempted:
            self._admit_waiting(budget, chunks)
            self._unblock_waiting(budget, chunks, preempted)
        freed, self._freed = self._freed, []
        return SchedulerOutput(list(chunks.values()), preempted, freed)

    def _ready_by_kind(self) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, int]]]:
        """Running sequences that can run now, with their uncomputed tokens: (decoding, prefilling),
        each in admission order. One pass, each sequence's count asked once: at 1,024 sequences this
        runs every step. (The counts hold through the step's planning: a sequence preempted meanwhile
        is skipped.)"""
        decoding, prefilling = [], []
        for seq in self.running:
            if self._can_run(seq) and (n := seq.num_uncomputed):
                (decoding if n == 1 else prefilling).append((seq, n))
        return decoding, prefilling

    def _can_run(self, seq: Sequence) -> bool:
        """In a pipeline a sequence runs in one micro-batch at a time: its next input is the
        token sampled by its step in flight, which only the last stage has (one stage: async
        scheduling runs it from the device as PENDING_TOKEN)."""
        return self.config.pipeline_depth == 1 or not seq.num_pending

    def _prefill_budget(self, budget: int, decodes: dict[int, ScheduledChunk]) -> int:
        """What the step's decodes leave for prompt tokens. With a decode-step cap, at least
        one KV block's worth: prompts keep moving even when decodes alone fill the cap."""
        cap = self.config.max_decode_step_tokens
        if not decodes or cap is None:
            return budget
        return min(budget, max(cap - len(decodes), self.blocks.block_size))

    def _schedule_running(self, ready: list[tuple[Sequence, int]], budget: int, chunks: dict[int, ScheduledChunk],
                          preempted: list[Sequence]) -> int:
        for seq, uncomputed in ready:
            if budget == 0 or len(chunks) >= self.config.max_num_seqs:
                break  # (forked beams can make the running batch larger than a step)
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(uncomputed, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim.seq_id in chunks:  # already scheduled this step: take its tokens back
                    taken = chunks.pop(victim.seq_id)
                    budget += taken.num_tokens
                    victim.announced = victim.announced and not taken.first  # its parameters never went out
                if victim is seq:
                    break
            else:
                chunks[seq.seq_id] = self._chunk(seq, n)
                budget -= n
        return budget

    def _admit_waiting(self, budget: int, chunks: dict[int, ScheduledChunk]) -> None:
        if not self.waiting:
            return  # (most steps at load: no pass over every running sequence to count them)
        active, most = self._num_active(), self.config.max_num_seqs * self.config.pipeline_depth
        while self.waiting and budget > 0 and active < most and len(chunks) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._can_run(seq):
                return  # preempted while its step is in flight: back with its token first
            self.blocks.take_cached_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.allocate(seq, n):
                self.blocks.free_sequence(seq)  # give the prefix hits back; retry next step
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks[seq.seq_id] = self._chunk(seq, n)
            budget -= n
            active += 1

    def _unblock_waiting(self, budget: int, chunks: dict[int, ScheduledChunk], preempted: list[Sequence]) -> None:
        """A step with nothing to run while sequences wait: beams that have their row and wait
        for a preempted sibling hold the KV that sibling needs, and nothing else will free it.
        Preempt them, newest first, to the back of the queue (the blocked head goes first)."""
        while not chunks and self.waiting and (idle := self._newest_idle()) is not None:
            self._preempt(idle, to_back=True)
            preempted.append(idle)
            self._admit_waiting(budget, chunks)

    def _newest_idle(self) -> Sequence | None:
        return next((s for s in reversed(self.running) if s.num_uncomputed == 0 and not s.num_pending), None)

    def _num_active(self) -> int:
        """Running sequences with tokens to run. A beam waiting for its siblings' step has none;
        it holds its KV but no batch slot, so a preempted sibling can come back in."""
        return sum(1 for s in self.running if s.num_uncomputed > 0)

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        first, seq.announced = not seq.announced, True
        samples = seq.num_computed + n == seq.num_scheduled_tokens
        return ScheduledChunk(seq, seq.num_computed, n, seq.take_new_blocks(), first, samples, seq.num_preemptions)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A new sequence that shares the parent's computed full blocks (a beam of beam search);
        it runs beside the parent, or waits with it if the parent was preempted."""
        self.blocks.fork(parent, child)
        if parent.status is SequenceStatus.RUNNING:
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            self.add(child)

    def _preempt(self, seq: Sequence, to_back: bool = False) -> None:
        """Recompute-style preemption: free the KV, keep the tokens, queue at the front (or back)."""
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq) if to_back else self.waiting.appendleft(seq)

    def launched(self, output: SchedulerOutput) -> None:
        """The step is on its way: its chunks count as computed and its samples as pending, so
        the next step can be planned before this one's tokens are back (async scheduling)."""
        for chunk in output.chunks:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens
            chunk.seq.num_pending += chunk.samples

    def computed(self, chunk: ScheduledChunk) -> None:
        """A step ran the chunk: its tokens' KV is in the cache (unless the sequence was
        preempted since it was scheduled: then its KV is gone and it starts again)."""
        seq = chunk.seq
        if seq.num_preemptions == chunk.preemptions:
            seq.num_computed = max(seq.num_computed, chunk.start + chunk.num_tokens)
            self.blocks.commit(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, aborted or failed) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.announced:
            self._freed.append(seq.seq_id)
