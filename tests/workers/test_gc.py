"""The step loop and Python's garbage collector (workers/run.prepare_gc_for_steps): at max load
the loop makes and frees several tracked objects per sequence per step, which under Python's
default thresholds ran collections every few steps. Each case runs in a fresh interpreter, since
the collector's settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOOP = r"""
import gc, json, sys
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig
from dist_infer.engine.random_engine import build_random_engine
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.workers.llm_engine import LLMEngine, Request
from dist_infer.workers.run import prepare_gc_for_steps
from dist_infer.workers.worker import RankWorker

out, prepared = sys.argv[1], sys.argv[2] == "prepared"
build_random_engine("tiny-llama", out, build=BuildConfig(dtype="float32", max_batch_size=128, max_seq_len=64,
                                                         kv_block_size=4), with_tokenizer=False, device="cpu")
spec = EngineSpec.read(out)
groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
llm = LLMEngine(RankWorker(load_rank_engine(spec, groups, "cpu"), groups), spec)
if prepared:
    prepare_gc_for_steps()
collections = []
gc.callbacks.append(lambda phase, info: phase == "stop" and collections.append(info["generation"]))
done = llm.generate([Request([3 + i % 50, 7, 9], 32, ignore_eos=True) for i in range(128)])
print(json.dumps({"collections": collections, "tokens": sum(len(c.output_ids) for c in done)}))
"""


def _collections(tmp_path: Path, mode: str) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", LOOP, str(tmp_path / mode), mode], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 128 * 32
    return result["collections"]


def test_step_loop_runs_no_collection_once_prepared(tmp_path):
    # The same loop under the default thresholds collects again and again (what the setting removes).
    assert len(_collections(tmp_path, "default")) >= 8
    assert _collections(tmp_path, "prepared") == []
