"""A rank's step kernels are compiled on threads before its first step (engine/kernel_compile.py):
with an empty kernel cache, every Triton compile of a load happens on a compile thread, none on
the loading thread, and a step after the load compiles nothing. The engine's tokens with the
threaded compile are tests/engine/test_gpu.py's (same load path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LOAD_AND_COUNT = r"""
import json, sys, threading
import torch
from triton import knobs
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.workers.llm_engine import LLMEngine, Request
from dist_infer.workers.worker import RankWorker

compiles = []
knobs.runtime.jit_post_compile_hook = lambda **kw: compiles.append(threading.current_thread().name)
spec = EngineSpec.read(sys.argv[1])
groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
engine = load_rank_engine(spec, groups, "cuda:0")
at_load = list(compiles)
llm = LLMEngine(RankWorker(engine, groups), spec)
for i, prompt in enumerate([list(range(3, 40)), [5, 6, 7]]):
    llm.add_request(str(i), Request(prompt, 8, ignore_eos=True))
tokens = {}
while llm.has_unfinished():
    for o in llm.step():
        tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
print(json.dumps({"at_load": at_load, "after": compiles[len(at_load):], "tokens": list(tokens.values())}))
engine.close()
"""


def test_every_compile_of_a_cold_load_runs_on_a_compile_thread(tmp_path):
    from dist_infer.config import BuildConfig
    from dist_infer.engine.random_engine import build_random_engine

    engine = build_random_engine("tiny-llama", tmp_path / "e", build=BuildConfig(dtype="bfloat16", max_batch_size=8,
                                 max_seq_len=256), with_tokenizer=False, device="cpu")
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_COUNT, str(engine)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "tc")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["at_load"]) >= 5, report  # norms, RoPE + KV write, attention kernels...
    assert all(name.startswith("compile") for name in report["at_load"]), report["at_load"]
    assert report["after"] == [], "a step compiled a kernel the load did not"
    assert all(len(t) == 8 for t in report["tokens"])
