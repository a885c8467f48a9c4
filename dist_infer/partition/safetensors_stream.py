"""A safetensors writer that takes tensors one at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once.
The format is a little-endian u64 header length, a JSON header with each
tensor's dtype, shape and byte range, then the raw bytes. Since the partitioner
knows every shard's shape before reading any data, it writes the header first
and each tensor's bytes at its offset as the tensor streams by, on a thread beside
the caller (which reads the next tensor meanwhile).

On ext4, XFS, tmpfs and overlay, the bytes go in through a shared mapping of the file,
one 64 MiB window at a time, copied by torch on its intra-op threads. A `pwrite` holds
the file's inode lock, so one file took one core's copy into the page cache however
many threads wrote it (~1.1 GB/s on the lent H100 host); page faults take no such lock.
The file's blocks are allocated when it is created (posix_fallocate, which reserves
them on those file systems), so a full disk is an OSError there, not a SIGBUS in a page
fault later. Elsewhere (NFS, ZFS, btrfs, FUSE: no reservation, or no shared writable
mappings) the writer uses pwrite, which reports a full disk as it happens.

Files are hashed per 256 MiB piece (`file_entry`), so hashing and verifying run
on several cores: a whole-file sha256 is one core's work, ~14 s for an 8B file. The
writer hashes each piece as soon as all its bytes are in (`PieceHashes`), beside the
writes that follow, so its `entry()` needs no pass over the file afterwards.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

DTYPE_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def dtype_from_code(code: str) -> torch.dtype:
    return CODE_DTYPES[code]


WRITE_QUEUE = 1  # tensors handed to the writer thread and not yet written: peak memory grows by at most this many


class StreamingSafetensorsWriter:
    """Declare every tensor (name, dtype, shape) up front, then `write` them in any order.
    A writer thread puts each at its offset (pwrite) while the caller makes the next; `write`
    returns once at most WRITE_QUEUE tensors wait, and `close` once all are on file.

    The thread is a daemon of its own, not a ThreadPoolExecutor's: SIGTERM raises in the
    caller (interrupts.sigterm_raises) at any bytecode, possibly just after it took a lock the
    writer needs, and interpreter exit joins every executor thread, so a blocked writer then
    hung the interrupted process forever. Nothing waits for a daemon at exit."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata or {}}
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (dtype, tuple(shape), offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format wants the data 8-byte aligned
        self._data_start = 8 + len(raw)
        self._pending = set(self._layout)
        self._mapped = filesystem_type(self.path.parent) in MAPPED_WRITE_FILESYSTEMS
        self._failure: Exception | None = None
        self._hashes: PieceHashes | None = None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # RDWR: a shared mapping needs it
        try:
            _pwrite_all(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self._fd, self._data_start + offset)
            if offset and self._mapped:
                os.posix_fallocate(self._fd, self._data_start, offset)  # ENOSPC here, before any tensor
            self._hashes = PieceHashes(self.path, self._data_start + offset, PIECE_BYTES)
            self._hashes.written(0, self._data_start)
            self._slots = threading.Semaphore(WRITE_QUEUE)  # one per tensor handed over and not yet written
            self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (bytes, offset), then None to stop
            self._thread = threading.Thread(target=self._write_jobs, daemon=True, name="safetensors-write")
            self._thread.start()
        except BaseException:
            if self._hashes is not None:
                self._hashes.cancel()
            self._close_fd()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._raise_failure()  # a failed or abandoned writer says so first
        if name not in self._pending:
            raise ValueError(f"{self.path.name}: {name!r} is " + ("written already" if name in self._layout
                                                                   else "not a declared tensor"))
        dtype, shape, offset = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: declared {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()  # the job keeps it alive until written
        self._slots.acquire()  # wait for a free slot: memory holds at most WRITE_QUEUE tensors waiting
        self._raise_failure()
        self._jobs.put((data, self._data_start + offset))
        self._pending.discard(name)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._close_fd()
        try:
            self._raise_failure()
            if self._pending:
                raise ValueError(f"{self.path.name}: tensors never written: {sorted(self._pending)[:5]}")
        except BaseException:
            self._hashes.cancel()
            raise

    def entry(self) -> dict:
        """After `close`: the file's manifest entry (`file_entry`'s), from the pieces hashed while writing."""
        return self._hashes.entry()

    def abandon(self, timeout: float = 5.0) -> None:
        """An interrupted write: drop what waits, let the write in progress end, and close (a no-op
        once closed, so every writer of a failed partition can be abandoned). The
        thread is gone before the interpreter exits; a daemon still inside a write at exit can
        end the process with SIGABRT instead of its exit code (seen once under SIGTERM)."""
        if self._failure is None and self._fd is not None:
            self._failure = OSError(f"{self.path.name}: writing abandoned")  # first: the thread drops what follows
        self._hashes.cancel()  # (also after a `close` that succeeded: a partition failing at another file)
        if self._fd is None:  # closed (or abandoned) already
            return
        self._jobs.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None  # forgotten first: a close that raises has still released the number
        if fd is not None:
            os.close(fd)

    def _write_jobs(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._failure is None:  # after a failed write the rest are dropped
                    _write_into_file(self._fd, *job, self._mapped)
                    self._hashes.written(job[1], len(job[0]))
            except Exception as exc:  # disk full, I/O error (or a bug): `write` or `close` raises it, and
                if self._failure is None:  # the thread goes on releasing slots, so no caller waits forever
                    self._failure = exc
            finally:
                job = None  # drop the tensor's bytes before waiting for the next
                self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


# Bytes of the file mapped at a time: each writer's resident set grows by at most this (mapped pages count
# as resident). 64 MiB copied 1.3-3.5 GB/s on the 2-core CI VM against 1.1-1.9 for 256 MiB, alternated.
COPY_WINDOW = 64 << 20
MAPPED_WRITE_FILESYSTEMS = {"ext4", "xfs", "tmpfs", "overlay"}  # posix_fallocate reserves blocks there


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (the deepest mount above it), '' if unknown."""
    target = os.path.realpath(path)
    mounts = [p for p in psutil.disk_partitions(all=True)
              if target == p.mountpoint or target.startswith(p.mountpoint.rstrip("/") + "/")]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype if mounts else ""


def _write_into_file(fd: int, data, offset: int, mapped: bool) -> None:
    (_copy_into_file if mapped else _pwrite_all)(fd, data, offset)


def _copy_into_file(fd: int, data, offset: int) -> None:
    """All of `data` (a uint8 numpy array) into the file at `offset`, through a shared mapping of
    COPY_WINDOW bytes at a time that torch fills on its intra-op threads (the GIL released)."""
    source = torch.from_numpy(data)
    done = 0
    while done < len(source):
        start = offset + done
        base = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page
        length = min(COPY_WINDOW, len(source) - done)
        window = mmap.mmap(fd, start + length - base, offset=base)
        target = torch.frombuffer(window, dtype=torch.uint8)  # [window bytes], no copy
        try:
            target[start - base:].copy_(source[done:done + length])
        finally:
            del target  # the mapping cannot close while a tensor holds it
            window.close()
        done += length


def _pwrite_all(fd: int, data, offset: int) -> None:
    """All of `data` at `offset` (one pwrite moves at most ~2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


PIECE_BYTES = 256 << 20  # files are hashed per piece this long, so hashing and verifying run in parallel
HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: pieces hash on several cores


class FileDigest:
    """sha256 of each `piece_bytes` piece of a file, fed in order in blocks of any size."""

    def __init__(self, piece_bytes: int = PIECE_BYTES):
        self.piece_bytes, self.size = piece_bytes, 0
        self.piece, self.pieces = hashlib.sha256(), []

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            room = self.piece_bytes - self.size % self.piece_bytes
            self.piece.update(view[:room])
            self.size += min(room, len(view))
            view = view[room:]
            if self.size % self.piece_bytes == 0:
                self._close_piece()

    def _close_piece(self) -> None:
        self.pieces.append(self.piece.hexdigest())
        self.piece = hashlib.sha256()

    def entry(self) -> dict:
        """A manifest / engine.json entry: {"size", "piece_bytes", "piece_sha256"}. (Entries of older
        files hold a whole-file "sha256" instead; checkpoint.verify_file reads both.)"""
        if self.size % self.piece_bytes or not self.pieces:  # the short last piece (or an empty file's)
            self._close_piece()
        return {"size": self.size, "piece_bytes": self.piece_bytes, "piece_sha256": self.pieces}


def piece_sha256(path: Path, start: int, length: int, block: int = 4 << 20) -> str:
    """sha256 of bytes [start, start + length) of a file (fewer at its end). Small reads: up to
    HASH_THREADS of these run at once, and partition's peak memory stays bounded."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0 and (data := f.read(min(block, length))):
            digest.update(data)
            length -= len(data)
    return digest.hexdigest()


class PieceHashes:
    """The sha256 of each piece of a file written in any order: a piece is hashed on a pool thread (read
    back from the page cache) as soon as its last byte is written, beside the writes still to come.
    `written` is called from one thread (the writer's)."""

    def __init__(self, path: Path, size: int, piece_bytes: int = PIECE_BYTES):
        self.path, self.size, self.piece_bytes = path, size, piece_bytes
        starts = range(0, max(size, 1), piece_bytes)
        self._missing = [min(piece_bytes, size - start) for start in starts]  # bytes not yet written, per piece
        self._pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="piece-sha256")
        self._digests: dict[int, Future] = {}
        for piece, missing in enumerate(self._missing):
            if missing == 0:  # an empty file's one piece
                self._hash(piece)

    def written(self, start: int, length: int) -> None:
        """Bytes [start, start + length) are in the file."""
        while length > 0:
            piece = start // self.piece_bytes
            n = min(length, (piece + 1) * self.piece_bytes - start)
            self._missing[piece] -= n
            if self._missing[piece] == 0:
                self._hash(piece)
            start, length = start + n, length - n

    def _hash(self, piece: int) -> None:
        self._digests[piece] = self._pool.submit(piece_sha256, self.path, piece * self.piece_bytes, self.piece_bytes)

    def entry(self) -> dict:
        """{"size", "piece_bytes", "piece_sha256"}, as `file_entry` gives, once every byte is written."""
        try:
            unwritten = [i for i, missing in enumerate(self._missing) if missing]
            if unwritten:
                raise ValueError(f"{self.path.name}: piece {unwritten[0]} is not written whole")
            pieces = [self._digests[i].result() for i in range(len(self._missing))]
        except BaseException:  # (Ctrl-C while waiting, too): the queued hashes are dropped
            self.cancel()
            raise
        self._pool.shutdown()
        return {"size": self.size, "piece_bytes": self.piece_bytes, "piece_sha256": pieces}

    def cancel(self) -> None:
        """Drop the hashes not started (a failed or abandoned write) and wait for the running ones (file
        reads, a piece each), so no thread still has the file open afterwards."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def file_entry(path: Path, piece_bytes: int = PIECE_BYTES) -> dict:
    """FileDigest.entry() of a file on disk, its pieces hashed on HASH_THREADS threads."""
    size = path.stat().st_size
    starts = range(0, max(size, 1), piece_bytes)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        pieces = list(pool.map(lambda start: piece_sha256(path, start, piece_bytes), starts))
    return {"size": size, "piece_bytes": piece_bytes, "piece_sha256": pieces}
