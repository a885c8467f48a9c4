"""Host <-> device copies that never make the host wait for the device.

A plain `torch.tensor(values).to(cuda)` (or indexing a CUDA tensor with a Python list) copies
from pageable memory and synchronizes the stream: the host waits for every step queued before
it. With async scheduling (workers/llm_engine.py) the next step is queued behind the running
one, so such a copy would stall the host for a whole step. These go through pinned memory.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A 1-D tensor of `values` on `device`, copied without waiting for the device."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host_async(x: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a CUDA tensor, queued on the stream: valid once an event recorded
    after it has completed (see ready_event)."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


def ready_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after everything queued so far on the device's stream (None on a CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
