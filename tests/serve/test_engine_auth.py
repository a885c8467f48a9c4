"""The engine sockets take only frames signed with the engine key (engine_loop.FrameSigner):
a frame from anyone else, well-formed or a pickle that would run code, is dropped with a
warning before it is unpickled, and the server keeps serving. In process on real ZeroMQ
sockets (milliseconds), then against a real `serve --restart 1` on its TCP sockets."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import pickle
import re
import secrets
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import zmq
import zmq.asyncio

from conftest import hf_greedy
from dist_infer.client import EngineClient
from dist_infer.errors import LaunchError
from dist_infer.workers.engine_loop import (ENGINE_KEY_ENV, KEY_FILE, EngineAddresses, EngineLoop, FrameSigner,
                                            engine_key)
from dist_infer.workers.llm_engine import EngineStats
from .server import Server, descendants

STATS = EngineStats(0, 0, 0.0, 0.0, 0, 0)


class Tripwire:
    """Unpickling this creates `path`: proof that a frame was (or was not) unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def forged_frames(message: tuple, marker: Path) -> list[bytes]:
    """What a stranger on the port could send: a bare pickle that runs code, the same behind a
    MAC made with another key, and a well-formed message signed with another key."""
    wrong = FrameSigner(secrets.token_bytes(32), "attacker")
    evil = pickle.dumps(("heartbeat", Tripwire(marker), False))
    mac = hmac.new(secrets.token_bytes(32), evil, hashlib.sha256).digest()
    return [evil, mac + evil, wrong.seal(message), b""]


def test_signed_frames_round_trip_and_forged_ones_are_refused_unread(tmp_path, caplog):
    signer = FrameSigner(b"k" * 32, "test")
    assert signer.open(signer.seal(("abort", "r1"))) == ("abort", "r1")
    for frame in forged_frames(("shutdown",), tmp_path / "ran"):
        assert signer.open(frame) is None
    assert signer.rejected == 4 and not (tmp_path / "ran").exists()
    assert "test: dropped an unauthenticated frame" in caplog.text


def test_engine_loop_drops_forged_commands_and_obeys_signed_ones(tmp_path, caplog):
    """Rank 0's bound ipc sockets: forged `add` and `shutdown` reach nothing; a signed shutdown does."""
    added = []
    engine = SimpleNamespace(add_request=lambda rid, req: added.append(rid), abort=added.append,
                             has_unfinished=lambda: False, stats=lambda: STATS)
    addresses = EngineAddresses.in_directory(tmp_path)
    loop = EngineLoop(engine, addresses)
    key_file = tmp_path / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # made by the binding side, private
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(addresses.requests)
    try:
        for frame in forged_frames(("add", "stolen", None), tmp_path / "ran") + forged_frames(("shutdown",), tmp_path / "ran"):
            push.send(frame)
        _receive_until(loop, lambda: loop.signer.rejected == 8)
        assert not loop.stopping and added == [] and not (tmp_path / "ran").exists()
        push.send(FrameSigner(key_file.read_bytes(), "front-end").seal(("shutdown",)))
        _receive_until(loop, lambda: loop.stopping)
    finally:
        push.close(linger=0)
        ctx.term()
        loop.close()
    assert "engine loop: dropped an unauthenticated frame" in caplog.text


def _receive_until(loop: EngineLoop, condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        loop._receive(50)


def test_front_end_drops_forged_engine_messages(tmp_path, monkeypatch):
    """The supervisor's bound TCP sockets: a forged heartbeat neither runs code nor makes the
    client ready; the real engine's signed one (key from the environment) does."""
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)

    async def scenario():
        client = EngineClient(None)
        await client.start()
        addresses = client.bind("127.0.0.1")
        assert os.environ[ENGINE_KEY_ENV]  # made by the binding front-end, for the rank job to inherit
        ctx = zmq.asyncio.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(addresses.outputs)
        for frame in forged_frames(("heartbeat", STATS, False), tmp_path / "ran"):
            await push.send(frame)
        await asyncio.sleep(0.3)
        forged_ready = client.ready
        await push.send(FrameSigner(engine_key(addresses, create=False), "engine").seal(("heartbeat", STATS, False)))
        await client.wait_ready(10)
        push.close(linger=0)
        await client.close()
        ctx.term()
        return forged_ready, client._signer.rejected

    forged_ready, rejected = asyncio.run(scenario())
    assert not forged_ready and rejected == 4 and not (tmp_path / "ran").exists()


def test_rank_0_without_the_supervisors_key_is_refused(monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    with pytest.raises(LaunchError, match=f"no {ENGINE_KEY_ENV}.*mpirun -x {ENGINE_KEY_ENV}"):
        engine_key(EngineAddresses("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"), create=False)


def test_a_key_file_others_can_read_is_refused(tmp_path):
    (tmp_path / KEY_FILE).write_bytes(b"x" * 32)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(LaunchError, match="mode 0600"):
        engine_key(EngineAddresses.in_directory(tmp_path), create=False)


CONNECTED = re.compile(r"connected to the front-end at (tcp://[^,\s]+),(tcp://\S+)")


def test_supervised_server_ignores_forged_frames_on_its_tcp_port(tiny, tokenizer, tmp_path):
    """`serve --restart 1`: the front-end's TCP socket that rank 0 sends to takes forged frames
    from a stranger without running them, and the server still answers correctly; the key is in
    no process's command line."""
    engine, model = tiny
    srv = Server(engine(1, 1), 1, "--restart", "1", "--served-model-name", "tiny").wait_healthy()
    try:
        found = CONNECTED.search(srv.output())
        assert found, srv.output()
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(found.group(2))
        for frame in forged_frames(("heartbeat", STATS, True), tmp_path / "ran"):
            push.send(frame)
        push.close(linger=1000)
        ctx.term()
        time.sleep(1.0)
        prompt = [5, 17, 42, 99, 7]
        body = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True)
        answer = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert srv.health() == 200 and not (tmp_path / "ran").exists()
        assert "front-end: dropped an unauthenticated frame" in srv.output()
        job = [pid for pid in descendants(srv.proc.pid) if "--engine-only" in _cmdline(pid)]
        assert job, srv.output()
        key = _environ(job[0]).get(ENGINE_KEY_ENV)  # the rank job has the key in its environment...
        assert key and all(key not in _cmdline(pid) for pid in [srv.proc.pid, *descendants(srv.proc.pid)])  # ...only
        assert answer.json()["choices"][0]["text"] == tokenizer.decode(hf_greedy(model, prompt, 8), skip_special_tokens=True)
    finally:
        srv.kill()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(v.decode().split("=", 1) for v in raw if b"=" in v)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""



def test_open_mpi_is_told_to_forward_the_key_by_name_only(monkeypatch, tmp_path):
    """Ranks on other nodes get only the variables mpirun's -x names: the supervisor's rank-job
    command names the key's variable (its value stays in the environment)."""
    from conftest import mpirun_prefix
    from dist_infer.workers.serve import ServeOptions

    monkeypatch.setenv(ENGINE_KEY_ENV, "secret-value")
    mpirun = mpirun_prefix(2)
    addresses = EngineAddresses("tcp://10.0.0.1:5000", "tcp://10.0.0.1:5001")
    cmd = ServeOptions(tmp_path, launcher_cmd=mpirun).rank_job_command(addresses)
    assert cmd[:3] == [mpirun[0], "-x", ENGINE_KEY_ENV] and cmd[3:len(mpirun) + 2] == mpirun[1:]
    assert "secret-value" not in " ".join(cmd)
    srun = ServeOptions(tmp_path, launcher_cmd=["srun", "-n", "2"]).rank_job_command(addresses)
    assert srun[:3] == ["srun", "-n", "2"]  # srun exports the whole environment
