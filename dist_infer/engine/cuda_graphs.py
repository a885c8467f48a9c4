"""Steps captured in CUDA graphs.

A step launches hundreds of small kernels (norms, rope, the NCCL all-reduces
of every layer); replaying them from a graph removes the launch gaps, which at
decode sizes are most of the step. Two families share one memory pool:

- `DecodeGraphs`: pure decode steps, one graph per batch-size bucket. A smaller
  batch is padded up with sequences that point at the scratch KV block 0 (never
  handed to a real sequence), so padding never touches real KV data.
- `MixedGraphs`: steps that prefill (prompt chunks, prefix-cached prompts) and
  decode together, one graph per token-count bucket, with attention in one
  varlen kernel whose launch depends only on the bucket. Padding tokens write to
  the scratch block and belong to no sequence. Under live traffic most steps
  admit a request, so these steps are as common as pure decodes.

Each graph reads static input buffers; outputs land in one shared buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from dist_infer.engine.kv_cache import StepBatch

log = logging.getLogger(__name__)

SCRATCH_BLOCK = 0
MIXED_TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)

StepFn = Callable[[torch.Tensor, StepBatch], torch.Tensor]


def default_buckets(max_batch: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768) if b < max_batch]
    return buckets + [max_batch]


class _StepGraphs:
    """Static inputs sized for `max_tokens` tokens of `max_seqs` sequences; subclasses
    say which (tokens, seqs) each bucket holds and how a step fills the buffers."""

    kind = "step"
    varlen = False  # the static batch's attention: decode kernel, or the varlen kernel

    def __init__(self, step_fn: StepFn, buckets: list[int], max_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 hidden_size: int | None, dtype: torch.dtype, device: torch.device, pool=None):
        self.step_fn = step_fn
        self.buckets = sorted(buckets)
        long = dict(dtype=torch.int64, device=device)
        self.x = (torch.zeros(max_tokens, **long) if hidden_size is None
                  else torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device))
        self.positions = torch.zeros(max_tokens, **long)
        self.slot_mapping = torch.zeros(max_tokens, **long)
        self.block_tables = torch.full((max_seqs, max_blocks_per_seq), SCRATCH_BLOCK, **long)
        self.context_lens = torch.ones(max_seqs, **long)
        self.query_starts = torch.zeros(max_seqs + 1, **long)
        self.last_token_index = torch.arange(max_seqs, **long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: torch.Tensor | None = None  # every graph writes a prefix of it
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool

    def shape(self, bucket: int) -> tuple[int, int]:
        """(tokens, sequences) of a bucket's graph."""
        raise NotImplementedError

    def _static_batch(self, bucket: int) -> StepBatch:
        n, b = self.shape(bucket)
        starts = list(range(n + 1)) if not self.varlen else [0] * b + [n]  # only their count and end matter
        return StepBatch(self.x[:n] if self.x.ndim == 1 else None, self.positions[:n], self.slot_mapping[:n],
                         self.block_tables[:b], starts, [1] * b, self.last_token_index[:b], self.context_lens[:b],
                         self.query_starts[: b + 1], varlen=self.varlen)

    def warm_up(self) -> None:
        """One eager step of each bucket's shape, largest first, outside any graph: the kernels
        the graphs will hold are compiled (RankEngine runs this while its weights arrive)."""
        for bucket in reversed(self.buckets):
            n, _ = self.shape(bucket)
            self.step_fn(self.x[:n], self._static_batch(bucket))

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in reversed(self.buckets):  # largest first so smaller graphs reuse its pool
                self._capture_one(bucket, stream)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured %s CUDA graphs for %s", self.kind, self.buckets)

    def _capture_one(self, bucket: int, stream: torch.cuda.Stream) -> None:
        n, _ = self.shape(bucket)
        batch = self._static_batch(bucket)
        for _ in range(2):  # warm up: Triton compiles, NCCL connects, cuBLAS picks kernels
            out = self.step_fn(self.x[:n], batch)
        if self.out is None:  # the largest bucket comes first: its output bounds every other
            self.out = torch.empty_like(out)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out = self.step_fn(self.x[:n], batch)
            self.out[: out.shape[0]].copy_(out)
        self.graphs[bucket] = graph

    def _copy_tokens(self, x: torch.Tensor, batch: StepBatch, tokens: int) -> None:
        """The step's tokens, then padding tokens (position 0, writing the scratch block)."""
        n = batch.num_tokens
        self.x[:n].copy_(x)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        if tokens > n:
            self.positions[n:tokens].zero_()
            self.slot_mapping[n:tokens].fill_(SCRATCH_BLOCK)

    def _copy_tables(self, batch: StepBatch) -> None:
        b, width = batch.num_seqs, batch.block_tables.shape[1]
        self.block_tables[:b, :width].copy_(batch.block_tables)
        self.block_tables[:b, width:].fill_(SCRATCH_BLOCK)
        self.context_lens[:b].copy_(batch.context_lens_tensor)

    def _fits(self, batch: StepBatch) -> bool:
        return (batch.block_tables.shape[1] <= self.block_tables.shape[1]
                and batch.last_token_index.shape[0] == batch.num_seqs)

    def close(self) -> None:
        self.graphs.clear()
        self.out = None


class DecodeGraphs(_StepGraphs):
    """step_fn(x, batch) -> output; x is token ids [B] (first stage) or hidden [B, H]."""

    kind = "decode"

    def __init__(self, step_fn: StepFn, buckets: list[int], max_blocks_per_seq: int, hidden_size: int | None,
                 dtype: torch.dtype, device: torch.device, pool=None):
        largest = max(buckets)
        super().__init__(step_fn, buckets, largest, largest, max_blocks_per_seq, hidden_size, dtype, device, pool)

    def shape(self, bucket: int) -> tuple[int, int]:
        return bucket, bucket

    def bucket(self, batch: StepBatch) -> int | None:
        if not batch.is_decode or not self._fits(batch):
            return None
        return next((b for b in self.buckets if b >= batch.num_seqs), None)

    def replay(self, x: torch.Tensor, batch: StepBatch, b: int) -> torch.Tensor:
        n = batch.num_seqs
        self._copy_tokens(x, batch, b)
        self._copy_tables(batch)
        if b > n:  # padding rows: read one scratch slot
            self.block_tables[n:b].fill_(SCRATCH_BLOCK)
            self.context_lens[n:b].fill_(1)
        self.graphs[b].replay()
        return self.out[:n]


class MixedGraphs(_StepGraphs):
    """Steps of up to `max(buckets)` tokens from up to `max_seqs` sequences, any mix of
    prefill and decode. Bucket t holds t tokens of min(t, max_seqs) sequences."""

    kind = "mixed-step"
    varlen = True

    def __init__(self, step_fn: StepFn, buckets: list[int], max_seqs: int, max_blocks_per_seq: int,
                 hidden_size: int | None, returns_logits: bool, dtype: torch.dtype, device: torch.device, pool=None):
        self.max_seqs = max_seqs
        self.returns_logits = returns_logits  # last stage: [seqs, V] logits; otherwise [tokens, H] hidden
        super().__init__(step_fn, buckets, max(buckets), min(max_seqs, max(buckets)), max_blocks_per_seq,
                         hidden_size, dtype, device, pool)

    def shape(self, bucket: int) -> tuple[int, int]:
        return bucket, min(bucket, self.max_seqs)

    def bucket(self, batch: StepBatch) -> int | None:
        if batch.is_decode or not self._fits(batch):
            return None
        return next((t for t in self.buckets if t >= batch.num_tokens and self.shape(t)[1] >= batch.num_seqs), None)

    def replay(self, x: torch.Tensor, batch: StepBatch, bucket: int) -> torch.Tensor:
        n, b = batch.num_tokens, batch.num_seqs
        tokens, seqs = self.shape(bucket)
        self._copy_tokens(x, batch, tokens)
        self._copy_tables(batch)
        self.query_starts[: b + 1].copy_(batch.query_starts_tensor)
        self.query_starts[b + 1 : seqs + 1].fill_(n)  # padding sequences: no queries
        self.last_token_index[:b].copy_(batch.last_token_index)
        self.last_token_index[b:seqs].zero_()
        self.graphs[bucket].replay()
        return self.out[: b if self.returns_logits else n]

