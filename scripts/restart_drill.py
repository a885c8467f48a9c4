"""Restart drill: kill -9 ranks of a supervised `dist-infer serve --restart N` in the middle of
many concurrent streams, and check that no request is lost (issue #11, deliverable 2).

    .venv/bin/python scripts/restart_drill.py                      # SmolLM2 TP=3, mpirun, 64 streams
    .venv/bin/python scripts/restart_drill.py --victims 0 2        # kill rank 0, then the last rank
    .venv/bin/python scripts/restart_drill.py --cluster clusters/slurm.yaml   # through `dist-infer launch`
    .venv/bin/python scripts/restart_drill.py --start slurm        # a Slurm cluster started here, as the tests do
    .venv/bin/python scripts/restart_drill.py --start ray          # a Ray cluster started here, as the tests do

By default it partitions the embedded SmolLM2-135M-Instruct at TP=3 (float32, as scripts/soak.py)
and starts `dist-infer serve --restart N --launcher-cmd 'mpirun -n 3'`; with --cluster it starts
`dist-infer launch --cluster FILE -- serve --restart N` instead (mpirun, Slurm or Ray). --start slurm|ray
first starts a one-node cluster on this machine with tests/launchers/daemons.py (munged + slurmctld +
slurmd, the ranks an `srun --mpi=pmix` step; or a Ray head, the ranks actors) and writes the cluster
file for it (needs root, Slurm and munge, or `ray[default]`). Then:
1. the reference: each prompt once, alone, before any fault (greedy, and seeded sampling);
2. per victim rank: --streams concurrent streaming requests (the official `openai` client),
   the rank killed with SIGKILL once half of them are under way, a few requests sent while the
   engine restarts; every answer must equal its reference (no lost, repeated or missing tokens);
3. the timings: kill -> /health 503 "restarting", kill -> /health 200 (the restart), and how
   long the streams took end to end.

Writes a JSON summary (default out/restart_drill.json) and exits 1 if any answer is wrong or a
restart took longer than --limit seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from soak import PROMPTS, build_engine  # noqa: E402 (the soak's engine and prompts)

MODEL = "drill"
RANK_VARS = (b"OMPI_COMM_WORLD_RANK", b"SLURM_PROCID", b"PMIX_RANK")
RAY_PIDS = re.compile(r"ranks on nodes \[[^\]]*\], pids \[([\d, ]+)\]")


def mpirun() -> str:
    import shutil

    return shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")


def start_server(args, engine: Path, port: int, log: Path) -> subprocess.Popen:
    serve = ["serve", "--engine", str(engine), "--port", str(port), "--served-model-name", MODEL,
             "--restart", str(args.restart)]
    if args.cluster:
        cmd = [sys.executable, "-m", "dist_infer", "launch", "--cluster", args.cluster, "--", *serve]
    else:
        launcher = [mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", str(args.world)]
        cmd = [sys.executable, "-m", "dist_infer", *serve, "--launcher-cmd", shlex.join(launcher)]
    print("$", shlex.join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rank_pid(engine: Path, rank: int, log: Path) -> int:
    """The current rank job's rank `rank`: the Ray driver logs its actors' pids; mpirun and
    srun ranks carry their rank in their environment."""
    found = RAY_PIDS.findall(log.read_text())
    if found:
        return int(found[-1].split(",")[rank])
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--engine-only" in cmdline and str(engine).encode() in cmdline and \
                Path(cmdline.split()[0].decode()).name not in ("mpirun", "prterun", "srun"):
            if any(v + b"=" + str(rank).encode() in env for v in RANK_VARS):
                return int(entry.name)
    raise SystemExit(f"no rank {rank} of {engine} is running")


async def ask(client: AsyncOpenAI, prompt: str, max_tokens: int, seed: int | None) -> str:
    sampling = dict(temperature=0) if seed is None else dict(temperature=0.8, top_p=0.95, seed=seed)
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, stream=True, **sampling)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def jobs(n: int) -> list[tuple[str, int, int | None]]:
    """(prompt, max_tokens, seed or None for greedy) of request i: the soak's prompts, every
    other one seeded."""
    return [(*PROMPTS[i % len(PROMPTS)], None if (i // len(PROMPTS)) % 2 == 0 else 7 + i % len(PROMPTS))
            for i in range(n)]


async def references(url: str, n: int) -> dict:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0)
    wanted = sorted(set(jobs(n)), key=str)
    answers = {job: await ask(client, *job) for job in wanted}
    await client.close()
    return answers


async def health(http: httpx.AsyncClient, url: str) -> tuple[int | None, str | None]:
    try:
        r = await http.get(f"{url}/health", timeout=2)
        return r.status_code, (r.json().get("status") if r.content else None)
    except (httpx.HTTPError, ValueError):
        return None, None


async def until_health(http: httpx.AsyncClient, url: str, want: tuple[int, str | None], killed: float,
                       deadline_s: float) -> float | None:
    """Seconds from the kill until /health answers `want` (status code, body status)."""
    while time.monotonic() - killed < deadline_s:
        if await health(http, url) == want:
            return round(time.monotonic() - killed, 2)
        await asyncio.sleep(0.05)
    return None


async def drill_once(url: str, victim: int, kill, n: int, expected: dict, limit: float) -> dict:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=900, max_retries=0)
    started, progress, todo = time.monotonic(), asyncio.Event(), jobs(n)
    firsts = [0]

    async def one(job):
        text = await ask(client, *job)
        firsts[0] += 1
        if firsts[0] >= n // 8:  # some finished: the rest are mid-stream or queued
            progress.set()
        return text

    streams = [asyncio.create_task(one(job)) for job in todo]
    await asyncio.wait_for(progress.wait(), 900)
    kill(victim)
    killed = time.monotonic()
    async with httpx.AsyncClient() as http:
        restarting = await until_health(http, url, (503, "restarting"), killed, limit * 3)
        during = [asyncio.create_task(ask(client, *job)) for job in todo[:4]]  # they wait for the new engine
        healthy = await until_health(http, url, (200, None), killed, limit * 3)
    texts = await asyncio.gather(*streams, *during)
    await client.close()
    wrong = [f"{job}: {got[:60]!r} != {expected[job][:60]!r}" for job, got in zip(todo + todo[:4], texts)
             if got != expected[job]]
    return dict(victim=victim, streams=n, killed_after_s=round(killed - started, 2), restarting_after_s=restarting,
                healthy_after_s=healthy, all_done_after_kill_s=round(time.monotonic() - killed, 2),
                sent_during_restart=len(during), wrong=wrong)


@contextlib.contextmanager
def started_cluster(kind: str, engine: Path, root: Path, world: int):
    """A one-node Slurm or Ray cluster started here as tests/launchers start theirs; yields the
    cluster file for `dist-infer launch`, stops every daemon afterwards."""
    sys.path.insert(0, str(REPO / "tests"))
    from launchers.daemons import RayCluster, SlurmCluster
    from launchers.hosts import TwoHosts

    (root / kind).mkdir(parents=True, exist_ok=True)  # the daemons' logs and state
    if kind == "slurm":
        hosts = TwoHosts()  # the test cluster's nodes include two namespace hosts; the drill uses `local`
        cluster = SlurmCluster(root / "slurm", hosts)
        os.environ.update(cluster.env)
        text = (f"launcher: slurm\nengine: {engine}\nlaunch_dir: {root}\n"
                f"slurm: {{partition: local, nodes: 1, ntasks_per_node: {world}, ranks: srun, mpi: pmix, "
                f"time: '01:00:00', job_name: drill, setup: 'source {sys.prefix}/bin/activate'}}\n"
                "env: {OMP_NUM_THREADS: '1'}\n")
    else:
        os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        hosts, cluster = None, RayCluster(root / "ray", [None], cpus=[world])
        text = (f"launcher: ray\nengine: {engine}\nray: {{address: '{cluster.gcs_address}', submit: false}}\n"
                "env: {OMP_NUM_THREADS: '1'}\n")
    path = root / f"{kind}.yaml"
    path.write_text(text)
    try:
        yield str(path)
    finally:
        if kind == "slurm":
            subprocess.run(["scancel", "-n", "drill"], env=os.environ)
        cluster.stop()
        if hosts:
            hosts.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", help="a built engine (default: SmolLM2 at TP=3, built here)")
    p.add_argument("--world", type=int, default=3, help="ranks of --engine (TP x PP)")
    p.add_argument("--cluster", help="start through `dist-infer launch --cluster FILE` (mpirun, slurm or ray)")
    p.add_argument("--start", choices=("slurm", "ray"), help="start a one-node cluster of this kind here first "
                                                              "(as the tests do) and drill through it")
    p.add_argument("--victims", type=int, nargs="+", default=[0, 1, 2], help="ranks to kill, one drill each")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--limit", type=float, default=60.0, help="seconds a restart may take")
    p.add_argument("--out", default=str(REPO / "out" / "restart_drill.json"))
    args = p.parse_args()
    args.restart = len(args.victims)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: still stop the cluster started here
    engine = Path(args.engine) if args.engine else build_engine(REPO / "out" / "soak-smollm2-tp3")
    root = Path(tempfile.mkdtemp(prefix="restart-drill-"))
    with contextlib.ExitStack() as stack:
        if args.start:
            args.cluster = stack.enter_context(started_cluster(args.start, engine, root, args.world))
        return drill(args, engine, root)


def drill(args, engine: Path, root: Path) -> int:
    port = 19000 + os.getpid() % 1000
    url, log = f"http://127.0.0.1:{port}", root / "serve.log"
    proc = start_server(args, engine, port, log)
    results = []
    try:
        from soak import wait_healthy

        wait_healthy(url, proc)
        expected = asyncio.run(references(url, args.streams))
        kill = lambda rank: os.kill(rank_pid(engine, rank, log), signal.SIGKILL)  # noqa: E731
        for victim in args.victims:
            results.append(asyncio.run(drill_once(url, victim, kill, args.streams, expected, args.limit)))
            print(json.dumps(results[-1]), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    slow = [r for r in results if (r["healthy_after_s"] or float("inf")) > args.limit]
    summary = dict(engine=str(engine), launcher=args.start or args.cluster or "mpirun", streams=args.streams,
                   command=" ".join(sys.argv), drills=results,
                   wrong=sum(len(r["wrong"]) for r in results), slow_restarts=len(slow), server_log=str(log))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "drills"}, indent=1))
    return 1 if summary["wrong"] or slow or len(results) < len(args.victims) else 0


if __name__ == "__main__":
    sys.exit(main())
