"""Hypothesis: a pipeline of `depth` steps in flight (collected oldest first, as LLMEngine does at
PP=depth) under a small KV pool, with chunked prompts and preemption. No step may run a token
that is still on its way (at PP > 1 only the last stage has it: a PENDING_TOKEN input would fail
every rank), no two steps in flight may sample the same sequence, and every sequence finishes
with all its tokens and the pool empty."""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, given, settings, strategies as st

from dist_infer.scheduler import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus
from dist_infer.scheduler.scheduler import PENDING_TOKEN

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
BLOCK = 4


def _collect(s: Scheduler, out, seqs: dict[int, Sequence]) -> None:
    """What LLMEngine._record does with a collected step: KV computed, the sampled token appended
    (also for a sequence preempted since: its token is kept, its KV recomputed), length finishes."""
    for c in out.chunks:
        s.computed(c)
        if c.samples:
            c.seq.token_ids.append(1)
            c.seq.num_pending -= 1
            if c.seq.num_tokens >= c.seq.max_tokens and c.seq.status is not SequenceStatus.FINISHED:
                s.finish(c.seq)
                seqs.pop(c.seq.seq_id)


@EXAMPLES
@given(depth=st.integers(2, 4), blocks=st.integers(12, 40), seqs_per_step=st.integers(1, 4),
       budget=st.integers(4, 24), prompts=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 8)), min_size=1,
                                                   max_size=10))
def test_a_pipeline_never_runs_a_token_on_its_way(depth, blocks, seqs_per_step, budget, prompts):
    budget = max(budget, seqs_per_step)
    s = Scheduler(SchedulerConfig(seqs_per_step, budget, 64, None, depth), BlockManager(blocks, BLOCK, True))
    seqs: dict[int, Sequence] = {}
    for i, (n, new) in enumerate(prompts):
        seq = Sequence.from_prompt(i, [2 + (i * 7 + j) % 5 for j in range(n)])  # shared prefixes: cache hits
        seq.max_tokens = n + new
        seqs[i] = seq
        s.add(seq)
    in_flight: deque = deque()
    for _ in range(2000):
        while len(in_flight) < depth and (out := s.schedule()).chunks:
            assert all(PENDING_TOKEN not in c.token_ids for c in out.chunks)
            sampling = {c.seq.seq_id for c in out.chunks if c.samples}
            assert not sampling & {c.seq.seq_id for step in in_flight for c in step.chunks if c.samples}
            s.launched(out)
            in_flight.append(out)
        if not in_flight:
            break
        _collect(s, in_flight.popleft(), seqs)
    assert not seqs and not s.has_work() and s.blocks.num_free == s.blocks.num_blocks - 1
