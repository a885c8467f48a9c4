"""StreamingSafetensorsWriter: a failure on its writer thread reaches the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from dist_infer.partition import safetensors_stream
from dist_infer.partition.safetensors_stream import StreamingSafetensorsWriter


@pytest.mark.parametrize("error", [OSError("No space left on device"), ValueError("a bug in the write")])
def test_a_failed_write_is_raised_not_waited_on(tmp_path, monkeypatch, error):
    """Any exception on the writer thread (not only an OSError) is raised by a later `write` or by
    `close`; the thread keeps freeing queue slots, so the caller never blocks on a dead writer."""
    calls = []

    def copy_failing_second(fd, data, offset, mapped):
        calls.append(offset)
        if len(calls) == 2:
            raise error

    monkeypatch.setattr(safetensors_stream, "_write_into_file", copy_failing_second)
    specs = [(f"t{i}", torch.float32, (4,)) for i in range(6)]
    outcome = []

    def write_all():
        writer = StreamingSafetensorsWriter(tmp_path / "rank0.safetensors", specs)
        try:
            for name, _, shape in specs:
                writer.write(name, torch.zeros(shape))
            writer.close()
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write_all, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the writer's caller hung after a failed write"
    assert outcome == [error]


def test_tensors_larger_than_the_copy_window_at_unaligned_offsets(tmp_path, monkeypatch):
    """The bytes go in through mappings of COPY_WINDOW bytes that start on a page: a small window makes
    tensors span several, at offsets that are not page-aligned (after an odd-sized header and tensor)."""
    from safetensors.torch import load_file

    monkeypatch.setattr(safetensors_stream, "MAPPED_WRITE_FILESYSTEMS", {safetensors_stream.filesystem_type(tmp_path)})
    monkeypatch.setattr(safetensors_stream, "COPY_WINDOW", 5000)
    tensors = {"odd": torch.arange(3, dtype=torch.int8), "big": torch.randn(7, 3001),
               "bf16": torch.randn(4099).to(torch.bfloat16), "empty": torch.zeros(0)}
    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [(n, t.dtype, tuple(t.shape))
                                                                     for n, t in tensors.items()])
    for name in ["bf16", "empty", "big", "odd"]:  # not in file order
        writer.write(name, tensors[name])
    writer.close()
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_disk_without_room_for_the_file_fails_when_the_writer_is_made(tmp_path, monkeypatch):
    """The file's blocks are allocated up front, so a full disk is an OSError before any tensor is copied
    (a copy into a mapping of a file that cannot grow would be a SIGBUS instead), and no descriptor leaks."""
    import errno
    import os

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_stream, "MAPPED_WRITE_FILESYSTEMS", {safetensors_stream.filesystem_type(tmp_path)})
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="No space left"):
        StreamingSafetensorsWriter(tmp_path / "w.safetensors", [("a", torch.float32, (1024,))])
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert [f for f in open_files if f.startswith(str(tmp_path))] == [], "the rank file is still open"


def test_file_systems_that_may_not_reserve_blocks_are_written_with_pwrite(tmp_path, monkeypatch):
    """Off ext4/XFS/tmpfs/overlay (NFS, ZFS, btrfs, FUSE), posix_fallocate may not reserve the blocks (a copy
    into a mapping would meet a full disk as a SIGBUS) or shared mappings may not work: pwrite, as before."""
    import os

    def must_not_run(*_):
        raise AssertionError("the mapped path ran on a file system without block reservation")

    assert safetensors_stream.filesystem_type(tmp_path)  # the mount table knows this directory
    monkeypatch.setattr(safetensors_stream, "MAPPED_WRITE_FILESYSTEMS", set())
    monkeypatch.setattr(safetensors_stream, "_copy_into_file", must_not_run)
    monkeypatch.setattr(os, "posix_fallocate", must_not_run)
    tensors = {"a": torch.randn(1000), "b": torch.arange(7)}
    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [(n, t.dtype, tuple(t.shape))
                                                                     for n, t in tensors.items()])
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    from safetensors.torch import load_file
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_tensor_written_twice_or_undeclared_is_refused(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,))])
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' is written already"):
        writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'b' is not a declared tensor"):
        writer.write("b", torch.zeros(2))
    writer.close()
    assert writer.entry()["size"] == (tmp_path / "w.safetensors").stat().st_size


def test_a_close_that_fails_still_lets_abandon_end_the_writer(tmp_path, monkeypatch):
    """A file system may report a deferred write error at close (NFS, FUSE); the descriptor is released
    either way, so abandoning the writer afterwards neither closes a reused number nor raises."""
    import errno
    import os

    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,))])
    writer.write("a", torch.zeros(2))
    real_close = os.close

    def deferred_error(fd):
        real_close(fd)
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "close", deferred_error)
    with pytest.raises(OSError, match="quota"):
        writer.close()
    monkeypatch.setattr(os, "close", real_close)
    writer.abandon()
    assert not writer._thread.is_alive()
