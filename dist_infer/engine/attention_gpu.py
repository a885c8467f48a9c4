"""GPU attention over the paged KV cache.

Decode (one new token per sequence) runs a Triton kernel: one program per
(sequence, KV head) walks the sequence's block table with an online softmax,
handling all query heads of the KV head's GQA group at once so every K/V
block is read once. It takes context lengths from device memory, so it can be
captured in a CUDA graph. Prefill uses torch's SDPA (flash attention on
Hopper) on the sequence's fresh keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dist_infer.engine.kv_cache import PagedKVCache, StepBatch, paged_attention_reference


@triton.jit
def _paged_decode_kernel(Q, K, V, O, BlockTables, ContextLens, scale, window,
                         stride_qn, stride_qh, stride_ks, stride_kh, stride_on, stride_oh, stride_bt,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_WINDOW: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(ContextLens + seq).to(tl.int32)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)  # tl.dot needs K >= 16: small head dims are zero-padded
    dmask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(Q + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    for start in range(lo, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < ctx
        if HAS_WINDOW:
            valid = valid & (pos >= ctx - window)
        page = tl.load(BlockTables + seq * stride_bt + pos // PAGE, mask=valid, other=0)
        slot = page.to(tl.int64) * PAGE + pos % PAGE
        kv_off = slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=valid[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + seq * stride_on + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=(g < GROUP)[:, None] & dmask[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, page: int, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """q [B, heads, hd]; k/v_cache [slots, kv_heads, hd] -> [B, heads, hd]."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        BLOCK_N=64, HAS_WINDOW=sliding_window is not None, num_warps=4, num_stages=2)
    return out


def gpu_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, batch: StepBatch, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
    """The engine's attention on CUDA: the decode kernel for every one-token row
    (a pure decode step, or the decodes of a step that also prefills), flash SDPA
    for fresh prefills, the portable path for prefix-cached or chunked prefills."""
    if batch.is_decode:
        return paged_decode_attention(q, cache.k[layer], cache.v[layer], batch.block_tables,
                                      batch.context_lens_tensor, cache.block_size, scale, sliding_window)
    out = torch.empty_like(q)
    split = batch.decode_split()
    if split.decode_tokens is not None:  # all decode rows of a mixed step in one kernel
        out[split.decode_tokens] = paged_decode_attention(
            q[split.decode_tokens], cache.k[layer], cache.v[layer], batch.block_tables[split.decode_seqs],
            batch.context_lens_tensor[split.decode_seqs], cache.block_size, scale, sliding_window)
    for i in split.prefill_seqs:
        qs, qe, ctx = batch.query_starts[i], batch.query_starts[i + 1], batch.context_lens[i]
        fresh = ctx == qe - qs and (sliding_window is None or ctx <= sliding_window)
        if not fresh:  # prefix-cached or chunked prefill: portable path for this sequence
            sub = batch.select(i)
            out[qs:qe] = paged_attention_reference(q[qs:qe], cache, layer, sub, scale, sliding_window)
            continue
        slots = batch.slot_mapping[qs:qe]
        k, v = cache.k[layer, slots], cache.v[layer, slots]  # [n, kv_heads, hd]
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=True)
        out[qs:qe] = o[0].transpose(0, 1)
    return out
