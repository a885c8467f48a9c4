"""The per-rank process: every rank runs the same step plan.

Step data flow (PP stages are TP groups; TP rank t talks to TP rank t of the
neighbouring stages):
    rank 0 broadcasts StepPlan -> first stage embeds tokens -> each stage runs
    its layers, sends hidden [N, H] to the next -> last stage computes logits
    [B, V] -> its TP rank 0 samples -> tokens [B] go to rank 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dist_infer.comm.groups import ParallelGroups
from dist_infer.engine.kv_cache import StepBatch
from dist_infer.engine.runtime import RankEngine
from dist_infer.engine.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class SeqWork:
    """One sequence's share of a step."""

    seq_id: int
    token_ids: list[int]   # new tokens: the prompt (prefill) or the last sampled token (decode)
    start_pos: int         # position of token_ids[0]
    block_table: list[int]
    sampling: SamplingParams | None = None  # sent with the sequence's first step only


@dataclass
class StepPlan:
    seqs: list[SeqWork]
    finished: list[int] = field(default_factory=list)  # seq ids whose sampler state to drop
    return_logits: bool = False


@dataclass
class StepResult:
    tokens: list[int]                   # one per sequence, in plan order
    logits: torch.Tensor | None = None  # [B, V] float32 when the plan asked


class RankWorker:
    def __init__(self, engine: RankEngine, groups: ParallelGroups):
        self.engine = engine
        self.groups = groups
        self.mapping = groups.mapping
        self.sampler = Sampler(engine.device) if self.mapping.rank == self.mapping.sampler_rank else None

    def execute(self, plan: StepPlan) -> StepResult | None:
        """Run this rank's part of a step. Returns the result on rank 0 only."""
        m, engine = self.mapping, self.engine
        batch = StepBatch.build([(s.token_ids, s.start_pos, s.block_table) for s in plan.seqs],
                                engine.spec.build.kv_block_size, engine.device)
        if m.is_first_stage:
            x = batch.input_ids
        else:
            x = torch.empty(batch.num_tokens, engine.spec.model.hidden_size, dtype=engine.dtype, device=engine.device)
            self.groups.pp.recv(x, src=m.pp_rank - 1)
        out = engine.step(x, batch)  # hidden [N, H], or logits [B, V] on the last stage
        if not m.is_last_stage:
            self.groups.pp.send(out, dst=m.pp_rank + 1)
        result = None
        if m.is_last_stage:
            logits = out
            if self.sampler is not None:
                result = StepResult(self._sample(plan, logits).tolist(), logits if plan.return_logits else None)
        return self._deliver(plan, result)

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> torch.Tensor:
        for seq in plan.seqs:
            if seq.sampling is not None:
                self.sampler.add(seq.seq_id, seq.sampling)
        tokens = self.sampler(logits, [s.seq_id for s in plan.seqs])
        for seq_id in plan.finished:
            self.sampler.drop(seq_id)
        return tokens

    def _deliver(self, plan: StepPlan, result: StepResult | None) -> StepResult | None:
        """Tokens (and logits, if asked) from the sampler rank to rank 0."""
        world, src = self.groups.world, self.mapping.sampler_rank
        if src == 0:
            return result
        n = len(plan.seqs)
        if world.rank == src:
            world.send(torch.tensor(result.tokens, dtype=torch.int64), dst=0)
            if plan.return_logits:
                world.send(result.logits.cpu(), dst=0)
            return None
        if world.rank != 0:
            return None
        tokens = world.recv(torch.empty(n, dtype=torch.int64), src=src)
        logits = None
        if plan.return_logits:
            logits = world.recv(torch.empty(n, self.engine.spec.model.vocab_size, dtype=torch.float32), src=src)
        return StepResult(tokens.tolist(), logits)

    def serve(self) -> None:
        """Ranks other than 0: run whatever rank 0 plans until it sends None."""
        while (plan := self.groups.world.broadcast_object(None)) is not None:
            self.execute(plan)

    def step(self, plan: StepPlan) -> StepResult:
        """Rank 0: broadcast the plan and run it."""
        self.groups.world.broadcast_object(plan)
        return self.execute(plan)

    def stop(self) -> None:
        """Rank 0: release the other ranks from `serve`."""
        self.groups.world.broadcast_object(None)

    def close(self) -> None:
        """Shut down in order: CUDA graphs, then device communicators (MPI finalizes at exit)."""
        self.engine.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.groups.close()
