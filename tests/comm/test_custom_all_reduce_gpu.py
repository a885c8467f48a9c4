"""The one-shot IPC all-reduce against NCCL, on 2 GPUs under a real `mpirun -n 2`
(`pytest -m gpu`; skipped where fewer than 2 GPUs are visible). Sizes from 1 element to
64 MB, bf16 / fp16 / fp32, eager and replayed from a CUDA graph; the fused all-reduce +
residual add + RMSNorm against the unfused ops; the TP communicator's dispatch (custom below
the threshold, NCCL above) and its fallback switch."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from conftest import mpirun_prefix, run_bounded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Element counts: 1 element, odd tails, the pack boundary, one block, many blocks, 64 MB of bf16.
# Largest |error| against the float64 sum of two randn: about half a unit in the last place at |sum| < 8.
TOLERANCE = {"torch.bfloat16": 0.04, "torch.float16": 0.004, "torch.float32": 1e-5}
SIZES = [1, 3, 7, 8, 9, 1000, 4096, 4097, 65_536, 1_000_003, 2_097_152, 2_097_153, 8_388_608, 33_554_432]

RANKS = """
    import json, logging, sys
    import torch
    from dist_infer.comm import ParallelGroups, world_from_launch
    from dist_infer.comm.bootstrap import resolve_device
    from dist_infer.comm.custom_all_reduce import CustomAllReduce
    from dist_infer.config import Mapping

    logging.basicConfig(level=logging.INFO)
    out, sizes = sys.argv[1], json.loads(sys.argv[2])
    world = world_from_launch()
    device = torch.device(resolve_device("cuda", world.rank))
    groups = ParallelGroups.build(world, Mapping(tp=2, pp=1), "cuda")
    tp = groups.tp
    big = CustomAllReduce(world, device, max_bytes=33_554_432 * 4)  # the kernel itself at every size
    report = {"dispatch_custom": tp.custom is not None, "cases": []}

    def data(n, dtype, seed):
        g = torch.Generator(device).manual_seed(seed * 1000 + world.rank)
        return torch.randn(n, generator=g, device=device).to(dtype)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in sizes:
            x = data(n, dtype, n)
            exact = world.all_gather(x.cpu().double()).sum(0)  # float64 reference over the host
            nccl = x.clone()
            tp.comm.allreduce(nccl, nccl, tp._nccl.SUM, stream=torch.cuda.current_stream().cuda_stream)
            ours = big.all_reduce(x.clone())
            dispatched = tp.all_reduce(x.clone())
            torch.cuda.synchronize()
            both = world.all_gather(ours.cpu().view(-1).float())
            report["cases"].append({
                "dtype": str(dtype), "n": n,
                "equal_nccl": bool(torch.equal(ours, nccl)),
                "max_err": (ours.cpu().double() - exact).abs().max().item(),
                "ranks_agree": bool(torch.equal(both[0], both[1])),
                "dispatch_equal_nccl": bool(torch.equal(dispatched, nccl)),
                "used_custom": tp.custom is not None and tp.custom.fits(x),
            })

    # All-reduce + residual add + RMSNorm in one kernel against the unfused ops (NCCL, Triton norm).
    from dist_infer.engine.fused_gpu import add_rmsnorm
    report["fused"] = []
    for dtype in (torch.bfloat16, torch.float32):
        for rows, cols in ((1, 4096), (7, 4096), (64, 4096), (3, 64), (5, 8192), (300, 2048)):
            x, res = data(rows * cols, dtype, rows).view(rows, cols), data(rows * cols, dtype, cols).view(rows, cols)
            w = data(cols, dtype, 7) if world.rank == 0 else torch.empty(cols, dtype=dtype, device=device)
            w = torch.from_numpy(world.all_gather(w.cpu().float())[0].numpy()).to(device, dtype)  # one weight
            summed = x.clone()
            tp.comm.allreduce(summed, summed, tp._nccl.SUM, stream=torch.cuda.current_stream().cuda_stream)
            want_norm, want_res = add_rmsnorm(summed, w, 1e-5, res.clone())
            fused = tp.all_reduce_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
            torch.cuda.synchronize()
            report["fused"].append({
                "dtype": str(dtype), "shape": [rows, cols], "taken": fused is not None,
                "residual_equal": fused is not None and bool(torch.equal(fused[1], want_res)),
                "norm_max_diff": None if fused is None else (fused[0].float() - want_norm.float()).abs().max().item(),
                "norm_scale": want_norm.float().abs().max().item(),
            })

    # Replayed from a CUDA graph: 20 calls captured back to back, inputs refilled each replay.
    static = torch.zeros(4096, dtype=torch.bfloat16, device=device)
    outs = [torch.zeros_like(static) for _ in range(20)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for o in outs:
                o.copy_(static)
                tp.all_reduce(o)
    torch.cuda.current_stream().wait_stream(stream)
    replays = []
    for seed in range(5):
        static.copy_(data(4096, torch.bfloat16, 99 + seed))
        graph.replay()
        torch.cuda.synchronize()
        expected = world.all_gather(static.cpu().float()).sum(0).to(torch.bfloat16)
        replays.append(all(torch.equal(o.cpu(), expected) for o in outs))
    report["graph_replays_exact"] = replays
    del graph
    big.close()
    groups.close()
    with open(f"{out}/rank{world.rank}.json", "w") as f:
        json.dump(report, f)
"""


def _run_ranks(tmp_path, env=None):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANKS))
    out = tmp_path / "out"
    out.mkdir()
    cmd = mpirun_prefix(2) + [sys.executable, str(script), str(out), json.dumps(SIZES)]
    proc = run_bounded(cmd, 300, {**NCCL_ENV, **(env or {})})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], proc


@needs_2_gpus
def test_one_shot_matches_nccl_at_every_size(tmp_path):
    reports, proc = _run_ranks(tmp_path)
    for report in reports:
        assert report["dispatch_custom"], proc.stderr[-2000:]
        assert all(report["graph_replays_exact"])
        for case in report["cases"]:
            # Two ranks: one float32 add rounded once, NCCL's arithmetic exactly.
            assert case["equal_nccl"] and case["dispatch_equal_nccl"] and case["ranks_agree"], case
            assert case["max_err"] <= TOLERANCE[case["dtype"]], case
        for case in report["fused"]:
            # The residual stream is bit-exact (the same roundings); the norm may differ by one
            # rounding of its statistics (a block sum here, Triton's tree there): <= 2 ulps.
            ulp = 2 ** -7 if case["dtype"] == "torch.bfloat16" else 2 ** -23
            assert case["taken"] and case["residual_equal"], case
            assert case["norm_max_diff"] <= 2 * ulp * case["norm_scale"], case
        used = {(c["dtype"], c["n"]): c["used_custom"] for c in report["cases"]}
        assert used["torch.bfloat16", 2_097_152] and not used["torch.bfloat16", 2_097_153]  # 4 MB threshold
    assert "one-shot over CUDA IPC for messages up to 4096 KB" in proc.stderr


@needs_2_gpus
def test_switch_off_keeps_nccl(tmp_path):
    reports, proc = _run_ranks(tmp_path, {"DIST_INFER_CUSTOM_ALL_REDUCE": "0"})
    assert not reports[0]["dispatch_custom"] and not any(c["used_custom"] for c in reports[0]["cases"])
    assert all(c["dispatch_equal_nccl"] for c in reports[0]["cases"])
    assert not any(c["taken"] for c in reports[0]["fused"])  # the caller all-reduces, then norms


# Two processes on one GPU (IPC within a device; NCCL refuses two ranks on one GPU, so the
# reference is the float64 sum over MPI): the kernels' barriers, slots and roundings where
# only one GPU is lent. Calls of different grids interleave, eagerly and in one CUDA graph.
ONE_GPU_RANKS = """
    import json, sys
    import torch
    from dist_infer.comm import world_from_launch
    from dist_infer.comm.custom_all_reduce import CustomAllReduce
    from dist_infer.engine.fused_gpu import add_rmsnorm

    out = sys.argv[1]
    world = world_from_launch()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    custom = CustomAllReduce(world, device, max_bytes=4 * 2**20)
    report = {"sums": [], "fused": []}

    def data(n, dtype, seed):
        g = torch.Generator(device).manual_seed(seed * 1000 + world.rank)
        return torch.randn(n, generator=g, device=device).to(dtype)

    def exact(x):  # float32 sums in rank order, as the kernel adds (exact for two ranks' fp32 inputs)
        return world.all_gather(x.cpu().float()).sum(0)

    for dtype in (torch.bfloat16, torch.float32):
        for n in (1, 7, 4096, 4097, 300_001, 1_048_576):  # 1 block ... MAX_BLOCKS, odd tails
            x = data(n, dtype, n)
            want = exact(x).to(dtype)
            got = custom.all_reduce(x.clone()).cpu()
            report["sums"].append({"dtype": str(dtype), "n": n, "equal": bool(torch.equal(got, want))})
        for rows, cols in ((1, 4096), (64, 4096), (3, 64), (5, 8192)):
            x = data(rows * cols, dtype, rows).view(rows, cols)
            res = data(rows * cols, dtype, cols).view(rows, cols)
            w = torch.from_numpy(world.all_gather(data(cols, dtype, 7).cpu().float())[0].numpy()).to(device, dtype)
            want_norm, want_res = add_rmsnorm(custom.all_reduce(x.clone()), w, 1e-5, res.clone())
            kept = res.clone()
            norm, new_res = custom.all_reduce_add_rms_norm(x.clone(), res, w, 1e-5)
            report["fused"].append({"dtype": str(dtype), "shape": [rows, cols],
                                    "residual_equal": bool(torch.equal(new_res, want_res)),
                                    "residual_input_kept": bool(torch.equal(res, kept)),
                                    "norm_max_diff": (norm.float() - want_norm.float()).abs().max().item(),
                                    "norm_scale": want_norm.float().abs().max().item()})

    # One graph: a 1-block sum, a 36-block sum and a fused norm, 5 times; replayed 3 times.
    small, big = torch.zeros(64, device=device), torch.zeros(2**20, device=device)
    x2, r2 = torch.zeros(8, 4096, device=device), torch.zeros(8, 4096, device=device)
    w2 = torch.ones(4096, device=device)
    outs = []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(5):
                a, b = custom.all_reduce(small.clone()), custom.all_reduce(big.clone())
                normed, residual = custom.all_reduce_add_rms_norm(x2.clone(), r2, w2, 1e-5)
                outs.append((a, b, normed, residual))
    torch.cuda.current_stream().wait_stream(stream)
    replays = []
    for seed in range(3):
        for t, n in ((small, 64), (big, 2**20), (x2, 8 * 4096), (r2, 8 * 4096)):
            t.copy_(data(n, torch.float32, 50 + seed + n).view(t.shape))
        graph.replay()
        torch.cuda.synchronize()
        sums = [exact(t) for t in (small, big, x2)]
        residual = sums[2] + r2.cpu()
        normed = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-5)
        replays.append(all(torch.equal(a.cpu(), sums[0]) and torch.equal(b.cpu(), sums[1])
                           and torch.allclose(d.cpu(), residual, atol=1e-5)
                           and torch.allclose(c.cpu(), normed, atol=1e-4) for a, b, c, d in outs))
    report["graph_replays"] = replays
    del graph
    custom.close()
    with open(f"{out}/rank{world.rank}.json", "w") as f:
        json.dump(report, f)
"""


def test_kernels_on_one_gpu_from_two_processes(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(ONE_GPU_RANKS))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_bounded(mpirun_prefix(2) + [sys.executable, str(script), str(out)], 300, NCCL_ENV)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    for rank in range(2):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert all(c["equal"] for c in report["sums"]), report["sums"]
        for case in report["fused"]:
            ulp = 2 ** -7 if case["dtype"] == "torch.bfloat16" else 2 ** -23
            assert case["residual_equal"] and case["residual_input_kept"], case
            assert case["norm_max_diff"] <= 2 * ulp * case["norm_scale"], case
        assert report["graph_replays"] == [True] * 3
