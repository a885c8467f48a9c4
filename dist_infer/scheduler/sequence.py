"""A sequence: one request's tokens and its place in the KV cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and queued again (its KV freed, its tokens kept)
    RUNNING = "running"    # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]   # prompt, then every sampled token
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # leading tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hash of each full, computed block
    num_blocks_sent: int = 0   # leading block_ids the ranks already hold (plans carry only the rest)
    announced: bool = False    # the ranks have its sampling parameters
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its last admission
    num_preemptions: int = 0
    reuse_prefix: bool = True   # False when every prompt position's logits are needed (prompt logprobs)
    # Tokens sampled by launched steps, not yet back on the host (async scheduling: the next step
    # is planned while this one runs, its input read from the device). They count as tokens to run.
    num_pending: int = 0
    max_tokens: int | None = None  # the most tokens it may reach (prompt + max_new_tokens, max_seq_len)

    @classmethod
    def from_prompt(cls, seq_id: int, prompt_ids: list[int]) -> Sequence:
        return cls(seq_id, list(prompt_ids), len(prompt_ids))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        """len(output_ids) without the copy (asked for every sequence at every step)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_scheduled_tokens(self) -> int:
        """Its tokens on the host and those pending on the device."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run before the next sample: the prompt (or its rest) in
        prefill, 1 in decode, everything again after a preemption; none once its last
        allowed token is sampled (that token's KV is never needed)."""
        total = self.num_scheduled_tokens
        if self.max_tokens is not None and total >= self.max_tokens:
            return 0
        return total - self.num_computed

    def take_new_blocks(self) -> list[int]:
        """Blocks the ranks have not been told about yet (a plan delta)."""
        new = self.block_ids[self.num_blocks_sent:]
        self.num_blocks_sent = len(self.block_ids)
        return new
