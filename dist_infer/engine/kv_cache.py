"""Paged KV cache and the ragged step batch that indexes it.

The cache is a pool of fixed-size blocks per layer; each sequence owns a list
of blocks (its block table), assigned by the coordinator's block manager. A
step mixes sequences in prefill (many tokens) and decode (one token); their
tokens are concatenated into one [N] batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class StepBatch:
    """One ragged step. N = tokens in the step, B = sequences."""

    input_ids: torch.Tensor        # [N] int64 (used by the first stage only)
    positions: torch.Tensor        # [N] int64, position of each token in its sequence
    slot_mapping: torch.Tensor     # [N] int64, flat cache slot (block * block_size + offset) each token writes
    block_tables: torch.Tensor     # [B, max_blocks] int64, padded with 0
    query_starts: list[int]        # B+1 offsets of each sequence's tokens in [N]
    context_lens: list[int]        # B, tokens in cache after this step
    last_token_index: torch.Tensor  # [B] int64, the token whose logits are sampled
    context_lens_tensor: torch.Tensor  # [B] int64, context_lens on the device (for kernels and graphs)
    query_starts_tensor: torch.Tensor | None = None  # [B+1] int64, query_starts on the device (varlen kernel)
    varlen: bool = False  # every row through one varlen kernel (a mixed step in a CUDA graph)

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token (a varlen batch is never one)."""
        return not self.varlen and self.num_tokens == self.num_seqs

    @property
    def num_tokens(self) -> int:
        return self.query_starts[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @classmethod
    def build(cls, seqs: list[tuple[list[int], int, list[int]]], block_size: int,
              device: torch.device | str = "cpu") -> StepBatch:
        """seqs: (new token ids, position of the first of them, block table) per sequence.
        Every index tensor travels to the device in one host-to-device copy."""
        for i, (tokens, start, table) in enumerate(seqs):
            if start + len(tokens) > len(table) * block_size:
                raise ValueError(f"sequence {i}: {start + len(tokens)} tokens but only {len(table)} blocks "
                                 f"of {block_size}")
        max_blocks = max(len(table) for _, _, table in seqs)
        decode = all(len(tokens) == 1 for tokens, _, _ in seqs)
        lists = (_decode_lists if decode else _ragged_lists)(seqs, block_size)
        lists.append(_padded_tables(seqs, max_blocks))
        packed = torch.from_numpy(_pack_aligned(lists))
        if torch.device(device).type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        parts = [p[: len(part)] for p, part in zip(packed.split([len(x) + len(x) % 2 for x in lists]), lists)]
        ids, positions, slots, last, ctx, starts, tables = parts
        return cls(ids, positions, slots, tables.view(len(seqs), max_blocks), lists[5], lists[4], last, ctx, starts)


def _decode_lists(seqs: list[tuple[list[int], int, list[int]]], block_size: int) -> list[list[int]]:
    """[ids, positions, slots, last token rows, context lengths, query starts] of a step where every
    row brings one token (most steps at load): comprehensions, no per-row loop (build 1.6x at 1,024 rows)."""
    positions = [start for _, start, _ in seqs]
    slots = [table[p // block_size] * block_size + p % block_size for _, p, table in seqs]
    rows = list(range(len(seqs) + 1))
    return [[tokens[0] for tokens, _, _ in seqs], positions, slots, rows[:-1], [p + 1 for p in positions], rows]


def _ragged_lists(seqs: list[tuple[list[int], int, list[int]]], block_size: int) -> list[list[int]]:
    """The same lists for rows of any length (prefill chunks beside decodes)."""
    ids, positions, slots, starts, ctx = [], [], [], [0], []
    for tokens, start, table in seqs:
        end = start + len(tokens)
        ids += tokens
        positions += range(start, end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        starts.append(starts[-1] + len(tokens))
        ctx.append(end)
    return [ids, positions, slots, [s - 1 for s in starts[1:]], ctx, starts]


def _padded_tables(seqs: list[tuple[list[int], int, list[int]]], max_blocks: int) -> list[int]:
    """Every block table padded with 0 to max_blocks, row after row: [B * max_blocks]."""
    pads = [[0] * n for n in range(max_blocks + 1)]
    flat: list[int] = []
    for _, _, table in seqs:
        flat += table
        flat += pads[max_blocks - len(table)]
    return flat


def _pack_aligned(parts: list[list[int]]) -> np.ndarray:
    """The parts back to back as int64, each starting 16-byte aligned (an even offset): Triton
    specializes a kernel on its pointers' alignment, and parts at step-dependent offsets would
    compile new variants mid-run. (One list to numpy: 0.6x the host time of array.extend per part.)"""
    flat: list[int] = []
    for part in parts:
        flat += part
        if len(part) % 2:
            flat.append(0)
    return np.array(flat, dtype=np.int64)


# Storage for --kv-cache-dtype (config.KV_CACHE_DTYPES); "auto" keeps the engine's dtype.
KV_STORAGE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: e4m3 saturates here, past it is NaN


class PagedKVCache:
    """K and V pools per local layer: [num_blocks * block_size, kv_heads, head_dim].

    `dtype` is what attention computes in; `storage_dtype` what the pools hold
    (default: the same). An FP8 pool stores value / scale as float8 e4m3, clamped to
    +-448, with one float32 scale per layer for K and one for V (`k_scale`, `v_scale`
    [num_layers]); readers upcast and multiply back. The scales are 1.0, vLLM's
    default without calibration data: K and V of Llama-family models stay far
    below 448, and e4m3 keeps ~2 significant digits from 2**-6 up."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", storage_dtype: torch.dtype | None = None):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.storage_dtype = storage_dtype or dtype
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        # torch.empty: pages the OS never touches cost no memory on the CPU.
        self.k = torch.empty(shape, dtype=self.storage_dtype, device=device)
        self.v = torch.empty(shape, dtype=self.storage_dtype, device=device)
        # Fixed device tensors, so CUDA graphs read whatever they hold at replay.
        self.k_scale = torch.ones(num_layers, dtype=torch.float32, device=device)
        self.v_scale = torch.ones(num_layers, dtype=torch.float32, device=device)

    @property
    def quantized(self) -> bool:
        return self.storage_dtype == torch.float8_e4m3fn

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                    storage_dtype: torch.dtype) -> int:
        """Bytes of one block across this rank's layers, K and V."""
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=storage_dtype).element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        # k, v: [N, kv_heads, hd] in the compute dtype; slot_mapping [N]
        self._store(self.k[layer], k, self.k_scale[layer], slot_mapping)
        self._store(self.v[layer], v, self.v_scale[layer], slot_mapping)

    def _store(self, pool: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor) -> None:
        if not self.quantized:
            pool.index_copy_(0, slots, x)
            return
        q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(self.storage_dtype)
        # index_copy_ has no float8 CPU kernel: copy the bytes.
        pool.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` [S] in the compute dtype: [S, kv_heads, hd] each."""
        k, v = self.k[layer, slots], self.v[layer, slots]
        if not self.quantized:
            return k, v
        return (k.float() * self.k_scale[layer]).to(self.dtype), (v.float() * self.v_scale[layer]).to(self.dtype)

    def sequence_slots(self, block_table: torch.Tensor, length: int) -> torch.Tensor:
        offsets = torch.arange(self.block_size, device=block_table.device)
        return (block_table[:, None] * self.block_size + offsets).reshape(-1)[:length]


def paged_attention_reference(q: torch.Tensor, cache: PagedKVCache, layer: int, batch: StepBatch,
                              scale: float, sliding_window: int | None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys.
    q [N, heads, hd] -> [N, heads, hd]. Portable (CPU and GPU), one sequence at a time."""
    out = torch.empty_like(q)
    for i in range(batch.num_seqs):
        qs, qe, ctx = batch.query_starts[i], batch.query_starts[i + 1], batch.context_lens[i]
        blocks = batch.block_tables[i, : -(-ctx // cache.block_size)]
        slots = cache.sequence_slots(blocks, ctx)
        k, v = cache.read(layer, slots)  # [ctx, kv_heads, hd], upcast from FP8 storage
        q_pos = batch.positions[qs:qe, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos  # [n, ctx]
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[qs:qe] = o.transpose(0, 1)
    return out
