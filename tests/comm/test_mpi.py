"""dist_infer.comm under a real `mpirun -n 4` (no mocks): MpiCommunicator
collectives and point-to-point, ParallelGroups against Mapping, collective_call
error propagation without hangs; LocalCommunicator and the Slurm world check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, mpirun_prefix, run_bounded
from dist_infer.comm import Communicator, LocalCommunicator, world_from_launch
from dist_infer.comm.base import collective_call
from dist_infer.comm.bootstrap import MPI_SIZE_VARS, check_slurm_world
from dist_infer.config import Mapping
from dist_infer.errors import LaunchError, LayoutError

WORLD = 4
LAYOUTS = [(2, 2), (4, 1), (1, 4)]


def run_mpi(tmp_path: Path, source: str, n: int = WORLD, timeout: float = 120, env: dict | None = None,
            launcher: list[str] | None = None):
    """Run `source` as a script under `mpirun -n n`; each rank writes out/rank{r}.json.
    A hang is killed (whole process group) and fails the test."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(source))
    out = tmp_path / "out"
    out.mkdir()
    cmd = (launcher or mpirun_prefix(n)) + [sys.executable, str(script), str(out)]
    proc = run_bounded(cmd, timeout, env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    results = {}
    for r in range(n):
        path = out / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote no result\nstderr:\n{proc.stderr[-4000:]}"
        results[r] = json.loads(path.read_text())
    return results


COLLECTIVES_WORKER = """
    import json, os, sys, time
    import torch
    from dist_infer.comm import ParallelGroups, world_from_launch
    from dist_infer.comm.base import collective_call
    from dist_infer.comm.bootstrap import check_slurm_world
    from dist_infer.comm.mpi import MpiCommunicator
    from dist_infer.config import Mapping
    from dist_infer.errors import CheckpointError, DistInferError, LaunchError

    out = sys.argv[1]
    world = world_from_launch()
    r, n = world.rank, world.size
    res = {"rank": r, "size": n, "type": type(world).__name__}

    # all_reduce, in place, exact values
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16), ("i64", torch.int64)]:
        x = (torch.tensor([[0.5, 1.5, -2.0], [3.0, 0.25, 8.0]]) * (r + 1)).to(dtype)
        ptr = x.data_ptr()
        y = world.all_reduce(x)
        res["ar_" + name] = {"values": y.float().tolist(), "dtype": str(y.dtype), "same": y is x,
                             "ptr_kept": x.data_ptr() == ptr}
    # bf16 with random values: the sum must be rounded to bf16 once (reduced in float32)
    g = torch.Generator().manual_seed(100 + r)
    xb = torch.randn(257, generator=g).to(torch.bfloat16)
    gathered = world.all_gather(xb.clone())
    expected = gathered.float().sum(0).to(torch.bfloat16)
    world.all_reduce(xb)
    res["ar_bf16_random_exact"] = torch.equal(xb, expected)
    # all_gather: [size, *shape], rank order
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16), ("i64", torch.int64)]:
        x = torch.full((2, 3), r, dtype=dtype) + torch.arange(3).to(dtype)
        y = world.all_gather(x)
        res["ag_" + name] = {"shape": list(y.shape), "dtype": str(y.dtype), "values": y.float().tolist()}
    res["ag_noncontig"] = world.all_gather(torch.arange(6.0).reshape(2, 3).t() + r).tolist()
    # send / recv in pairs (0<->1, 2<->3), both directions, into preallocated buffers
    peer = r ^ 1
    payload = torch.arange(5, dtype=torch.float32) + 100 * r
    buf = torch.empty(5, dtype=torch.float32)
    if r % 2 == 0:
        world.send(payload, peer)
        got = world.recv(buf, peer)
    else:
        got = world.recv(buf, peer)
        world.send(payload, peer)
    res["recv"] = {"values": got.tolist(), "same": got is buf}
    # a bf16 transposed (non-contiguous) tensor travels as its logical values
    src_t = (torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * r).to(torch.bfloat16).t()
    buf2 = torch.empty(3, 2, dtype=torch.bfloat16)
    if r % 2 == 0:
        world.send(src_t, peer)
        world.recv(buf2, peer)
    else:
        world.recv(buf2, peer)
        world.send(src_t, peer)
    res["recv_bf16_t"] = buf2.float().tolist()
    # objects
    res["bcast"] = world.broadcast_object({"from": r, "data": [r] * 3} if r == 2 else None, src=2)
    res["bcast0"] = world.broadcast_object(("root", r), src=0)
    res["gather_obj"] = world.all_gather_object({"r": r})
    world.barrier()

    # TP / PP groups for every layout of 4 ranks
    res["groups"] = {}
    for tp, pp in [(2, 2), (4, 1), (1, 4)]:
        groups = ParallelGroups.build(world, Mapping(tp, pp))
        m = groups.mapping
        info = {"mapping": [m.tp, m.pp, m.rank], "tp_rank": groups.tp.rank, "tp_size": groups.tp.size,
                "pp_rank": groups.pp.rank, "pp_size": groups.pp.size,
                "tp_members": groups.tp.all_gather_object(r), "pp_members": groups.pp.all_gather_object(r),
                "tp_sum": groups.tp.all_reduce(torch.tensor([float(r)])).item(),
                "pp_sum": groups.pp.all_reduce(torch.tensor([float(r)])).item(),
                "world_is_world": groups.world is world}
        # hidden states down the pipeline over the PP group, addressed by stage
        if pp > 1:
            h = torch.empty(4)
            if not m.is_first_stage:
                groups.pp.recv(h, m.pp_rank - 1)
                info["from_prev"] = h.tolist()
            if not m.is_last_stage:
                groups.pp.send(torch.full((4,), float(r)), m.pp_rank + 1)
        res["groups"][f"{tp}x{pp}"] = info
    # wrong world size for the layout: refused on every rank
    try:
        ParallelGroups.build(world, Mapping(2, 1))
        res["mismatch"] = None
    except LaunchError as exc:
        res["mismatch"] = str(exc)

    # Slurm world check inside a correctly launched 4-rank job
    os.environ.update(SLURM_STEP_ID="0", SLURM_NTASKS="4")
    check_slurm_world(world.size)
    res["slurm_ok"] = True
    # mpirun inside an allocation: SLURM_NTASKS counts OpenMPI's per-node daemons, not ranks
    os.environ["SLURM_NTASKS"] = "8"
    check_slurm_world(world.size)
    res["slurm_daemons_ok"] = True

    # collective_call: one rank's error is raised on every rank (no hang)
    def load():
        if r == 2:
            time.sleep(0.5)  # the others are already waiting in the collective
            raise CheckpointError("rank2.safetensors is corrupt; partition again")
        return r

    try:
        collective_call(world, load)
        res["error"] = None
    except DistInferError as exc:
        res["error"] = {"type": type(exc).__name__, "message": str(exc), "collective": getattr(exc, "collective", False),
                        "is_checkpoint_error": isinstance(exc, CheckpointError)}

    # two ranks fail: everyone reports the lowest failing rank's error
    def two_fail():
        if r in (1, 3):
            raise CheckpointError(f"bad shard on {r}")
        return r

    try:
        collective_call(world, two_fail)
        res["error2"] = None
    except DistInferError as exc:
        res["error2"] = str(exc)

    # the world is still usable afterwards, and gather=True returns every rank's result
    res["gathered"] = collective_call(world, lambda: r * 10, gather=True)
    res["plain"] = collective_call(world, lambda: r + 1)
    world.barrier()

    with open(os.path.join(out, f"rank{r}.json"), "w") as f:
        json.dump(res, f)
"""


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    """One `mpirun -n 4` job runs every check above (collectives, groups, the Slurm check and
    collective_call's error propagation); each test below asserts on its part of the results."""
    return run_mpi(tmp_path_factory.mktemp("mpi_collectives"), COLLECTIVES_WORKER)


BASE = [[0.5, 1.5, -2.0], [3.0, 0.25, 8.0]]


def test_world_is_mpi(collectives):
    assert sorted(collectives) == list(range(WORLD))
    for r, res in collectives.items():
        assert res["rank"] == r and res["size"] == WORLD and res["type"] == "MpiCommunicator"


@pytest.mark.parametrize("name,dtype", [("f32", "torch.float32"), ("bf16", "torch.bfloat16"),
                                        ("f16", "torch.float16"), ("i64", "torch.int64")])
def test_all_reduce_sums_in_place(collectives, name, dtype):
    total = sum(range(1, WORLD + 1))  # rank r contributes BASE * (r + 1)
    if name == "i64":
        # int64: each rank's values truncate toward zero before the sum
        expected = [[sum(float(int(v * (r + 1))) for r in range(WORLD)) for v in row] for row in BASE]
    else:
        expected = [[v * total for v in row] for row in BASE]
    for r, res in collectives.items():
        ar = res["ar_" + name]
        assert ar["values"] == expected, (r, ar)
        assert ar["dtype"] == dtype
        assert ar["same"] and ar["ptr_kept"], "all_reduce must work in place and return its input"


def test_all_reduce_bf16_rounds_once(collectives):
    assert all(res["ar_bf16_random_exact"] for res in collectives.values())


@pytest.mark.parametrize("name,dtype", [("f32", "torch.float32"), ("bf16", "torch.bfloat16"), ("i64", "torch.int64")])
def test_all_gather_stacks_in_rank_order(collectives, name, dtype):
    expected = [[[float(i + j) for j in range(3)] for _ in range(2)] for i in range(WORLD)]
    for res in collectives.values():
        ag = res["ag_" + name]
        assert ag["shape"] == [WORLD, 2, 3] and ag["dtype"] == dtype
        assert ag["values"] == expected


def test_all_gather_non_contiguous(collectives):
    base = torch.arange(6.0).reshape(2, 3).t()
    expected = torch.stack([base + i for i in range(WORLD)]).tolist()
    assert all(res["ag_noncontig"] == expected for res in collectives.values())


def test_send_recv(collectives):
    for r, res in collectives.items():
        peer = r ^ 1
        assert res["recv"]["values"] == [float(i + 100 * peer) for i in range(5)]
        assert res["recv"]["same"], "recv must fill and return the preallocated buffer"
        expected = (torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * peer).t().tolist()
        assert res["recv_bf16_t"] == expected


def test_broadcast_and_gather_objects(collectives):
    for r, res in collectives.items():
        assert res["bcast"] == {"from": 2, "data": [2, 2, 2]}
        assert res["bcast0"] == ["root", 0]
        assert res["gather_obj"] == [{"r": i} for i in range(WORLD)]


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_parallel_groups_match_mapping(collectives, tp, pp):
    for r, res in collectives.items():
        info = res["groups"][f"{tp}x{pp}"]
        m = Mapping(tp, pp, r)
        assert info["mapping"] == [tp, pp, r]
        assert info["tp_members"] == m.tp_group_ranks, (r, info)
        assert info["pp_members"] == m.pp_group_ranks, (r, info)
        assert (info["tp_rank"], info["tp_size"]) == (m.tp_rank, tp)
        assert (info["pp_rank"], info["pp_size"]) == (m.pp_rank, pp)
        # a group collective only involves the group's members
        assert info["tp_sum"] == float(sum(m.tp_group_ranks))
        assert info["pp_sum"] == float(sum(m.pp_group_ranks))
        assert info["world_is_world"]
        if pp > 1 and not m.is_first_stage:
            assert info["from_prev"] == [float(m.prev_stage_rank)] * 4


def test_parallel_groups_refuse_wrong_world(collectives):
    for res in collectives.values():
        assert res["mismatch"] is not None and "launched 4 processes" in res["mismatch"] and "needs 2" in res["mismatch"]


def test_slurm_check_in_mpi_job(collectives):
    for res in collectives.values():
        assert res["slurm_ok"] is True
        assert res["slurm_daemons_ok"] is True


def test_collective_call_error_raised_on_every_rank(collectives):
    for r, res in collectives.items():
        err = res["error"]
        assert err is not None, f"rank {r} did not raise"
        assert err["type"] == "CheckpointError" and err["is_checkpoint_error"]
        assert "rank2.safetensors is corrupt" in err["message"]
        if r != 2:
            assert "rank 2" in err["message"]
        assert err["collective"] is True
        if r in (1, 3):
            assert res["error2"] == f"bad shard on {r}"
        else:
            assert res["error2"] == "rank 1: bad shard on 1"
        assert res["gathered"] == [0, 10, 20, 30]
        assert res["plain"] == r + 1


# ------------------------------------------------------------------ without MPI

def test_local_communicator_identities():
    c = LocalCommunicator()
    assert isinstance(c, Communicator)
    assert (c.rank, c.size) == (0, 1)
    x = torch.randn(3, 4)
    assert c.all_reduce(x) is x
    g = c.all_gather(x)
    assert g.shape == (1, 3, 4) and torch.equal(g[0], x)
    obj = {"a": [1, 2]}
    assert c.broadcast_object(obj) is obj
    assert c.all_gather_object(obj) == [obj]
    c.barrier()
    sub = c.split(color=0, key=0)
    assert isinstance(sub, LocalCommunicator) and sub.size == 1
    with pytest.raises(RuntimeError):
        c.send(x, 0)
    with pytest.raises(RuntimeError):
        c.recv(x, 0)
    with pytest.raises(SystemExit) as info:
        c.abort(3)
    assert info.value.code == 3


def test_collective_call_local():
    c = LocalCommunicator()
    assert collective_call(c, lambda: 5) == 5
    assert collective_call(c, lambda: 5, gather=True) == [5]
    error = LayoutError("bad layout")

    def fail():
        raise error

    with pytest.raises(LayoutError) as info:
        collective_call(c, fail)
    assert info.value is error and info.value.collective is True
    with pytest.raises(ZeroDivisionError):  # bugs are not swallowed
        collective_call(c, lambda: 1 / 0)


@pytest.fixture
def no_launcher_env(monkeypatch):
    for var in (*MPI_SIZE_VARS, "PMIX_RANK", "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_NPROCS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_check_slurm_world_refuses_wrong_mpi_plugin(no_launcher_env):
    env = no_launcher_env
    check_slurm_world(1)  # no Slurm at all
    env.setenv("SLURM_NTASKS", "4")
    check_slurm_world(1)  # inside an sbatch script but not an srun step
    env.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(LaunchError) as info:
        check_slurm_world(1)
    assert "--mpi=pmix" in str(info.value) and "4 tasks" in str(info.value)
    check_slurm_world(4)
    # a plain start under srun (no MPI variables): the world of one is refused too
    with pytest.raises(LaunchError, match="--mpi=pmix"):
        world_from_launch()
    env.delenv("SLURM_NTASKS")
    env.setenv("SLURM_NPROCS", "2")
    with pytest.raises(LaunchError, match="--mpi=pmix"):
        check_slurm_world(1)
    env.setenv("SLURM_NPROCS", "1")
    assert isinstance(world_from_launch(), LocalCommunicator)


def test_world_from_launch_without_launcher_is_local(no_launcher_env):
    world = world_from_launch()
    assert isinstance(world, LocalCommunicator) and world.size == 1


def test_srun_single_task_subprocess_refused(tmp_path):
    """The real failure mode: srun started 4 tasks with the wrong plugin; each is a
    lone python process that must refuse to run (exit non-zero, name the fix)."""
    code = ("from dist_infer.comm import world_from_launch\n"
            "from dist_infer.errors import LaunchError\n"
            "try:\n    world_from_launch()\nexcept LaunchError as e:\n    print('REFUSED', e)\n    raise SystemExit(2)\n"
            "print('STARTED')\n")
    env = {k: v for k, v in os.environ.items() if k not in (*MPI_SIZE_VARS, "PMIX_RANK")}
    env.update(SLURM_STEP_ID="0", SLURM_NTASKS="4", SLURM_PROCID="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 2 and "REFUSED" in proc.stdout and "--mpi=pmix" in proc.stdout, proc.stdout + proc.stderr
    assert "STARTED" not in proc.stdout


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not shutil.which("taskset"), reason="needs 2+ CPUs and taskset")
def test_a_rank_bound_to_one_core_is_given_every_cpu():
    """mpirun's default binding (one core per rank of a small job) would serialise a GPU rank's
    host threads; resolve_device widens it (tested here without a GPU: the function it calls)."""
    code = ("import os; from dist_infer.comm.bootstrap import widen_cpu_affinity; "
            "before = len(os.sched_getaffinity(0)); widen_cpu_affinity(0); print(before, len(os.sched_getaffinity(0)))")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["1", str(len(os.sched_getaffinity(0)))]


def test_slurm_per_node_task_counts():
    from dist_infer.comm.bootstrap import slurm_task_counts

    assert slurm_task_counts("3") == [3]
    assert slurm_task_counts("2(x3),1") == [2, 2, 2, 1]
    assert slurm_task_counts("2(x),1") is None and slurm_task_counts("") is None


@pytest.mark.parametrize("env, want", [({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 3), ({"LOCAL_WORLD_SIZE": "2"}, 2),
                                       ({"SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_NODEID": "2"}, 1),
                                       ({"SLURM_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, 4), ({}, None)])
def test_ranks_on_this_node_from_each_launchers_environment(monkeypatch, env, want):
    from dist_infer.comm import bootstrap

    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE",
                "SLURM_TASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert bootstrap.ranks_on_this_node() == want


NODE_SHARE_WORKER = """
    import json, os, sys
    import torch
    from dist_infer.comm import world_from_launch
    from dist_infer.comm.bootstrap import share_node_cpus

    world = world_from_launch()
    share_node_cpus(world, "cpu")
    with open(os.path.join(sys.argv[1], f"rank{world.rank}.json"), "w") as f:
        json.dump({"yield": os.environ.get("OMPI_MCA_mpi_yield_when_idle"), "threads": torch.get_num_threads()}, f)
"""


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset")
def test_ranks_outnumbering_cpus_yield_and_split_the_cores(tmp_path, monkeypatch):
    """Two ranks held to one CPU (mpirun told of 2 slots, so it does not yield by itself):
    MPI yields while waiting, and each rank keeps one torch thread. Busy-polling or a thread per
    core in every rank made CPU steps 4-30x slower (comm/bootstrap.py)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    mpirun = [a for a in mpirun_prefix(2) if a != "--oversubscribe"]
    results = run_mpi(tmp_path, NODE_SHARE_WORKER, n=2, launcher=["taskset", "-c", "0", *mpirun, "--host", "localhost:2"])
    assert [results[r] for r in (0, 1)] == [{"yield": "1", "threads": 1}] * 2


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2+ CPUs")
def test_omp_num_threads_wins_over_the_split(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    results = run_mpi(tmp_path, NODE_SHARE_WORKER, n=2)
    assert [results[r]["threads"] for r in (0, 1)] == [2, 2]
