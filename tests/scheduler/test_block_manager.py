"""BlockManager: refcounts, the scratch block, prefix hits, LRU eviction."""

from __future__ import annotations

import pytest

from dist_infer.scheduler import BlockManager, Sequence

BS = 4


def _seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence.from_prompt(seq_id, tokens)


def _computed(bm: BlockManager, seq: Sequence) -> None:
    """As if a step ran every token of the sequence."""
    assert bm.allocate(seq, seq.num_uncomputed)
    seq.num_computed = seq.num_tokens
    bm.commit(seq)


def test_scratch_block_never_handed_out_and_pool_exhausts():
    bm = BlockManager(5, BS)
    seq = _seq(0, list(range(16)))
    assert bm.allocate(seq, 16)
    assert sorted(seq.block_ids) == [1, 2, 3, 4] and bm.num_free == 0 and bm.usage == 1.0
    other = _seq(1, [1])
    assert not bm.allocate(other, 1) and other.block_ids == []  # short: nothing taken
    bm.free_sequence(seq)
    assert bm.num_free == 4 and bm.usage == 0.0


def test_allocate_grows_one_block_at_a_time():
    bm = BlockManager(10, BS)
    seq = _seq(0, [1, 2, 3])
    assert bm.allocate(seq, 3) and len(seq.block_ids) == 1
    seq.num_computed = 3
    assert bm.allocate(seq, 1) and len(seq.block_ids) == 1   # position 3 still fits block 0
    seq.num_computed = 4
    assert bm.allocate(seq, 1) and len(seq.block_ids) == 2   # position 4 needs a new block


def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    bm = BlockManager(20, BS)
    a = _seq(0, list(range(10)))          # blocks [0..3], [4..7] full, [8, 9] partial
    _computed(bm, a)
    b = _seq(1, list(range(8)) + [99])    # shares the two full blocks
    assert bm.take_cached_prefix(b) == 8
    assert b.block_ids == a.block_ids[:2] and b.num_computed == 8
    assert bm.refcount[a.block_ids[0]] == 2
    # A prompt that is exactly the cached blocks still computes its last token.
    c = _seq(2, list(range(8)))
    assert bm.take_cached_prefix(c) == 4 and c.num_uncomputed == 4
    # A different first block: no hit even though later tokens match.
    d = _seq(3, [7] + list(range(1, 8)) + [5])
    assert bm.take_cached_prefix(d) == 0
    assert bm.hit_rate == pytest.approx(12 / (9 + 8 + 9))


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(5, BS)                 # 4 usable blocks
    a = _seq(0, list(range(9)))              # 2 full blocks + 1
    _computed(bm, a)
    bm.free_sequence(a)
    assert bm.num_free == 4
    b = _seq(1, list(range(8)) + [42])
    assert bm.take_cached_prefix(b) == 8     # reused after the owner finished
    bm.free_sequence(b)
    # Fill the pool with other tokens: the cached blocks are evicted and no longer hit.
    filler = _seq(2, [50 + i for i in range(16)])
    assert bm.allocate(filler, 16)
    bm.free_sequence(filler)
    c = _seq(3, list(range(8)) + [42])
    assert bm.take_cached_prefix(c) == 0


def test_tail_blocks_evicted_before_head():
    bm = BlockManager(4, BS)                 # 3 usable
    a = _seq(0, list(range(9)))
    _computed(bm, a)                         # blocks h0, h1 cached, tail partial
    bm.free_sequence(a)
    one = _seq(1, [77])
    assert bm.allocate(one, 1)               # evicts the least recently freed: the tail
    assert one.block_ids == [a_tail := one.block_ids[0]] and a_tail not in bm.key_of
    b = _seq(2, list(range(8)) + [5])
    assert bm.take_cached_prefix(b) == 8     # both head blocks survived


def test_shared_block_freed_only_when_last_reference_drops():
    bm = BlockManager(10, BS)
    a = _seq(0, list(range(5)))
    _computed(bm, a)
    b = _seq(1, list(range(4)) + [9])
    bm.take_cached_prefix(b)
    shared = a.block_ids[0]
    bm.free_sequence(a)
    assert shared not in bm.free and bm.refcount[shared] == 1
    bm.free_sequence(b)
    assert shared in bm.free and bm.refcount[shared] == 0


def test_sequence_that_needs_prompt_logits_reuses_no_prefix():
    bm = BlockManager(10, BS)
    _computed(bm, _seq(0, list(range(9))))
    b = _seq(1, list(range(9)))
    b.reuse_prefix = False
    assert bm.take_cached_prefix(b) == 0 and b.block_ids == []


def test_prefix_caching_off():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = _seq(0, list(range(9)))
    _computed(bm, a)
    assert bm.take_cached_prefix(_seq(1, list(range(9)))) == 0 and not bm.cached


def test_forgotten_cache_gives_no_prefix_and_keeps_blocks_owned():
    """After a weight update the cached KV is stale: no hit, but the owner keeps its blocks."""
    bm = BlockManager(20, BS)
    a = _seq(0, list(range(10)))
    _computed(bm, a)
    owned = list(a.block_ids)
    bm.forget_cached()
    assert bm.take_cached_prefix(_seq(1, list(range(8)) + [99])) == 0
    assert a.block_ids == owned and all(bm.refcount[b] == 1 for b in owned)
    bm.free_sequence(a)
    assert bm.take_cached_prefix(_seq(2, list(range(8)) + [99])) == 0
