"""Checkpoint and engine files are hashed per piece (safetensors_stream.FileDigest / file_entry);
loading verifies the pieces in parallel (checkpoint.verify_file) and names the byte range that
differs. Entries written before pieces existed (a whole-file sha256) are verified whole.
The streaming writer puts every tensor's bytes at its offset on a thread beside the caller."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from conftest import REPO
from dist_infer.errors import CheckpointError
from dist_infer.partition.checkpoint import verify_file
from dist_infer.partition import safetensors_stream
from dist_infer.partition.safetensors_stream import FileDigest, StreamingSafetensorsWriter, file_entry

PIECE = 300


@pytest.fixture
def data_file(tmp_path):
    data = os.urandom(1000)  # pieces of 300, 300, 300 and 100 bytes
    path = tmp_path / "rank0.safetensors"
    path.write_bytes(data)
    return path, data


def test_pieces_are_the_sha256_of_each_slice_and_streaming_agrees(data_file):
    path, data = data_file
    entry = file_entry(path, PIECE)
    assert entry["size"] == 1000 and "sha256" not in entry  # no one-core pass over the whole file
    assert entry["piece_sha256"] == [hashlib.sha256(data[i:i + PIECE]).hexdigest() for i in range(0, 1000, PIECE)]
    streamed = FileDigest(PIECE)
    for i in range(0, 1000, 7):  # blocks that straddle piece boundaries
        streamed.update(data[i:i + 7])
    assert streamed.entry() == entry


def test_an_empty_file_has_one_empty_piece(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    assert file_entry(tmp_path / "e", PIECE) == FileDigest(PIECE).entry()
    verify_file(tmp_path / "e", file_entry(tmp_path / "e", PIECE), "engine rank 0", "Rebuild.")


@pytest.mark.parametrize("offset, byte_range", [(0, "0-300"), (650, "600-900"), (999, "900-1000")])
def test_a_changed_byte_is_found_in_its_piece(data_file, offset, byte_range):
    path, data = data_file
    entry = file_entry(path, PIECE)
    verify_file(path, entry, "engine rank 0", "Rebuild.")
    damaged = bytearray(data)
    damaged[offset] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=f"corrupt \\(sha256 of bytes {byte_range} differs.*Rebuild"):
        verify_file(path, entry, "engine rank 0", "Rebuild.")


def test_entries_without_pieces_are_verified_whole(data_file):
    path, data = data_file
    legacy = {"size": 1000, "sha256": hashlib.sha256(data).hexdigest()}
    verify_file(path, legacy, "checkpoint rank 0", "Partition again.")
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="corrupt \\(sha256 differs from the manifest\\)"):
        verify_file(path, legacy, "checkpoint rank 0", "Partition again.")


@pytest.mark.parametrize("edit", [{"piece_bytes": 0}, {"piece_bytes": "300"}, {"piece_sha256": "abc"},
                                  {"piece_sha256": ["0" * 64]}])
def test_a_damaged_entry_is_a_clear_error(data_file, edit):
    path, _ = data_file
    entry = {**file_entry(path, PIECE), **edit}
    with pytest.raises(CheckpointError, match="manifest entry of rank0.safetensors is damaged.*Rebuild"):
        verify_file(path, entry, "engine rank 0", "Rebuild.")


def test_threaded_writes_in_any_order_make_the_file_safetensors_reads(tmp_path, monkeypatch):
    """Tensors written out of declaration order, more than the writer thread's queue holds: every byte lands."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setattr(safetensors_stream, "WRITE_QUEUE", 2)
    tensors = {f"t{i}": torch.randn(37 + i, 19 + i).to(dtype) for i, dtype in
               enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32] * 3)}
    tensors["ids"] = torch.arange(5000, dtype=torch.int64)
    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in
                                                                   tensors.items()], {"format": "pt"})
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_tensor_never_written_is_an_error(tmp_path):
    import torch

    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,)),
                                                                   ("b", torch.float32, (3,))])
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="never written: \\['b'\\]"):
        writer.close()


def test_a_failed_write_on_the_writer_thread_raises_in_the_caller(tmp_path, monkeypatch):
    import torch

    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,)),
                                                                   ("b", torch.float32, (3,))])
    monkeypatch.setattr(safetensors_stream, "_write_into_file", fail_with(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):  # from the next `write`, or from `close`
        writer.write("a", torch.zeros(2))
        writer.write("b", torch.zeros(3))
        writer.close()


def fail_with(exc: BaseException):
    def copy_into_file(*_):
        raise exc
    return copy_into_file


def test_a_stuck_write_never_holds_up_the_exit_of_an_interrupted_process(tmp_path):
    """SIGTERM raises in the caller at any bytecode, maybe holding a lock the writer thread needs;
    interpreter exit must not wait for that thread (it joins a ThreadPoolExecutor's: a CI hang)."""
    script = f"""
import threading, torch
from dist_infer.partition import safetensors_stream
writer = safetensors_stream.StreamingSafetensorsWriter({str(tmp_path / "w.safetensors")!r}, [("a", torch.float32, (2,))])
safetensors_stream._write_into_file = lambda *_: threading.Event().wait()  # a write that never returns
writer.write("a", torch.zeros(2))
raise SystemExit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 3, proc.stderr[-2000:]


def test_abandon_drops_waiting_writes_and_ends_the_thread(tmp_path, monkeypatch):
    """An interrupted partition abandons its writers: no thread is left writing at exit, and
    what waited in the queue is never written; a stuck write still does not hold the caller."""
    import threading

    import torch

    release, written = threading.Event(), []

    def slow_write(fd, data, offset, mapped):
        release.wait(5)
        written.append(offset)

    monkeypatch.setattr(safetensors_stream, "WRITE_QUEUE", 2)
    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,)),
                                                                   ("b", torch.float32, (3,))])
    monkeypatch.setattr(safetensors_stream, "_write_into_file", slow_write)
    writer.write("a", torch.zeros(2))  # in progress on the thread
    writer.write("b", torch.zeros(3))  # waits behind it
    threading.Timer(0.2, release.set).start()  # "a" ends while abandon waits for the thread
    writer.abandon()
    assert not writer._thread.is_alive() and len(written) == 1  # "a" finished, "b" dropped
    with pytest.raises(OSError, match="abandoned"):
        writer.write("a", torch.zeros(2))


def test_the_writers_entry_is_file_entry_of_what_it_wrote(tmp_path, monkeypatch):
    """Pieces are hashed as they complete, in whatever order the tensors come: several pieces per tensor,
    several tensors per piece, the header in the first piece, a short last piece; and an empty file."""
    import torch

    monkeypatch.setattr(safetensors_stream, "PIECE_BYTES", 1000)
    tensors = {f"t{i}": torch.randn(37 * i + 1) for i in range(12)}
    path = tmp_path / "w.safetensors"
    writer = StreamingSafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for name in sorted(tensors, key=lambda n: -tensors[n].numel()):
        writer.write(name, tensors[name])
    writer.close()
    assert writer.entry() == file_entry(path, 1000) and len(writer.entry()["piece_sha256"]) > 5
    empty = StreamingSafetensorsWriter(tmp_path / "e.safetensors", [])
    empty.close()
    assert empty.entry() == file_entry(tmp_path / "e.safetensors", 1000)
