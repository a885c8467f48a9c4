"""Paged-KV block manager with refcounts and prefix caching.

Block 0 is the engine's scratch block (CUDA-graph padding writes there) and is
never handed out. A full block whose KV has been computed is registered under
a chain hash of its tokens (and, through the parent hash, of every token
before it), so a later sequence that starts with the same tokens reuses the
block instead of recomputing it. Free blocks keep their contents and their
hash until they are needed for something else: the free list is an LRU queue,
and a cache hit takes a block back out of it.

Only full blocks are ever shared, and a sequence writes KV only past its
computed prefix, so a shared block is never written: no copy-on-write needed.
A forked sequence (a beam of beam search) shares its parent's full blocks the
same way and recomputes the tokens of the parent's partial last block into a
block of its own (at most block_size - 1 tokens, in the fork's first step): the
"copy" of copy-on-write is a recompute, so the ranks need no block-copy op.
"""

from __future__ import annotations

from collections import OrderedDict

from dist_infer.scheduler.sequence import Sequence

SCRATCH_BLOCK = 0


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> tuple[int | None, tuple[int, ...]]:
    """The cache key of a full block: its parent's hash and its own tokens (compared
    by equality, so only a collision of 64-bit parent hashes could alias two blocks)."""
    return (parent, tokens)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_blocks
        # Free blocks in eviction order (first = least recently freed). An OrderedDict, not a dict:
        # a dict keeps the slots of keys deleted from its front, so finding its first key walks
        # past every block taken since its last resize (~20 us a block at 1,024 sequences).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached: dict[tuple, int] = {}     # block key -> block id
        self.key_of: dict[int, tuple] = {}     # block id -> its key, while it is cached
        self.prefix_queries = 0                # prompt tokens looked up in the cache
        self.prefix_hits = 0                   # of which found

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of the usable pool held by sequences."""
        return 1.0 - len(self.free) / (self.num_blocks - 1)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def take_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached
        prefix; returns the tokens covered. At least one token is always left to
        compute, since the next token is sampled from its logits."""
        assert not seq.block_ids, "prefix lookup is for a sequence that holds no blocks"
        seq.num_computed = seq.num_cached_tokens = 0
        if not self.enable_prefix_caching or not seq.reuse_prefix:
            return 0
        full = (seq.num_tokens - 1) // self.block_size
        self.prefix_queries += seq.num_tokens
        parent = None
        for i in range(full):
            key = block_hash(parent, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size]))
            block = self.cached.get(key)
            if block is None:
                break
            self._ref(block)
            seq.block_ids.append(block)
            seq.block_hashes.append(hash(key))
            parent = hash(key)
        seq.num_computed = seq.num_cached_tokens = len(seq.block_ids) * self.block_size
        self.prefix_hits += seq.num_computed
        return seq.num_computed

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Blocks for the sequence to hold num_computed + num_new_tokens tokens;
        False, and nothing taken, if the pool is short."""
        need = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_ids)
        if need > len(self.free):
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)  # the least recently freed
            self._evict(block)
            self.refcount[block] = 1
            seq.block_ids.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache
        (call after a step computed their KV)."""
        if not self.enable_prefix_caching:
            return
        known = min(seq.num_computed, seq.num_tokens)  # a pending token's id is not known yet
        full = min(known // self.block_size, len(seq.block_ids))
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            key = block_hash(parent, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size]))
            seq.block_hashes.append(hash(key))
            block = seq.block_ids[i]
            if key not in self.cached and block not in self.key_of:
                self.cached[key] = block
                self.key_of[block] = key

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child (a copy of the parent's tokens, holding no blocks) references the parent's
        full computed blocks; the rest of its tokens are computed again into its own blocks."""
        assert not child.block_ids, "a fork starts with no blocks"
        full = min(parent.num_computed // self.block_size, len(parent.block_ids))
        for block in parent.block_ids[:full]:
            self._ref(block)
        child.block_ids = parent.block_ids[:full]
        child.block_hashes = parent.block_hashes[:full]
        child.num_computed = child.num_cached_tokens = full * self.block_size

    def forget_cached(self) -> None:
        """No cached block counts as a prefix any more (their KV came from weights since replaced);
        the blocks stay where they are, owned or free."""
        self.cached.clear()
        self.key_of.clear()

    def free_sequence(self, seq: Sequence) -> None:
        """Drop the sequence's references. The tail goes into the queue first, so
        it is evicted before the (more often shared) head of the sequence."""
        for block in reversed(seq.block_ids):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free[block] = None
        seq.block_ids, seq.block_hashes = [], []
        seq.num_computed = seq.num_blocks_sent = 0

    def _ref(self, block: int) -> None:
        if self.refcount[block] == 0:
            del self.free[block]
        self.refcount[block] += 1

    def _evict(self, block: int) -> None:
        """A free block is about to hold new KV: it no longer caches the old."""
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.cached[key]
