"""The custom all-reduce's CPU-side decisions: which TP groups may use IPC buffers, the
switch that keeps NCCL, and the kernel names the wrapper launches. The kernel itself is
tested against NCCL on 2 GPUs (test_custom_all_reduce_gpu.py)."""

from __future__ import annotations

import re

import pytest

from dist_infer.comm import custom_all_reduce as car


def test_ranks_on_two_hosts_stay_on_nccl():
    assert car.reason_unusable([("a", 0), ("b", 0)], 0) == "its ranks are on more than one host"


def test_more_ranks_than_the_kernel_takes_stay_on_nccl():
    peers = [("a", 0)] * (car.MAX_RANKS + 1)
    assert car.reason_unusable(peers, 0) == f"{car.MAX_RANKS + 1} ranks (the kernel takes at most {car.MAX_RANKS})"


def test_ranks_sharing_one_gpu_need_no_peer_access():
    assert car.reason_unusable([("a", 0), ("a", 0)], 1) is None


@pytest.mark.parametrize("value,wanted", [(None, True), ("1", True), ("0", False)])
def test_switch(monkeypatch, value, wanted):
    if value is None:
        monkeypatch.delenv(car.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(car.ENV_SWITCH, value)
    assert car.wanted() is wanted


def test_threshold_setting(monkeypatch):
    monkeypatch.delenv(f"{car.ENV_SWITCH}_MAX_BYTES", raising=False)
    assert car.max_bytes_setting() == 4 * 2**20
    monkeypatch.setenv(f"{car.ENV_SWITCH}_MAX_BYTES", "65536")
    assert car.max_bytes_setting() == 65536


def test_kernel_source_defines_what_the_wrapper_launches():
    source = car.KERNEL_SOURCE.read_text()
    defined = set(re.findall(r"^ONE_SHOT\((\w+),", source, re.M))
    assert defined == set(car.KERNELS.values())
    assert f"#define MAX_RANKS {car.MAX_RANKS}" in source and f"#define MAX_BLOCKS {car.MAX_BLOCKS}" in source
    assert "multimem" not in source and "Multicast" not in source  # NVLink multicast stays off
