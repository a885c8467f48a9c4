"""Sharded logits equal unsharded (transformers) logits at batch 2, for a
prefill step and a following decode step, through the Python worker API under
a real `mpirun`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_tiny_model, mpirun_prefix, run_cli

# float32 end to end; TP changes only the summation order (all-reduce of
# partial matmuls), so logits agree to ~1e-6. Stated tolerance:
ATOL, RTOL = 1e-4, 1e-4
TIMEOUT = 180

# 2 prompts of different lengths; scattered, out-of-order block tables (block
# size 4), sharing no block; the decode step crosses into a new block for p0.
PROMPTS = [[5, 17, 250, 3, 99, 42, 7, 188], [61, 2, 300, 11, 45]]
TABLES = [[9, 2, 6], [4, 0]]

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from dist_infer.engine.sampling import SamplingParams
    from dist_infer.workers.run import start_worker
    from dist_infer.workers.worker import SeqChunk, StepPlan

    engine_dir, out, prompts, tables = sys.argv[1], sys.argv[2], eval(sys.argv[3]), eval(sys.argv[4])
    spec, worker = start_worker(engine_dir)
    if worker.groups.world.rank == 0:
        # A delta plan: tables and sampling travel with the first step only.
        first = worker.step(StepPlan([SeqChunk(i, p, 0, t, True, SamplingParams())
                                      for i, (p, t) in enumerate(zip(prompts, tables))], return_logits=True))
        second = worker.step(StepPlan([SeqChunk(i, [tok], len(p), [])
                                       for i, (p, tok) in enumerate(zip(prompts, first.tokens))],
                                      return_logits=True))
        worker.stop()
        torch.save({"tokens": [first.tokens, second.tokens], "logits": [first.logits, second.logits],
                    "world": worker.groups.world.size}, out)
    else:
        worker.serve()
''')

CASES = [("mistral", 2, 1), ("qwen2", 4, 1), ("llama", 2, 2)]


@pytest.mark.parametrize("arch,tp,pp", CASES, ids=[f"{a}-tp{t}pp{p}" for a, t, p in CASES])
def test_sharded_logits_equal_unsharded(arch, tp, pp, tmp_path):
    model = make_tiny_model(tmp_path / "hf", arch)
    from dist_infer.partition import partition

    partition(tmp_path / "hf", tp, pp, tmp_path / "ckpt", progress=False)
    proc = run_cli("build", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine"),
                   "--kv-block-size", "4", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = tmp_path / "logits.py"
    script.write_text(SCRIPT)
    out = tmp_path / "logits.pt"
    proc = subprocess.run(mpirun_prefix(tp * pp) + [sys.executable, str(script), str(tmp_path / "engine"), str(out),
                                                    repr(PROMPTS), repr(TABLES)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    got = torch.load(out)
    assert got["world"] == tp * pp

    with torch.no_grad():
        ref1 = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in PROMPTS])
        ref2 = torch.stack([model(torch.tensor([p + [t]])).logits[0, -1]
                            for p, t in zip(PROMPTS, got["tokens"][0])])
    for step, (logits, ref) in enumerate(zip(got["logits"], (ref1, ref2))):
        assert logits.dtype == torch.float32 and logits.shape == (2, 301), (step, logits.shape)
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step}: {m}")
        # Greedy tokens are the argmax of those logits.
        assert got["tokens"][step] == ref.argmax(-1).tolist()
    # The two sequences' logits differ (no cross-talk / row mix-up would make them equal).
    assert not torch.allclose(got["logits"][0][0], got["logits"][0][1])
