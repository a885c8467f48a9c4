"""The gloo world of env-launched ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import REPO
from serve.server import free_port

JOIN_SCRIPT = """
from dist_infer.comm.bootstrap import world_from_launch
w = world_from_launch()
print("joined", w.rank, w.size, w.all_gather_object(w.rank), flush=True)
"""


def _ranks(ranks: list[int], size: int, env: dict | None = None) -> list[subprocess.Popen]:
    base = {**os.environ, "DIST_INFER_COMM": "gloo", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(size), **(env or {})}
    return [subprocess.Popen([sys.executable, "-c", JOIN_SCRIPT], env={**base, "RANK": str(r)}, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ranks]


def test_env_launched_ranks_join_one_world():
    procs = _ranks([0, 1, 2], 3)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    assert [o[0].split()[1] for o in outs] == ["0", "1", "2"] and all("[0, 1, 2]" in o[0] for o in outs)


def test_a_rank_that_never_starts_is_named_after_the_join_timeout():
    """Ranks 0 and 1 of a world of 3 start, rank 2 never does: both give up after the join
    timeout (not gloo's silent 600 s), naming rank 2."""
    started = time.monotonic()
    procs = _ranks([0, 1], 3, {"DIST_INFER_GLOO_JOIN_TIMEOUT": "3"})
    outs = [p.communicate(timeout=60) for p in procs]
    took = time.monotonic() - started
    assert all(p.returncode != 0 for p in procs), [o[1][-2000:] for o in outs]
    err0, err1 = outs[0][1], outs[1][1]
    assert "ranks [2] of 3 never joined" in err0 and "DIST_INFER_GLOO_JOIN_TIMEOUT" in err0, err0[-2000:]
    assert "ranks [2] of 3 never joined" in err1 or "rank 0 closed the join" in err1, err1[-2000:]
    assert took < 30, took
