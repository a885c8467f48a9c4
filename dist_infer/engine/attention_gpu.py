"""GPU attention over the paged KV cache.

Decode (one new token per sequence) runs a Triton kernel: one program per
(sequence, KV head) walks the sequence's block table with an online softmax,
handling all query heads of the KV head's GQA group at once so every K/V
block is read once. It takes context lengths from device memory, so it can be
captured in a CUDA graph.

A step that prefills (prompt chunks, prefix-cached prompts, with or without
decodes) runs one varlen kernel: every sequence's new queries, causally, over
its paged keys. Its launch depends only on the token and sequence counts, so a
mixed-step graph holds it; eagerly it replaces a per-sequence loop whose small
host-to-device copies cost more than the attention itself.

An FP8 cache (--kv-cache-dtype fp8) is read as float8 e4m3 and upcast to the
query's dtype in the kernels (exact: e4m3 fits bf16 and fp16; the decode kernel
of a bf16 engine upcasts to fp16 and runs its dots in fp16, which converts in one
instruction instead of two and is 12-17 % faster at max load); its per-layer
scales fold into the softmax scale (K) and the output (V), so the inner loops
gain no multiply. The scales are read from device memory, as graphs need.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_infer.engine.kv_cache import PagedKVCache, StepBatch


# Arguments that change from step to step (sequences, the block table's width) are not specialized
# on (Triton compiles a variant per value class: 1, a multiple of 16, other), so an eager step of a
# new shape never stops a running engine for a compile.
@triton.jit(do_not_specialize=["window", "stride_bt"])
def _paged_decode_kernel(Q, K, V, O, BlockTables, ContextLens, KScale, VScale, scale, window,
                         stride_qn, stride_qh, stride_ks, stride_kh, stride_on, stride_oh, stride_bt,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, KV_SCALED: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_F16: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(ContextLens + seq).to(tl.int32)
    qk_scale, v_scale = _kv_scales(KScale, VScale, scale, KV_SCALED)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)  # tl.dot needs K >= 16: small head dims are zero-padded
    dmask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(Q + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None] & dmask[None, :], other=0.0)
    if DOT_F16:  # e4m3 -> fp16 is one conversion (-> bf16 is two), and fp16 holds any sane q more precisely
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
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
        k = tl.load(K + kv_off, mask=valid[:, None] & dmask[None, :], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=valid[:, None] & dmask[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc * v_scale / l_i[:, None]
    tl.store(O + seq * stride_on + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=(g < GROUP)[:, None] & dmask[None, :])


# (BLOCK_N, num_warps, num_stages) of the decode kernel, per KV element size in bytes where it differs
# from the default (scripts/tune_decode_attention.py measures others). FP8 with fp16 dots: 3 stages
# (H100: b1024 ctx192 213 us against 241 for bf16 dots and 2 stages; b64 ctx1024 88 against 106).
DECODE_LAUNCH: dict[int, tuple[int, int, int]] = {1: (64, 4, 3)}
DEFAULT_DECODE_LAUNCH = (64, 4, 2)


def decode_launch(element_size: int) -> tuple[int, int, int]:
    return DECODE_LAUNCH.get(element_size, DEFAULT_DECODE_LAUNCH)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, page: int, scale: float,
                           sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, launch: tuple[int, int, int] | None = None
                           ) -> torch.Tensor:
    """q [B, heads, hd]; k/v_cache [slots, kv_heads, hd] (q's dtype, or FP8 with k/v_scale:
    one-element float32 tensors, real = stored * scale) -> [B, heads, hd]. `launch`: (BLOCK_N,
    num_warps, num_stages), default `decode_launch` of the cache's element size."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    block_n, warps, stages = launch or decode_launch(k_cache.element_size())
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, *_scale_args(k_cache, k_scale, v_scale), scale,
        sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None, KV_SCALED=k_scale is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 engines are references: no TF32
        DOT_F16=k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16, num_warps=warps,
        num_stages=stages)
    return out


def _scale_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple:
    """The kernels' KScale, VScale pointers: an unscaled cache passes placeholders never read."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    if k_scale is None and k_cache.dtype == torch.float8_e4m3fn:
        raise ValueError("an FP8 KV cache needs its k_scale and v_scale")
    return (k_cache, k_cache) if k_scale is None else (k_scale, v_scale)


@triton.jit
def _kv_scales(KScale, VScale, scale, KV_SCALED: tl.constexpr):
    """(softmax scale x K's scale, V's scale): a scaled cache's dequantization, folded."""
    qk_scale = scale
    v_scale = 1.0
    if KV_SCALED:
        qk_scale = scale * tl.load(KScale)
        v_scale = tl.load(VScale)
    return qk_scale, v_scale


@triton.jit
def _find_sequence(QueryStarts, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles hold `tile`. Sequence i's tiles start at
    query_starts[i] // BLOCK_Q + i: monotone in i, and room for ceil(len_i / BLOCK_Q)
    tiles, so a grid of N // BLOCK_Q + B programs covers any ragged step."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(QueryStarts + mid) // BLOCK_Q + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit(do_not_specialize=["window", "num_seqs", "stride_bt"])
def _paged_varlen_kernel(Q, K, V, O, BlockTables, QueryStarts, ContextLens, KScale, VScale, scale, window,
                         num_seqs, stride_qn, stride_qh, stride_ks, stride_kh, stride_on, stride_oh, stride_bt,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_Q: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                         KV_SCALED: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(QueryStarts, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(QueryStarts + seq)
    q_len = tl.load(QueryStarts + seq + 1) - q_start
    first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # this tile's first query within the sequence
    if first >= q_len:
        return
    ctx = tl.load(ContextLens + seq).to(tl.int32)
    qk_scale, v_scale = _kv_scales(KScale, VScale, scale, KV_SCALED)
    # Rows are (query, head-in-group) pairs: [BLOCK_Q * GROUP_PAD]
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    r = first + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_ok = (r < q_len) & (g < GROUP)
    q_pos = ctx - q_len + tl.minimum(r, q_len - 1)  # position of each row's query token
    d = tl.arange(0, HEAD_DIM_PAD)
    dmask = d < HEAD_DIM
    q_off = (q_start + r).to(tl.int64)[:, None] * stride_qn + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    hi = tl.minimum(ctx - q_len + first + BLOCK_Q, ctx)  # keys past the tile's last query are masked anyway
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - q_len + first - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        key_ok = pos < hi
        page = tl.load(BlockTables + seq * stride_bt + pos // PAGE, mask=key_ok, other=0)
        kv_off = (page.to(tl.int64) * PAGE + pos % PAGE)[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=key_ok[:, None] & dmask[None, :], other=0.0).to(Q.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * qk_scale  # [rows, BLOCK_N]
        visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=key_ok[:, None] & dmask[None, :], other=0.0).to(Q.dtype.element_ty)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc * v_scale / tl.maximum(l_i, 1e-30)[:, None]
    o_off = (q_start + r).to(tl.int64)[:, None] * stride_on + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])


VARLEN_ROWS = 64  # (query, head) rows per program: BLOCK_Q = VARLEN_ROWS // GROUP_PAD queries


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_starts: torch.Tensor, context_lens: torch.Tensor,
                           page: int, scale: float, sliding_window: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, heads, hd] of B sequences (query_starts [B+1], context_lens [B] on the device;
    a sequence's queries are its last tokens) -> [N, heads, hd]. Tokens past query_starts[-1]
    (graph padding) get zeros. The launch depends only on N and B, so graphs can hold it.
    k/v_cache and scales as in paged_decode_attention."""
    tokens, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(VARLEN_ROWS // group_pad, 1)
    num_seqs = context_lens.shape[0]
    out = torch.zeros_like(q)
    _paged_varlen_kernel[(tokens // block_q + num_seqs, kv_heads)](
        q, k_cache, v_cache, out, block_tables, query_starts, context_lens, *_scale_args(k_cache, k_scale, v_scale),
        scale, sliding_window or 0, num_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page, BLOCK_Q=block_q, BLOCK_N=64, HAS_WINDOW=sliding_window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 engines are references: no TF32
        KV_SCALED=k_scale is not None, num_warps=4, num_stages=2)
    return out


def gpu_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, batch: StepBatch, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
    """The engine's attention on CUDA: the decode kernel for a pure decode step, one varlen
    launch for any step that prefills (fresh, chunked or prefix-cached prompts, with or
    without decodes; eager or replayed from a mixed-step graph)."""
    k_cache, v_cache, page = cache.k[layer], cache.v[layer], cache.block_size
    # An FP8 cache's per-layer scales: [1] views, fixed addresses for graphs.
    scales = (cache.k_scale[layer : layer + 1], cache.v_scale[layer : layer + 1]) if cache.quantized else (None, None)
    if batch.is_decode:
        return paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens_tensor, page,
                                      scale, sliding_window, *scales)
    return paged_varlen_attention(q, k_cache, v_cache, batch.block_tables, batch.query_starts_tensor,
                                  batch.context_lens_tensor, page, scale, sliding_window, *scales)
