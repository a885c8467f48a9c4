"""Decode steps captured in CUDA graphs, one graph per batch-size bucket.

A decode step launches hundreds of small kernels (norms, rope, the NCCL
all-reduces of every layer); replaying them from a graph removes the launch
gaps. Each graph reads its inputs from static buffers; a smaller batch is
padded up to the next bucket with sequences that point at the scratch KV block
0 (never handed to a real sequence), so padding never touches real KV data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from dist_infer.engine.kv_cache import StepBatch

log = logging.getLogger(__name__)

SCRATCH_BLOCK = 0


def default_buckets(max_batch: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_batch]
    return buckets + [max_batch]


class DecodeGraphs:
    """step_fn(x, batch) -> output tensor; x is token ids [B] (first stage) or hidden [B, H]."""

    def __init__(self, step_fn: Callable[[torch.Tensor, StepBatch], torch.Tensor], buckets: list[int],
                 max_blocks_per_seq: int, hidden_size: int | None, dtype: torch.dtype, device: torch.device):
        self.step_fn = step_fn
        self.buckets = sorted(buckets)
        largest = self.buckets[-1]
        long = dict(dtype=torch.int64, device=device)
        # Static inputs, sized for the largest bucket; graphs read prefixes of them.
        self.x = (torch.zeros(largest, **long) if hidden_size is None
                  else torch.zeros(largest, hidden_size, dtype=dtype, device=device))
        self.positions = torch.zeros(largest, **long)
        self.slot_mapping = torch.zeros(largest, **long)
        self.block_tables = torch.full((largest, max_blocks_per_seq), SCRATCH_BLOCK, **long)
        self.context_lens = torch.ones(largest, **long)
        self.last_token_index = torch.arange(largest, **long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _static_batch(self, b: int) -> StepBatch:
        return StepBatch(self.x[:b] if self.x.ndim == 1 else None, self.positions[:b], self.slot_mapping[:b],
                         self.block_tables[:b], list(range(b + 1)), [1] * b, self.last_token_index[:b],
                         self.context_lens[:b])

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):  # largest first so smaller graphs reuse its pool
                batch = self._static_batch(b)
                for _ in range(2):  # warm up: Triton compiles, NCCL connects, cuBLAS picks kernels
                    self.step_fn(self.x[:b], batch)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[b] = self.step_fn(self.x[:b], batch)
                self.graphs[b] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket(self, batch: StepBatch) -> int | None:
        if not batch.is_decode or batch.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        return next((b for b in self.buckets if b >= batch.num_seqs), None)

    def replay(self, x: torch.Tensor, batch: StepBatch, b: int) -> torch.Tensor:
        n, width = batch.num_seqs, batch.block_tables.shape[1]
        self.x[:n].copy_(x)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        self.block_tables[:n, width:].fill_(SCRATCH_BLOCK)
        self.context_lens[:n].copy_(batch.context_lens_tensor)
        if b > n:  # padding rows: write to and read from the scratch block only
            self.positions[n:b].zero_()
            self.slot_mapping[n:b].fill_(SCRATCH_BLOCK)
            self.block_tables[n:b].fill_(SCRATCH_BLOCK)
            self.context_lens[n:b].fill_(1)
        self.graphs[b].replay()
        return self.outputs[b][:n]

    def close(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
