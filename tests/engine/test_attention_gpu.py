"""attention_gpu's kernels over steps of every shape: one compiled variant each. A step whose
sequence count, block-table width or index-tensor offsets differ from the warm-up's must not
make Triton compile a new variant (seconds, in the middle of serving)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

PAGE, KV_HEADS, HEADS, HEAD_DIM = 16, 2, 8, 64
SHAPES = [[1], [5, 1, 2], [17, 3, 1, 1], [1] * 7, [40, 16], [2] * 16, [3] * 33]  # new tokens per sequence


def _variants(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def _step(lengths: list[int], context: int):
    from dist_infer.engine.kv_cache import StepBatch

    per_seq = -(-(context + max(lengths)) // PAGE)
    seqs = [([1] * n, context, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))) for i, n in enumerate(lengths)]
    return StepBatch.build(seqs, PAGE, "cuda")


@pytest.mark.parametrize("context", [0, 37])
def test_attention_kernels_compile_once_for_every_step_shape(context):
    from dist_infer.engine import attention_gpu as attn

    slots = (1 + 33 * 8) * PAGE
    k = torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    after_first = {}  # kernel -> its variant count after its first call here (others may exist: other tests)
    for lengths in SHAPES:
        batch = _step(lengths, context)
        q = torch.randn(batch.num_tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        attn.paged_varlen_attention(q, k, v, batch.block_tables, batch.query_starts_tensor,
                                    batch.context_lens_tensor, PAGE, 0.125)
        kernels = [attn._paged_varlen_kernel]
        if batch.is_decode:
            attn.paged_decode_attention(q, k, v, batch.block_tables, batch.context_lens_tensor, PAGE, 0.125)
            kernels.append(attn._paged_decode_kernel)
        for kernel in kernels:
            count = after_first.setdefault(kernel, _variants(kernel))
            assert _variants(kernel) == count, f"{kernel.fn.__name__} compiled again for a step of {lengths}"
    torch.cuda.synchronize()
    assert len(after_first) == 2  # both kernels ran


def test_decode_kernel_takes_more_sequences_than_a_grid_dimension_holds():
    """70,000 sequences (CUDA's second and third grid dimensions stop at 65,535) of one cached key each:
    the softmax of one score is 1, so each query head's output is its KV head's value, exactly."""
    from dist_infer.engine import attention_gpu as attn

    batch = 70_000
    k = torch.randn(batch * PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(batch, device="cuda", dtype=torch.int32)[:, None]  # [batch, 1]: one page each
    lens = torch.ones(batch, device="cuda", dtype=torch.int32)
    out = attn.paged_decode_attention(q, k, v, tables, lens, PAGE, 0.125)
    expected = v[tables[:, 0].long() * PAGE].repeat_interleave(HEADS // KV_HEADS, dim=1)  # [batch, heads, hd]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
