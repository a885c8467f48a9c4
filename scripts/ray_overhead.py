"""Ray's per-step control overhead against mpirun, on the same tiny engine and machine.

    .venv/bin/python scripts/ray_overhead.py            # writes out/ray_vs_mpirun.json

Starts a one-node Ray cluster the way tests/launchers do (tests/launchers/daemons.py), builds the
launcher tests' tiny TP=2 x PP=2 Llama, and runs the same greedy generation (48 steps, batch 3)
through `dist-infer launch`: Ray actors (a gloo world; once by `ray job submit`, once by a driver
that `launch` starts), and mpirun with three data planes: MPI busy-polling, MPI yielding
(`--mca mpi_yield_when_idle 1`), and gloo. Every run's tokens must begin with the single-process
reference. The figure that isolates Ray's own cost is Ray over mpirun-with-gloo (the same data
plane): best of two runs each, as 2 shared cores need. Needs `ray[default]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from launchers.conftest import PP, TP, Engine, launch, ok, write_cluster  # noqa: E402
from launchers.daemons import RayCluster, free_port  # noqa: E402
from launchers.test_ray import assert_reference_tokens, bench_args, ray_yaml, steps_per_s  # noqa: E402


def mpirun_cluster(root: Path, engine: Engine, name: str, extra: str = "", env: str = "") -> Path:
    return write_cluster(root / f"{name}.yaml", f"""
launcher: mpirun
engine: {engine.dir}
launch_dir: {root}
nodes: [{{host: localhost, slots: {TP * PP}}}]
mpirun: {{extra_args: [--oversubscribe, --bind-to, none{extra}]}}
env: {{OMP_NUM_THREADS: "1"{env}}}
""")


def clusters(root: Path, engine: Engine, ray: RayCluster) -> dict[str, Path]:
    # Slots = ranks, so mpirun does not turn yielding on by itself; the ranks would (comm/bootstrap.py)
    # on a node with fewer CPUs than ranks, unless told otherwise: "mpirun" pins busy-polling.
    return {"ray_submit": ray_yaml(root / "submit", engine, f"address: '{ray.job_url}', submit: true"),
            "ray": ray_yaml(root / "driver", engine, f"address: '{ray.gcs_address}', submit: false"),
            "mpirun": mpirun_cluster(root, engine, "mpi", env=", OMPI_MCA_mpi_yield_when_idle: '0'"),
            "mpirun_yield_when_idle": mpirun_cluster(root, engine, "mpiy", ", --mca, mpi_yield_when_idle, '1'"),
            "mpirun_gloo": mpirun_cluster(root, engine, "mpig", env=f", DIST_INFER_COMM: gloo, MASTER_ADDR: "
                                                                    f"127.0.0.1, MASTER_PORT: '{free_port()}'")}


def measure(files: dict[str, Path], engine: Engine, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(rounds):
        for name, cluster in files.items():
            proc = ok(launch(cluster, bench_args(engine), timeout=240))
            assert_reference_tokens(proc, engine, name)
            rates[name].append(steps_per_s(proc))
            print(f"{name}: {rates[name][-1]:.1f} steps/s", flush=True)
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "out" / "ray_vs_mpirun.json"))
    args = p.parse_args()
    os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # see tests/launchers/test_ray.py
    root = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    for sub in ("submit", "driver", "ray"):  # (RayCluster writes its logs into ray/)
        (root / sub).mkdir()
    engine = Engine(root / "engine")
    ray = RayCluster(root / "ray", [None], cpus=[TP * PP])
    try:
        rates = measure(clusters(root, engine, ray), engine, args.rounds)
    finally:
        ray.stop()
    best = {k: round(max(v), 2) for k, v in rates.items()}
    best["ray"] = max(best.pop("ray"), best.pop("ray_submit"))
    record = {"engine": f"tiny llama tp={TP} pp={PP}, CPU, {os.cpu_count()} cores", "steps": 48, "batch": 3,
              "command": "scripts/ray_overhead.py", "steps_per_s": best, "all_runs": rates,
              **{f"ray_over_{k}": round(best["ray"] / best[k], 3) for k in ("mpirun", "mpirun_yield_when_idle",
                                                                            "mpirun_gloo")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
