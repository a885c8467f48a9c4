"""Paged KV cache: StepBatch slot mapping / block tables, and paged attention
over scattered blocks against a plain contiguous causal-attention reference."""

from __future__ import annotations

import math

import pytest
import torch

from dist_infer.engine.kv_cache import PagedKVCache, StepBatch, paged_attention_reference

# float32 throughout; the paged and contiguous computations differ only in
# summation order, so they agree to ~1e-6. Stated tolerance:
ATOL = RTOL = 1e-5


# ------------------------------------------------------------------ StepBatch

def test_step_batch_slots_and_tables():
    bs = 4
    seqs = [
        ([10, 11, 12, 13, 14, 15], 0, [9, 1]),   # prefill crossing a block boundary
        ([7], 5, [3, 8]),                          # decode at position 5 -> table[1] = block 8, offset 1
        ([20, 21, 22], 2, [6, 2]),                 # chunk continuing at position 2, spills into block 2
        ([30], 0, [5]),                            # one-block sequence: its table row is padded
    ]
    b = StepBatch.build(seqs, bs)
    assert b.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 7, 20, 21, 22, 30]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 5, 5, 2, 3, 4, 0]
    # block 9 -> slots 36..39, block 1 -> 4, 5; block 8 offset 1 -> 33;
    # block 6 offsets 2, 3 -> 26, 27, block 2 offset 0 -> 8; block 5 offset 0 -> 20
    assert b.slot_mapping.tolist() == [36, 37, 38, 39, 4, 5, 33, 26, 27, 8, 20]
    assert b.query_starts == [0, 6, 7, 10, 11]
    assert b.context_lens == [6, 6, 5, 1]
    assert b.last_token_index.tolist() == [5, 6, 9, 10]
    assert b.num_tokens == 11 and b.num_seqs == 4
    assert b.block_tables.tolist() == [[9, 1], [3, 8], [6, 2], [5, 0]]  # padded with 0
    for t in (b.input_ids, b.positions, b.slot_mapping, b.block_tables, b.last_token_index):
        assert t.dtype == torch.int64


def test_decode_step_batch_matches_the_same_rows_in_a_mixed_step():
    """A step of one-token rows (built by the decode path) holds exactly what those rows hold when a
    prompt chunk shares their step (the general path): slots, positions, tables, sampled rows."""
    bs = 4
    decodes = [([7], 5, [3, 8]), ([9], 0, [5]), ([4], 11, [1, 2, 6]), ([2], 3, [0])]
    alone = StepBatch.build(decodes, bs)
    mixed = StepBatch.build([([1, 2, 3], 0, [9])] + decodes, bs)
    assert alone.is_decode and not mixed.is_decode
    assert alone.slot_mapping.tolist() == mixed.slot_mapping.tolist()[3:] == [33, 20, 27, 3]
    assert alone.positions.tolist() == mixed.positions.tolist()[3:] == [5, 0, 11, 3]
    assert alone.input_ids.tolist() == [7, 9, 4, 2]
    assert alone.last_token_index.tolist() == [0, 1, 2, 3] and alone.query_starts == [0, 1, 2, 3, 4]
    assert alone.context_lens == [6, 1, 12, 4] == alone.context_lens_tensor.tolist()
    assert alone.block_tables.tolist() == mixed.block_tables.tolist()[1:] == [[3, 8, 0], [5, 0, 0], [1, 2, 6], [0, 0, 0]]


@pytest.mark.parametrize("lengths", [[1], [3, 1, 1], [5, 1, 2, 7, 1], [16, 17], [2, 2, 2, 2, 2, 2, 2]])
def test_step_batch_tensors_start_16_byte_aligned(lengths):
    """Every index tensor of a step starts 16-byte aligned whatever the step's token and sequence
    counts: GPU kernels are compiled per pointer alignment, so a misaligned step would compile
    (seconds) in the middle of a run. Values are those of the unpadded layout."""
    seqs = [(list(range(100 * i, 100 * i + n)), 0, list(range(1 + 3 * i, 1 + 3 * i + 1 + (n - 1) // 16 + i % 3)))
            for i, n in enumerate(lengths)]
    b = StepBatch.build(seqs, 16)
    tensors = (b.input_ids, b.positions, b.slot_mapping, b.block_tables, b.last_token_index,
               b.context_lens_tensor, b.query_starts_tensor)
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    assert b.input_ids.tolist() == [t for ids, _, _ in seqs for t in ids]
    assert b.context_lens_tensor.tolist() == lengths and b.query_starts_tensor.tolist() == b.query_starts
    assert b.block_tables.shape == (len(lengths), max(len(t) for _, _, t in seqs))
    assert b.block_tables[:, 0].tolist() == [t[0] for _, _, t in seqs]


def test_step_batch_refuses_too_few_blocks():
    StepBatch.build([([1, 2, 3, 4], 0, [0])], 4)  # exactly one full block: fine
    with pytest.raises(ValueError, match="blocks"):
        StepBatch.build([([1, 2, 3, 4, 5], 0, [0])], 4)
    with pytest.raises(ValueError, match="blocks"):
        StepBatch.build([([1], 0, [2]), ([9], 4, [1])], 4)  # decode at position 4 needs a second block


def test_step_batch_slots_are_unique_per_sequence_blocks():
    bs = 3
    seqs = [(list(range(7)), 0, [4, 0, 2]), (list(range(5)), 0, [1, 5])]
    b = StepBatch.build(seqs, bs)
    slots = b.slot_mapping.tolist()
    assert len(set(slots)) == len(slots)
    assert slots[:7] == [12, 13, 14, 0, 1, 2, 6]
    assert slots[7:] == [3, 4, 5, 15, 16]


def test_cache_write_and_sequence_slots():
    cache = PagedKVCache(num_layers=2, num_blocks=6, block_size=4, kv_heads=1, head_dim=2, dtype=torch.float32)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    k = torch.arange(12, dtype=torch.float32).view(6, 1, 2)
    slots = torch.tensor([20, 21, 22, 23, 8, 9])
    cache.write(1, k, -k, slots)
    assert torch.equal(cache.k[1, slots], k) and torch.equal(cache.v[1, slots], -k)
    assert torch.isnan(cache.k[0]).all()  # other layers untouched
    seq_slots = cache.sequence_slots(torch.tensor([5, 2]), 6)
    assert seq_slots.tolist() == [20, 21, 22, 23, 8, 9]


# ----------------------------------------------------------- paged attention

def contiguous_attention(q, k, v, positions, scale, window):
    """Plain causal attention of one sequence: q [n, H, D] at `positions`,
    k/v [ctx, KVH, D] for positions 0..ctx-1 (GQA: query head h uses KV head
    h // (H // KVH)). Explicit softmax in float32, no SDPA."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, k) * scale  # [H, n, ctx]
    qp = positions[:, None]
    kp = torch.arange(k.shape[0])[None, :]
    allowed = kp <= qp
    if window is not None:  # transformers' sliding window: q - k < window
        allowed &= (qp - kp) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


def _run_paged_vs_contiguous(window):
    torch.manual_seed(0)
    heads, kv_heads, hd, bs, num_blocks = 4, 2, 8, 4, 16
    scale = hd ** -0.5
    # (tokens already cached, new tokens this step, block table): a fresh
    # prefill, a decode, and a chunked prefill continuing a cached prefix.
    # Tables are scattered, out of order, and use block 0 (also the padding value).
    spec = [(0, 7, [11, 3]), (9, 1, [7, 0, 14]), (5, 3, [2, 9]), (0, 1, [5])]
    cache = PagedKVCache(1, num_blocks, bs, kv_heads, hd, torch.float32)
    cache.k.fill_(float("nan"))  # any read outside a sequence's own slots poisons the output
    cache.v.fill_(float("nan"))
    full_k, full_v = [], []
    for cached, new, table in spec:
        ctx = cached + new
        full_k.append(torch.randn(ctx, kv_heads, hd))
        full_v.append(torch.randn(ctx, kv_heads, hd))
    # Earlier steps wrote the cached prefixes.
    prefix = [(list(range(c)), 0, t) for (c, _, t) in spec if c]
    prefix_kv = [(fk[:c], fv[:c]) for (c, _, _), fk, fv in zip(spec, full_k, full_v) if c]
    pb = StepBatch.build(prefix, bs)
    cache.write(0, torch.cat([k for k, _ in prefix_kv]), torch.cat([v for _, v in prefix_kv]), pb.slot_mapping)
    # This step: the new tokens of every sequence in one ragged batch.
    batch = StepBatch.build([(list(range(n)), c, t) for c, n, t in spec], bs)
    new_k = torch.cat([fk[c:] for (c, _, _), fk in zip(spec, full_k)])
    new_v = torch.cat([fv[c:] for (c, _, _), fv in zip(spec, full_v)])
    cache.write(0, new_k, new_v, batch.slot_mapping)
    q = torch.randn(batch.num_tokens, heads, hd)
    out = paged_attention_reference(q, cache, 0, batch, scale, window)
    assert out.shape == q.shape and torch.isfinite(out).all()
    for i, (c, n, _) in enumerate(spec):
        qs, qe = batch.query_starts[i], batch.query_starts[i + 1]
        ref = contiguous_attention(q[qs:qe], full_k[i], full_v[i], torch.arange(c, c + n), scale, window)
        torch.testing.assert_close(out[qs:qe], ref, atol=ATOL, rtol=RTOL)
    return out, q, spec


def test_paged_attention_matches_contiguous_causal():
    _run_paged_vs_contiguous(window=None)


def test_paged_attention_sliding_window_matches_contiguous():
    windowed, _, _ = _run_paged_vs_contiguous(window=3)
    full, _, spec = _run_paged_vs_contiguous(window=None)
    # The window must actually change the result for the long sequences...
    assert not torch.allclose(windowed[:7], full[:7], atol=1e-3)
    # ...and leave a first token (which sees only itself) unchanged.
    assert torch.allclose(windowed[0], full[0], atol=ATOL)


def test_paged_attention_decode_is_consistent_with_prefill():
    """Decoding token t over the cache gives the same output as row t of a
    prefill of tokens 0..t (what makes in-flight batching exact)."""
    torch.manual_seed(1)
    heads, kv_heads, hd, bs = 2, 1, 4, 2
    n = 5
    k, v, q = torch.randn(n, kv_heads, hd), torch.randn(n, kv_heads, hd), torch.randn(n, heads, hd)
    table = [3, 0, 6]
    pre = PagedKVCache(1, 8, bs, kv_heads, hd, torch.float32)
    b = StepBatch.build([(list(range(n)), 0, table)], bs)
    pre.write(0, k, v, b.slot_mapping)
    prefill = paged_attention_reference(q, pre, 0, b, 1 / math.sqrt(hd), None)
    dec = PagedKVCache(1, 8, bs, kv_heads, hd, torch.float32)
    for t in range(n):
        bt = StepBatch.build([([0], t, table)], bs)
        dec.write(0, k[t : t + 1], v[t : t + 1], bt.slot_mapping)
        o = paged_attention_reference(q[t : t + 1], dec, 0, bt, 1 / math.sqrt(hd), None)
        torch.testing.assert_close(o[0], prefill[t], atol=ATOL, rtol=RTOL)
