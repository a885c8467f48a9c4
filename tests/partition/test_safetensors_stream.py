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

    def pwrite_failing_second(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise error

    monkeypatch.setattr(safetensors_stream, "_pwrite_all", pwrite_failing_second)
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
