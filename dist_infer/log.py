"""Rank-prefixed logging: every line a rank writes says which rank wrote it."""

from __future__ import annotations

import logging
import os
import sys

# Rank variables set by the launchers we support, before any communicator exists.
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "RANK")


def launch_rank() -> int:
    for var in RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def setup_logging(level: str | int = "INFO", rank: int | None = None) -> None:
    rank = launch_rank() if rank is None else rank
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
