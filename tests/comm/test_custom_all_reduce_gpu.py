"""The one-shot IPC all-reduce against NCCL, on 2 GPUs under a real `mpirun -n 2`
(`pytest -m gpu`; skipped where fewer than 2 GPUs are visible). Sizes from 1 element to
64 MB, bf16 / fp16 / fp32, eager and replayed from a CUDA graph; the TP communicator's
dispatch (custom below the threshold, NCCL above) and its fallback switch."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from conftest import mpirun_prefix, run_bounded

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

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


def test_one_shot_matches_nccl_at_every_size(tmp_path):
    reports, proc = _run_ranks(tmp_path)
    for report in reports:
        assert report["dispatch_custom"], proc.stderr[-2000:]
        assert all(report["graph_replays_exact"])
        for case in report["cases"]:
            # Two ranks: one float32 add rounded once, NCCL's arithmetic exactly.
            assert case["equal_nccl"] and case["dispatch_equal_nccl"] and case["ranks_agree"], case
            assert case["max_err"] <= TOLERANCE[case["dtype"]], case
        used = {(c["dtype"], c["n"]): c["used_custom"] for c in report["cases"]}
        assert used["torch.bfloat16", 2_097_152] and not used["torch.bfloat16", 2_097_153]  # 4 MB threshold
    assert "one-shot over CUDA IPC for messages up to 4096 KB" in proc.stderr


def test_switch_off_keeps_nccl(tmp_path):
    reports, proc = _run_ranks(tmp_path, {"DIST_INFER_CUSTOM_ALL_REDUCE": "0"})
    assert not reports[0]["dispatch_custom"] and not any(c["used_custom"] for c in reports[0]["cases"])
    assert all(c["dispatch_equal_nccl"] for c in reports[0]["cases"])
