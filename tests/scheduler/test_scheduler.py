"""Scheduler: admission under a small pool, token budget and chunked prefill,
preemption and resumption, prefix hits, abort, and the plan deltas."""

from __future__ import annotations

import pytest

from dist_infer.scheduler import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus
from dist_infer.scheduler.scheduler import PENDING_TOKEN

BS = 4


def _sched(blocks=64, seqs=8, tokens=64, max_len=64, prefix=True, decode_step=None, depth=1) -> Scheduler:
    return Scheduler(SchedulerConfig(seqs, tokens, max_len, decode_step, depth), BlockManager(blocks, BS, prefix))


def _add(s: Scheduler, seq_id: int, n: int, first_token: int = 0) -> Sequence:
    seq = Sequence.from_prompt(seq_id, [first_token + seq_id * 1000 + i for i in range(n)])
    s.add(seq)
    return seq


def _run(s: Scheduler, out, token: int = 7, launched: bool = False) -> None:
    """As the engine does after a step: mark chunks computed, append a token where sampled
    (`launched`: the step went through Scheduler.launched, so that token was pending)."""
    for c in out.chunks:
        s.computed(c)
        if c.samples:
            c.seq.token_ids.append(token)
            c.seq.num_pending -= launched


def test_config_validated():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(8, 4, 64)
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(1, 4, 0)
    with pytest.raises(ValueError, match="max_decode_step_tokens"):
        SchedulerConfig(1, 4, 8, 0)
    with pytest.raises(ValueError, match="pipeline_depth"):
        SchedulerConfig(1, 4, 8, None, 0)


def test_prefill_then_decode_with_block_deltas():
    s = _sched()
    a = _add(s, 0, 6)
    out = s.schedule()
    (c,) = out.chunks
    assert (c.start, c.num_tokens, c.first, c.samples) == (0, 6, True, True)
    assert len(c.new_block_ids) == 2 and c.token_ids == a.token_ids[:6]
    _run(s, out)
    out = s.schedule()
    (c,) = out.chunks
    assert (c.start, c.num_tokens, c.first, c.new_block_ids) == (6, 1, False, [])  # fits the 2nd block
    _run(s, out)
    _run(s, out2 := s.schedule())
    (c,) = s.schedule().chunks
    assert c.start == 8 and len(c.new_block_ids) == 1 and out2.chunks[0].new_block_ids == []


def test_chunked_prefill_under_budget_keeps_decodes_running():
    s = _sched(tokens=8)
    a = _add(s, 0, 3)
    _run(s, s.schedule())                    # a decoding from now on
    b = _add(s, 1, 20)                       # a long prompt
    seen = []
    for _ in range(4):
        out = s.schedule()
        assert out.num_tokens <= 8
        assert out.chunks[0].seq is a and out.chunks[0].num_tokens == 1   # the decode goes first, every step
        seen.append([(c.seq.seq_id, c.start, c.num_tokens, c.samples) for c in out.chunks[1:]])
        _run(s, out)
    assert seen == [[(1, 0, 7, False)], [(1, 7, 7, False)], [(1, 14, 6, True)], [(1, 20, 1, True)]]
    assert b.num_computed == 21


def test_decode_step_cap_spreads_a_burst_of_prompts_over_graph_sized_steps():
    s = _sched(seqs=8, tokens=64, max_len=128, decode_step=16)
    first = _add(s, 0, 3)
    _run(s, s.schedule())                                 # nothing decoded: the whole budget is open
    burst = [_add(s, i, 12) for i in range(1, 5)]         # 48 prompt tokens arrive at once
    sizes = []
    while any(seq.num_computed < 12 for seq in burst):
        out = s.schedule()
        decodes = [c for c in out.chunks if c.start >= c.seq.num_prompt_tokens]
        assert first in [c.seq for c in decodes] and out.num_tokens <= 16
        sizes.append(out.num_tokens)
        _run(s, out)
    assert sizes[0] == 16 and len(sizes) >= 4                # 1 decode + 15 prompt tokens per step


def test_decode_step_cap_leaves_a_prefill_floor_and_is_open_without_decodes():
    s = _sched(seqs=8, tokens=64, max_len=128, decode_step=4)
    for i in range(4):
        _add(s, i, 2)
    out = s.schedule()
    assert out.num_tokens == 8                            # prompts alone: max_num_batched_tokens
    _run(s, out)                                          # all 4 decode from now on
    late = _add(s, 9, 10)
    out = s.schedule()
    assert [c.num_tokens for c in out.chunks if c.seq is late] == [BS]  # 4 decodes fill the cap; one block more


def test_max_num_seqs_limits_admission():
    s = _sched(seqs=2)
    seqs = [_add(s, i, 3) for i in range(3)]
    out = s.schedule()
    assert [c.seq for c in out.chunks] == seqs[:2] and seqs[2].status is SequenceStatus.WAITING
    s.finish(seqs[0])
    out = s.schedule()
    assert seqs[2] in [c.seq for c in out.chunks] and out.freed_ids == [0]


def test_admission_waits_for_blocks_under_a_small_pool():
    s = _sched(blocks=5)                     # 4 usable blocks = 16 tokens
    a, b = _add(s, 0, 12), _add(s, 1, 8)
    out = s.schedule()
    assert [c.seq for c in out.chunks] == [a] and b.status is SequenceStatus.WAITING and b.block_ids == []
    s.finish(a)
    assert [c.seq for c in s.schedule().chunks] == [b]


def test_preemption_frees_latest_and_resumes_with_same_tokens():
    s = _sched(blocks=5, prefix=False)       # 16 tokens of KV
    a, b = _add(s, 0, 7), _add(s, 1, 7)
    _run(s, s.schedule())                    # both prefilled: 2 blocks each, pool full
    assert s.blocks.num_free == 0
    a_tokens = list(a.token_ids)
    out = s.schedule()                       # both fit position 7 in their 2nd block
    _run(s, out)
    out = s.schedule()                       # a needs a 3rd block: b (admitted last) is preempted
    assert [p.seq_id for p in out.preempted] == [1] and [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and b.block_ids == [] and b.num_computed == 0
    assert s.waiting[0] is b and b.num_tokens == 9  # its tokens are kept
    _run(s, out)
    s.finish(a)
    out = s.schedule()
    (c,) = out.chunks
    assert c.seq is b and (c.start, c.num_tokens, c.first, c.samples) == (0, 9, False, True)  # recompute all
    assert len(c.new_block_ids) == 3 and a_tokens[:7] == a.token_ids[:7]


def test_preempting_itself_when_alone_is_not_possible_but_last_yields():
    """Two sequences that cannot both grow: the older keeps running to the end."""
    s = _sched(blocks=4, max_len=12, prefix=False)   # 3 usable blocks
    a, b = _add(s, 0, 4), _add(s, 1, 4)
    for _ in range(8):
        out = s.schedule()
        _run(s, out)
        if a.num_tokens >= 12:
            break
    assert a.status is SequenceStatus.RUNNING and a.num_tokens == 12
    assert b.num_preemptions >= 1


def test_prefix_hit_skips_cached_tokens():
    s = _sched()
    a = _add(s, 0, 10)
    _run(s, s.schedule())
    b = Sequence.from_prompt(1, a.token_ids[:8] + [5, 6])
    s.add(b)
    out = s.schedule()
    cb = next(c for c in out.chunks if c.seq is b)
    assert (cb.start, cb.num_tokens) == (8, 2) and b.num_cached_tokens == 8
    assert cb.new_block_ids[:2] == a.block_ids[:2]   # the shared blocks are part of its table
    assert s.blocks.hit_rate > 0


def test_abort_waiting_and_running():
    s = _sched(seqs=1)
    a, b = _add(s, 0, 3), _add(s, 1, 3)
    _run(s, s.schedule())
    s.finish(b)                              # waiting, never announced: nothing to tell the ranks
    s.finish(a)                              # running: blocks freed, the ranks are told
    assert s.blocks.num_free == 63 and not s.has_work()
    assert s.schedule().freed_ids == [0]
    s.finish(a)                              # twice is harmless
    assert s.schedule().freed_ids == []


def test_idle_beams_make_room_for_a_blocked_sibling():
    """Sequences whose tokens are all computed and that wait (beams waiting for a sibling's row)
    hold the pool; a waiting sequence can only run if they give their KV back: the newest goes
    to the back of the queue, the blocked one runs. (Before: an empty step, forever.)"""
    s = _sched(blocks=5, prefix=False)       # 4 usable blocks
    a, b = _add(s, 0, 7), _add(s, 1, 7)
    for c in s.schedule().chunks:
        s.computed(c)                        # prefilled; no token appended: idle, 2 blocks each
    c = _add(s, 2, 5)
    out = s.schedule()
    assert [p.seq_id for p in out.preempted] == [1] and [ch.seq for ch in out.chunks] == [c]
    assert list(s.waiting) == [b] and b.num_preemptions == 1 and a.status is SequenceStatus.RUNNING


# ---- async scheduling: a launched step's chunks count as computed and its samples as pending --------

def _launch(s: Scheduler):
    out = s.schedule()
    s.launched(out)
    return out


def _take(s: Scheduler, out, token: int = 7) -> None:
    """As the engine records a step collected after the next was launched."""
    _run(s, out, token, launched=True)


def test_the_next_step_is_planned_while_a_launched_step_still_holds_the_token():
    s = _sched()
    a = _add(s, 0, 6)
    a.max_tokens = 8  # two new tokens at most
    first = _launch(s)
    (c,) = (second := _launch(s)).chunks  # a's first new token is still on the device
    assert (c.start, c.num_tokens, c.samples, c.token_ids) == (6, 1, True, [PENDING_TOKEN])
    assert a.num_pending == 2 and a.num_computed == 7
    assert s.schedule().chunks == []  # its last allowed token is pending: nothing more to run
    _take(s, first, token=70)
    assert a.num_computed == 7 and a.token_ids[-1] == 70  # the later launch is not undone
    _take(s, second, token=71)
    assert a.output_ids == [70, 71] and a.num_pending == 0 and a.num_uncomputed == 0


def test_a_sequence_preempted_while_its_step_runs_starts_again():
    s = _sched(blocks=4)  # 3 usable blocks of 4 tokens
    a, b = _add(s, 0, 4), _add(s, 1, 4)
    first = _launch(s)
    second = _launch(s)  # both decodes need a new block; one is left: b (newest) yields
    assert [c.seq for c in second.chunks] == [a] and b.status is SequenceStatus.WAITING
    _take(s, first)
    assert b.num_computed == 0 and b.num_pending == 0 and b.token_ids[-1] == 7  # its token kept, its KV not
    assert a.num_computed == 5
    _take(s, second)
    (c,) = s.schedule().chunks  # b waits for a block; a decodes on
    assert c.seq is a and c.token_ids == [7]


def test_a_block_whose_last_token_is_pending_is_not_cached_yet():
    s = _sched()
    a = _add(s, 0, 7)
    first, second = _launch(s), _launch(s)  # the decode's input (position 7) completes block 2
    _take(s, first)
    assert len(a.block_hashes) == 1  # block 2's last token id is not known yet
    _take(s, second)
    assert len(a.block_hashes) == 2


# ---- pipelined PP: one step per stage in flight, micro-batches of disjoint sequences ----------------

def test_a_pipeline_fills_its_stages_with_disjoint_micro_batches():
    """Two stages, 2 sequences a step: the second step takes other sequences than the first (whose
    tokens are on the last stage), and 4 run at once; a sequence comes back once its token is in."""
    s = _sched(seqs=2, depth=2)
    seqs = [_add(s, i, 3) for i in range(5)]
    first, second = _launch(s), _launch(s)
    assert [c.seq for c in first.chunks] == seqs[:2] and [c.seq for c in second.chunks] == seqs[2:4]
    assert s.schedule().chunks == []  # 4 running (2 x 2), every one with a token on its way
    _take(s, first)
    third = _launch(s)
    assert [c.seq for c in third.chunks] == seqs[:2]  # decodes of the returned ones; seqs[4] still waits
    assert all(c.token_ids == [7] for c in third.chunks)  # their real token: no PENDING_TOKEN in a pipeline
    _take(s, second)
    assert [c.seq for c in _launch(s).chunks] == seqs[2:4]


def test_a_pipeline_runs_the_next_chunk_of_a_prompt_in_the_next_micro_batch():
    """A prefill chunk samples nothing: its sequence's next chunk can go in the next step (the stages
    run steps in order, so its KV is written first)."""
    s = _sched(tokens=8, depth=2)
    a = _add(s, 0, 12)
    first, second = _launch(s), _launch(s)
    assert [(c.seq, c.start, c.num_tokens, c.samples) for c in first.chunks + second.chunks] == \
        [(a, 0, 8, False), (a, 8, 4, True)]
    assert s.schedule().chunks == []  # its token is on its way


def test_one_stage_keeps_running_a_sequence_with_a_pending_token():
    """Without a pipeline (async scheduling) the same sequences run again, their input read on the device."""
    s = _sched(seqs=2)
    a, b, _ = (_add(s, i, 3) for i in range(3))
    _launch(s)
    assert [(c.seq, c.token_ids) for c in _launch(s).chunks] == [(a, [PENDING_TOKEN]), (b, [PENDING_TOKEN])]

