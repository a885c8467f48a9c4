"""GPU attention over the paged KV cache.

Decode (one new token per sequence) runs a Triton kernel: one program per
(sequence, KV head) walks the sequence's block table with an online softmax,
handling all query heads of the KV head's GQA group at once so every K/V
block is read once. It takes context lengths from device memory, so it can be
captured in a CUDA graph.

A step that prefills (prompt chunks, prefix-cached prompts, with or without
decodes) runs one varlen kernel: every sequence's new queries, causally, over
its paged keys, flash-attention style (128 query rows a program; the key tiles
below the causal diagonal skip the masks). The step's decodes, sequences of one
new token, go to the decode kernel in a second launch. Both launches depend only
on the token and sequence counts, so a mixed-step graph holds them.

An FP8 cache (--kv-cache-dtype fp8) is read as float8 e4m3 and upcast to the
query's dtype in the kernels (exact: e4m3 fits bf16 and fp16; the kernels of a
bf16 engine upcast to fp16 and run their dots in fp16, which converts in one
instruction instead of two and is 12-17 % faster at max load); its per-layer
scales fold into the softmax scale (K) and the output (V), so the inner loops
gain no multiply. The scales are read from device memory, as graphs need.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_infer.engine.fused_gpu import to_cache_dtype
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch
from dist_infer.engine.splitk_gpu import sm_count


LOG2E = tl.constexpr(1.4426950408889634)  # the decode kernels' softmax runs in base 2: exp2 is the hardware's instruction


@triton.jit
def _slots(TableRow, start, pos, end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_PAGES: tl.constexpr):
    """Cache slots [BLOCK_N] (int64) of positions pos = start + arange(BLOCK_N) below `end`, through the
    sequence's block table row. WHOLE_PAGES: start is page-aligned and a tile holds whole pages, so the
    table is read once per page, not once per position (10 % faster with an FP8 cache on the H100)."""
    if WHOLE_PAGES:
        first = start + tl.arange(0, BLOCK_N // PAGE) * PAGE
        pages = tl.load(TableRow + first // PAGE, mask=first < end, other=0)  # [BLOCK_N / PAGE]
        return tl.reshape(pages.to(tl.int64)[:, None] * PAGE + tl.arange(0, PAGE)[None, :], [BLOCK_N])
    page = tl.load(TableRow + pos // PAGE, mask=pos < end, other=0)
    return page.to(tl.int64) * PAGE + pos % PAGE


@triton.jit
def _attend_keys(q, K, V, slots, valid, head_offset, d, dmask, m_i, l_i, acc, qk_scale_log2, stride_ks,
                 PRECISION: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """One online-softmax step of the decode kernels over the keys in cache slots `slots` [BLOCK_N]
    (`valid` masks them): q [GROUP_PAD, D] against the paged K/V of one KV head (head_offset into a
    slot's row), folded into (m_i, l_i, acc). Scores and m_i are in base 2 (scaled by log2 e).
    KEYS_FIRST: the scores as (k q^T)^T, the upcast FP8 key tile as the dot's first operand (H200, FP8
    cache: 5-13 % faster than q k^T at batch 64-1,024)."""
    kv_off = slots[:, None] * stride_ks + head_offset + d[None, :]
    k = tl.load(K + kv_off, mask=valid[:, None] & dmask[None, :], other=0.0).to(q.dtype)
    if KEYS_FIRST:
        s = tl.trans(tl.dot(k, tl.trans(q), input_precision=PRECISION))
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = s.to(tl.float32) * qk_scale_log2  # [GROUP_PAD, BLOCK_N]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + kv_off, mask=valid[:, None] & dmask[None, :], other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


# Arguments that change from step to step (sequences, the block table's width) are not specialized
# on (Triton compiles a variant per value class: 1, a multiple of 16, other), so an eager step of a
# new shape never stops a running engine for a compile.
@triton.jit(do_not_specialize=["window", "stride_bt"])
def _paged_decode_kernel(Q, K, V, O, BlockTables, ContextLens, QueryStarts, KScale, VScale, scale, window,
                         stride_qn, stride_qh, stride_ks, stride_kh, stride_on, stride_oh, stride_bt,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, KV_SCALED: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_F16: tl.constexpr, WHOLE_PAGES: tl.constexpr, KV_HEADS: tl.constexpr,
                         VARLEN: tl.constexpr):
    # One program per (sequence, KV head), KV-head-major: a sequence's KV heads are neighbours in launch
    # order, so the programs that read the parts of the same cache slots run together (2-4 % faster than
    # sequence-major). A 1-D grid, so the batch is not bounded by a grid dimension's 65,535.
    # VARLEN: the decodes of a step that also prefills; a sequence's query is its row query_starts[seq],
    # and sequences with other than one new token are the varlen kernel's.
    kv_head = tl.program_id(0) % KV_HEADS
    seq = tl.program_id(0) // KV_HEADS
    row = seq
    if VARLEN:
        row = tl.load(QueryStarts + seq)
        if tl.load(QueryStarts + seq + 1) - row != 1:
            return
    ctx = tl.load(ContextLens + seq).to(tl.int32)
    qk_scale, v_scale = _kv_scales(KScale, VScale, scale, KV_SCALED)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)  # tl.dot needs K >= 16: small head dims are zero-padded
    dmask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(Q + row * stride_qn + heads[:, None] * stride_qh + d[None, :],
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
        slots = _slots(BlockTables + seq * stride_bt, start, pos, ctx, PAGE, BLOCK_N, WHOLE_PAGES)
        m_i, l_i, acc = _attend_keys(q, K, V, slots, valid, kv_head * stride_kh, d, dmask, m_i, l_i, acc,
                                     qk_scale * LOG2E, stride_ks, PRECISION, DOT_F16)
    out = acc * v_scale / l_i[:, None]
    tl.store(O + row * stride_on + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=(g < GROUP)[:, None] & dmask[None, :])


# (BLOCK_N, num_warps, num_stages) of the decode kernel, per KV element size in bytes where it differs
# from the default (scripts/tune_decode_attention.py measures others). FP8 (fp16 dots, keys first): 2 warps,
# 4 stages (H200: b128 ctx2112 225 -> 192 us, b1024 ctx256 226 -> 186, b64 ctx1024 71 -> 53 against 4 warps,
# 3 stages and q k^T).
DECODE_LAUNCH: dict[int, tuple[int, int, int]] = {1: (64, 2, 4)}
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
    out = torch.empty_like(q)
    _launch_decode(q, k_cache, v_cache, out, block_tables, context_lens, None, page, scale, sliding_window,
                   k_scale, v_scale, launch)
    return out


def _launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                   block_tables: torch.Tensor, context_lens: torch.Tensor, query_starts: torch.Tensor | None,
                   page: int, scale: float, sliding_window: int | None, k_scale: torch.Tensor | None,
                   v_scale: torch.Tensor | None, launch: tuple[int, int, int] | None) -> None:
    """The decode kernel into `out`: one query row a sequence, or with query_starts the rows of the
    sequences that have exactly one new token (the decodes of a mixed step)."""
    heads, head_dim = q.shape[1:]
    batch, kv_heads = context_lens.shape[0], k_cache.shape[1]
    group = heads // kv_heads
    block_n, warps, stages = launch or decode_launch(k_cache.element_size())
    _paged_decode_kernel[(kv_heads * batch,)](
        q, k_cache, v_cache, out, block_tables, context_lens, context_lens if query_starts is None else query_starts,
        *_scale_args(k_cache, k_scale, v_scale), scale, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None, KV_SCALED=k_scale is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 engines are references: no TF32
        DOT_F16=k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16,
        WHOLE_PAGES=block_n % page == 0,  # tiles start at multiples of block_n
        KV_HEADS=kv_heads, VARLEN=query_starts is not None, num_warps=warps, num_stages=stages)


# ------------------------------------------------------------------ small-batch decode: split context

# A decode step of few sequences runs one program per (sequence, KV head): 8 programs at batch 1 on
# Llama-3-8B, each walking the whole context while the other SMs idle. The split kernel divides each
# context into SPLITS ranges (flash-decoding), one program each, and does the step's RoPE and KV write
# itself (one launch fewer a layer); a second kernel merges the ranges' partial softmaxes.
SPLIT_BLOCK_N = 32   # keys a loop iteration of the split kernel
MAX_SPLITS = 32
SPLIT_PROGRAMS_PER_SM = 4  # what the ranges aim for
# (H100, Llama-3-8B heads, graph replays, RoPE + KV write + attention: the plain kernels / split)
# batch 1: 7.9 / 5.4 us at context 192, 28.7 / 5.9 at 1,024, 102.7 / 9.8 at 4,096 (32 ranges);
# batch 8: 8.7 / 6.2, 31.8 / 12.3, 135.2 / 51.7 (8 ranges).


def decode_splits(num_seqs: int, kv_heads: int, device: torch.device) -> int:
    """Context ranges per (sequence, KV head) for a decode step: a power of two, at most MAX_SPLITS,
    giving about SPLIT_PROGRAMS_PER_SM programs per SM; 1 (the plain kernel) where one program per
    (sequence, KV head) fills half the SMs already."""
    sms = sm_count(device)
    plain = num_seqs * kv_heads
    if 2 * plain > sms:
        return 1
    return min(MAX_SPLITS, 1 << (SPLIT_PROGRAMS_PER_SM * sms // plain).bit_length() - 1)


@triton.jit
def _rotate(X, d, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, cos, sin, row_offsets, mask):
    """RoPE on rows of X (halves paired), in float32 with the arithmetic of fused_gpu's kernel:
    x1*cos - x2*sin | x2*cos + x1*sin. d: [HEAD_DIM]; row_offsets: [R, 1]; cos/sin: [HEAD_DIM]."""
    x = tl.load(X + row_offsets + d[None, :], mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(X + row_offsets + ((d + HALF) % HEAD_DIM)[None, :], mask=mask, other=0.0).to(tl.float32)
    first = (d < HALF)[None, :]
    return tl.where(first, x * cos[None, :] - partner * sin[None, :], x * cos[None, :] + partner * sin[None, :])


@triton.jit(do_not_specialize=["window", "stride_bt"])
def _rope_decode_split_kernel(Q, Knew, Vnew, K, V, MidAcc, MidM, MidL, BlockTables, ContextLens, Positions, Slots,
                              InvFreq, KScale, VScale, scale, rope_scaling, window,
                              stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_ks,
                              stride_kvh, stride_bt,
                              GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                              PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                              HAS_WINDOW: tl.constexpr, KV_SCALED: tl.constexpr, PRECISION: tl.constexpr,
                              DOT_F16: tl.constexpr):
    # Grid: (sequence, KV head, context range). Rows are the GROUP query heads of the KV head.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    ctx = tl.load(ContextLens + seq).to(tl.int32)  # the new token is position ctx - 1
    qk_scale, v_scale = _kv_scales(KScale, VScale, scale, KV_SCALED)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    freq = tl.load(Positions + seq).to(tl.float32) * tl.load(InvFreq + d % HALF)
    cos = tl.cos(freq) * rope_scaling
    sin = tl.sin(freq) * rope_scaling
    row_ok = (g < GROUP)[:, None]
    q = _rotate(Q + seq * stride_qn, d, HALF, HEAD_DIM, cos, sin, heads[:, None] * stride_qh, row_ok)
    q = q.to(Q.dtype.element_ty)  # rounded as the unfused path stores q
    if DOT_F16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    per = tl.cdiv(tl.cdiv(ctx - lo, SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + split * per
    s_hi = tl.minimum(s_lo + per, ctx)
    if (s_lo <= ctx - 1) & (ctx - 1 < s_hi):  # this range holds the new token: write its K/V first
        slot = tl.load(Slots + seq)
        cache = slot * stride_ks + kv_head * stride_kvh + d[None, :]
        k_new = _rotate(Knew + seq * stride_kn + kv_head * stride_kh, d, HALF, HEAD_DIM, cos, sin,
                        tl.zeros([1, 1], tl.int32), d[None, :] < HEAD_DIM)
        tl.store(K + cache, to_cache_dtype(k_new, KScale, K, KV_SCALED))
        v_new = tl.load(Vnew + seq * stride_vn + kv_head * stride_vh + d[None, :]).to(tl.float32)
        tl.store(V + cache, to_cache_dtype(v_new, VScale, V, KV_SCALED))
    tl.debug_barrier()  # the writes above are visible to every thread of this program below
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(s_lo, s_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < s_hi
        slots = _slots(BlockTables + seq * stride_bt, start, pos, s_hi, PAGE, BLOCK_N, False)
        m_i, l_i, acc = _attend_keys(q, K, V, slots, valid, kv_head * stride_kvh, d, d < HEAD_DIM, m_i, l_i, acc,
                                     qk_scale * LOG2E, stride_ks, PRECISION, DOT_F16)
    # Partials of an empty range stay (-inf, 0, 0): weight 0 in the merge.
    part = (seq * tl.num_programs(1) * GROUP + heads) * SPLITS + split  # [GROUP_PAD]
    tl.store(MidM + part, m_i, mask=g < GROUP)
    tl.store(MidL + part, l_i, mask=g < GROUP)
    tl.store(MidAcc + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok)


@triton.jit
def _merge_splits_kernel(MidAcc, MidM, MidL, O, VScale, stride_on, stride_oh, HEAD_DIM: tl.constexpr,
                         SPLITS: tl.constexpr, KV_SCALED: tl.constexpr):
    # Grid: (sequence, query head). out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max_s m_s
    # (the partial maxima are in base 2, as _attend_keys keeps them).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    part = (seq * tl.num_programs(1) + head) * SPLITS + s
    m = tl.load(MidM + part)
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(tl.load(MidL + part) * weight, 0)
    acc = tl.sum(tl.load(MidAcc + part[:, None] * HEAD_DIM + d[None, :]) * weight[:, None], 0)
    v_scale = 1.0
    if KV_SCALED:
        v_scale = tl.load(VScale)
    tl.store(O + seq * stride_on + head * stride_oh + d, (acc * v_scale / total).to(O.dtype.element_ty))


def rope_fusable(head_dim: int) -> bool:
    """Whether the split kernel can turn this head size: whole power-of-two heads (halves paired)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


def rope_decode_split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                inv_freq: torch.Tensor, rope_scaling: float, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, page: int, scale: float, splits: int,
                                sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                                v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's RoPE, KV write and attention in two launches: q [B, heads, hd] (not turned
    yet), k/v [B, kv_heads, hd] the new tokens (k not turned yet), positions/slot_mapping [B];
    context_lens count the new token. Each (sequence, KV head)'s context is cut into `splits`
    ranges (decode_splits). context_lens >= 1 (the new token at context_lens - 1, inside any window).
    Returns [B, heads, hd], as rope_write_kv + paged_decode_attention."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    mid_acc = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    mid_m = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    mid_l = torch.empty_like(mid_m)
    scales = _scale_args(k_cache, k_scale, v_scale)
    _rope_decode_split_kernel[(batch, kv_heads, splits)](
        q, k, v, k_cache, v_cache, mid_acc, mid_m, mid_l, block_tables, context_lens, positions, slot_mapping,
        inv_freq, *scales, scale, rope_scaling, sliding_window or 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
        k_cache.stride(1), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=page,
        BLOCK_N=SPLIT_BLOCK_N, SPLITS=splits, HAS_WINDOW=sliding_window is not None, KV_SCALED=k_scale is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_F16=k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16, num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _merge_splits_kernel[(batch, heads)](mid_acc, mid_m, mid_l, out, scales[1], out.stride(0), out.stride(1),
                                         HEAD_DIM=head_dim, SPLITS=splits, KV_SCALED=k_scale is not None,
                                         num_warps=1)
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


@triton.jit
def _load_keys(ptrs, key_ok, dmask, MASK_KEYS: tl.constexpr, PAD_DIM: tl.constexpr):
    """A [BLOCK_N, HEAD_DIM_PAD] tile of K or V; masks only where a tile may hold keys past the range or
    padded head dims (a tile of keys every row sees loads unmasked)."""
    if MASK_KEYS:
        x = tl.load(ptrs, mask=key_ok[:, None] & dmask[None, :], other=0.0)
    elif PAD_DIM:
        x = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _prefill_keys(q, K, V, kv_off, key_ok, visible, dmask, m_i, l_i, acc, qk_scale_log2, PRECISION: tl.constexpr,
                  MASKED: tl.constexpr, PAD_DIM: tl.constexpr):
    """One online-softmax step of the varlen kernel: rows q [R, D] against a tile of keys at kv_off
    [BLOCK_N, D]. MASKED: `visible` [R, BLOCK_N] says which scores count (the causal diagonal, a window,
    the range's end) and a row may see none of the tile; unmasked tiles skip both. Base-2 scores."""
    k = _load_keys(K + kv_off, key_ok, dmask, MASKED, PAD_DIM).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * qk_scale_log2  # [R, BLOCK_N]
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = m_new
    if MASKED:  # a row with nothing visible yet keeps l = acc = 0 and its max at -inf (a 0 carried on would
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # underflow the later tiles' exp2 at low scores)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_keys(V + kv_off, key_ok, dmask, MASKED, PAD_DIM).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["window", "num_seqs", "stride_bt"])
def _paged_varlen_kernel(Q, K, V, O, BlockTables, QueryStarts, ContextLens, KScale, VScale, scale, window,
                         num_seqs, stride_qn, stride_qh, stride_ks, stride_kh, stride_on, stride_oh, stride_bt,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_Q: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                         KV_SCALED: tl.constexpr, DOT_F16: tl.constexpr, WHOLE_PAGES: tl.constexpr,
                         KV_HEADS: tl.constexpr):
    # A 1-D grid of (query tile, KV head), KV-head-minor, tiles last to first: a prompt's last tiles see the
    # most keys, and starting them first leaves the short ones for the tail.
    kv_head = tl.program_id(0) % KV_HEADS
    tile = tl.num_programs(0) // KV_HEADS - 1 - tl.program_id(0) // KV_HEADS
    seq = _find_sequence(QueryStarts, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(QueryStarts + seq)
    q_len = tl.load(QueryStarts + seq + 1) - q_start
    first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # this tile's first query within the sequence
    if (first >= q_len) | (q_len == 1):  # one new token: the decode kernel's (a tile of one row wastes the rest)
        return
    ctx = tl.load(ContextLens + seq).to(tl.int32)
    qk_scale, v_scale = _kv_scales(KScale, VScale, scale, KV_SCALED)
    qk_scale_log2 = qk_scale * LOG2E
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
    if DOT_F16:  # an FP8 cache under a bf16 engine: e4m3 -> fp16 is one conversion (-> bf16 is two)
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = BlockTables + seq * stride_bt
    first_pos = ctx - q_len + first  # every row sees the keys up to here (its own position or later)
    hi = tl.minimum(first_pos + BLOCK_Q, ctx)  # keys past the tile's last query are masked anyway
    lo = 0
    unmasked_hi = (first_pos + 1) // BLOCK_N * BLOCK_N  # tiles below: no causal mask, no key mask
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        unmasked_hi = lo  # a window masks from below too: every tile masked
    for start in range(lo, unmasked_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        slots = _slots(table_row, start, pos, unmasked_hi, PAGE, BLOCK_N, WHOLE_PAGES)
        kv_off = slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        m_i, l_i, acc = _prefill_keys(q, K, V, kv_off, pos < hi, None, dmask, m_i, l_i, acc, qk_scale_log2,
                                      PRECISION, False, HEAD_DIM != HEAD_DIM_PAD)
    for start in range(unmasked_hi, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        key_ok = pos < hi
        visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        slots = _slots(table_row, start, pos, hi, PAGE, BLOCK_N, WHOLE_PAGES)
        kv_off = slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        m_i, l_i, acc = _prefill_keys(q, K, V, kv_off, key_ok, visible, dmask, m_i, l_i, acc, qk_scale_log2,
                                      PRECISION, True, HEAD_DIM != HEAD_DIM_PAD)
    out = acc * v_scale / tl.maximum(l_i, 1e-30)[:, None]
    o_off = (q_start + r).to(tl.int64)[:, None] * stride_on + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])


# (rows a program: query x head-in-group pairs, BLOCK_N keys a tile, num_warps, num_stages) of the varlen
# kernel, the best in sum of 36 that scripts/tune_prefill_attention.py times (H200, Llama-3-8B heads, bf16
# and FP8 KV; 4 x 2,048-token prompts: 414 / 472 us against 699 / 686 for the kernel of 64-row tiles).
VARLEN_LAUNCH = (128, 64, 4, 3)


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_starts: torch.Tensor, context_lens: torch.Tensor,
                           page: int, scale: float, sliding_window: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q [N, heads, hd] of B sequences (query_starts [B+1], context_lens [B] on the device;
    a sequence's queries are its last tokens) -> [N, heads, hd]. Tokens past query_starts[-1]
    (graph padding) get zeros. The launches depend only on N and B, so graphs can hold them.
    Sequences with one new token (decodes) go to the decode kernel, in a second launch: a varlen
    tile holds up to `rows` query rows, and computing them for one would cost the rest.
    k/v_cache and scales as in paged_decode_attention; `launch` as VARLEN_LAUNCH."""
    tokens, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    rows, block_n, warps, stages = launch or VARLEN_LAUNCH
    block_q = max(rows // group_pad, 1)
    num_seqs = context_lens.shape[0]
    out = torch.zeros_like(q)
    _paged_varlen_kernel[(kv_heads * (tokens // block_q + num_seqs),)](
        q, k_cache, v_cache, out, block_tables, query_starts, context_lens, *_scale_args(k_cache, k_scale, v_scale),
        scale, sliding_window or 0, num_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page, BLOCK_Q=block_q, BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 engines are references: no TF32
        KV_SCALED=k_scale is not None, DOT_F16=k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16,
        WHOLE_PAGES=block_n % page == 0, KV_HEADS=kv_heads, num_warps=warps, num_stages=stages)
    _launch_decode(q, k_cache, v_cache, out, block_tables, context_lens, query_starts, page, scale, sliding_window,
                   k_scale, v_scale, None)
    return out


def layer_scales(cache: PagedKVCache, layer: int) -> tuple:
    """An FP8 cache's per-layer (k_scale, v_scale): [1] views, fixed addresses for graphs; (None, None)
    for an unscaled cache."""
    return (cache.k_scale[layer : layer + 1], cache.v_scale[layer : layer + 1]) if cache.quantized else (None, None)


def gpu_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, batch: StepBatch, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
    """The engine's attention on CUDA: the decode kernel for a pure decode step, one varlen
    launch for any step that prefills (fresh, chunked or prefix-cached prompts, with or
    without decodes; eager or replayed from a mixed-step graph)."""
    k_cache, v_cache, page = cache.k[layer], cache.v[layer], cache.block_size
    scales = layer_scales(cache, layer)
    if batch.is_decode:
        return paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens_tensor, page,
                                      scale, sliding_window, *scales)
    return paged_varlen_attention(q, k_cache, v_cache, batch.block_tables, batch.query_starts_tensor,
                                  batch.context_lens_tensor, page, scale, sliding_window, *scales)
