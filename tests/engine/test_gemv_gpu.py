"""gemv_gpu: the one-row dense linear (batch-1 decode, one sequence's LM head) against F.linear,
and where GpuKernels.dense_linear uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("out_f, in_f", [(4096, 4096), (6144, 4096), (4096, 14336), (1000, 1000), (7, 3000),
                                         (49152, 576)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_cublas(out_f, in_f, dtype, bias):
    from dist_infer.engine.gemv_gpu import gemv

    x = torch.randn(1, in_f, dtype=dtype, device="cuda")
    w = torch.randn(out_f, in_f, dtype=dtype, device="cuda") * in_f ** -0.5
    b = torch.randn(out_f, dtype=dtype, device="cuda") if bias else None
    y = gemv(x, w, b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.shape == (1, out_f) and y.dtype == dtype
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.allclose(y.float(), ref, atol=3e-2, rtol=1e-2)


def test_gemv_keeps_leading_dims_and_reads_a_strided_weight_by_its_stride():
    from dist_infer.engine.gemv_gpu import gemv

    x = torch.randn(1, 1, 512, dtype=torch.bfloat16, device="cuda")
    wide = torch.randn(300, 1024, dtype=torch.bfloat16, device="cuda")
    w = wide[:, 256:768]  # rows 1,024 apart
    y = gemv(x, w)
    assert y.shape == (1, 1, 300)
    assert torch.allclose(y.float(), F.linear(x.float(), w.float()), atol=5e-2, rtol=1e-2)


def _kernels_run_by(fn) -> list[str]:
    """The names of the GPU kernels `fn()` launches (the profiler's record, not its output's bits:
    a small GEMV and cuBLAS can round to the same bf16 values)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # compile first: the profiled call launches only the kernels themselves
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def test_dense_linear_runs_the_gemv_at_one_row_only():
    """One bf16/fp16 row goes to gemv_gpu's kernel (and gives its output); two rows, float32 or a
    strided-K weight go to cuBLAS (F.linear's output)."""
    from dist_infer.engine.gemv_gpu import GEMV_MAX_ROWS, gemv, takes
    from dist_infer.engine.kernels import kernels_for

    kernels = kernels_for("cuda")
    w = torch.randn(512, 2048, dtype=torch.bfloat16, device="cuda") * 0.02
    one, two = (torch.randn(n, 2048, dtype=torch.bfloat16, device="cuda") for n in (1, GEMV_MAX_ROWS + 1))
    assert any("_gemv_kernel" in name for name in _kernels_run_by(lambda: kernels.dense_linear(one, w)))
    assert not any("_gemv_kernel" in name for name in _kernels_run_by(lambda: kernels.dense_linear(two, w)))
    assert torch.equal(kernels.dense_linear(one, w), gemv(one, w))
    assert torch.equal(kernels.dense_linear(two, w), F.linear(two, w))
    assert not takes(one.float(), w.float())
    assert not takes(torch.empty(1, 512, dtype=torch.bfloat16, device="cuda"), w.t())


def test_gemv_is_captured_in_a_cuda_graph():
    """Replayed with new input, the captured one-row linear gives gemv's output for that input."""
    from dist_infer.engine.gemv_gpu import gemv
    from dist_infer.engine.kernels import kernels_for

    kernels = kernels_for("cuda")
    x = torch.randn(1, 2048, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(512, 2048, dtype=torch.bfloat16, device="cuda") * 0.02
    kernels.dense_linear(x, w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.dense_linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, gemv(x, w))
