"""The soak of issue #11 in CI: 60 s of 64 concurrent streams against `mpirun -n 2 dist-infer serve`
(the tiny TP=2 Llama that test_scheduling and test_restart also serve), every check of
scripts/soak.py (whose code this shares: tests/serve/soak.py). The 10-minute SmolLM2 TP=3 soak stays a script: on the
2-core CI machine SmolLM2 finishes ~1.4 requests/s against 64 streams (p99 ~55 s), so 60 s of it
would check one latency window of a few dozen answers; the tiny engine answers hundreds per
window through the same server, scheduler, sockets and ranks."""

from __future__ import annotations

import json
import random

import pytest

from .conftest import VOCAB
from .server import Server
from .soak import MODEL, run_soak

pytestmark = pytest.mark.timeout(400)
STREAMS, WARMUP_S, DURATION_S, WINDOW_S = 64, 12.0, 48.0, 12.0  # 60 s of load, 4 latency windows


def _prompts(n: int = 8, seed: int = 11) -> list[tuple[list[int], int]]:
    """Token-id prompts (ids past SmolLM2's special tokens) with different answer lengths; short
    answers, so that many requests come and go (each allocates and frees KV blocks) in 60 s."""
    rng = random.Random(seed)
    return [([rng.randrange(17, VOCAB) for _ in range(rng.randrange(4, 30))], rng.randrange(4, 24)) for _ in range(n)]


def test_soak_60s_no_lost_or_crossed_answers_no_growth_stable_p99(tiny, tmp_path):
    engine, _ = tiny
    srv = Server(engine(2, 1), 2, "--served-model-name", MODEL).wait_healthy()
    try:
        summary = run_soak(srv.url, srv.proc.pid, _prompts(), STREAMS, WARMUP_S, DURATION_S, WINDOW_S)
    finally:
        srv.kill()
    brief = {k: v for k, v in summary.items() if not k.startswith("resources")}
    print(json.dumps(brief))
    assert summary["problems"] == [], json.dumps(summary, indent=1)
    assert summary["wrong"] == 0 and summary["kv_usage_after"] == 0
    assert summary["requests"] >= 2 * STREAMS, brief  # answers enough to fill the windows, every one checked
    assert len(summary["p99_latency_s_per_window"]) >= 4
    assert len(summary["resources_before"]) == 3  # 2 ranks + the front-end, each compared
