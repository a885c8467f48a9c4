"""`dist-infer refit`: new weights of the same architecture into a built engine.

An engine built from checkpoint A and refitted with checkpoint B (same architecture, other random
weights) holds the very files an engine built from B has, and `run` under mpirun at TP=2 answers
with B's greedy tokens (transformers' reference). Bad checkpoints and non-engines exit 2 with one
line, leaving the engine byte-identical and no staging directory behind; so does a SIGTERM mid-refit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, build_in_process, completions, hf_greedy, make_tiny_model, run_cli, write_prompts
from dist_infer.cli import main
from dist_infer.engine.runtime import EngineSpec

TP = 2
PROMPTS = [[5, 17, 42, 7], [100, 3, 250, 9, 11, 64, 2]]
NEW_TOKENS = 8
BUILD = ("--max-batch-size", "4", "--max-seq-len", "64", "--kv-block-size", "4")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """HF checkpoints A and B (same tiny Llama config, different random weights), A's engine at
    TP=2, and B's engine built directly (the reference a refit must reproduce)."""
    from dist_infer.partition import partition

    root = tmp_path_factory.mktemp("refit")
    model_a = make_tiny_model(root / "A", "llama", seed=0)
    model_b = make_tiny_model(root / "B", "llama", seed=1)
    engines = {}
    for name in ("A", "B"):
        partition(root / name, TP, 1, root / f"ckpt-{name}", progress=False)
        engines[name] = build_in_process(root / f"ckpt-{name}", root / f"engine-{name}", *BUILD)
    return root, model_a, model_b, engines


def engine_copy(models, name: str) -> Path:
    root, _, _, engines = models
    out = root / f"work-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(engines["A"], out)
    return out


def digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def staging_left(engine: Path) -> list[Path]:
    return list(engine.parent.glob(f".{engine.name}.tmp-*"))


def test_refit_equals_an_engine_built_from_the_new_checkpoint(models, tmp_path, capsys):
    root, model_a, model_b, engines = models
    engine = engine_copy(models, "ok")
    (engine / "keep.txt").write_text("files other than the weights stay as they are")
    before = EngineSpec.read(engine)

    assert main(["refit", "--engine", str(engine), "--checkpoint", str(root / "B"), "--quiet"]) == 0
    assert "refitted" in capsys.readouterr().out
    after = EngineSpec.read(engine)
    for rank in range(TP):  # the same bytes as B's own build: same partition and build code
        name = f"rank{rank}/weights.safetensors"
        assert (engine / name).read_bytes() == (engines["B"] / name).read_bytes()
        assert after.files[name] == EngineSpec.read(engines["B"]).files[name]
    assert after.weights_id == EngineSpec.read(engines["B"]).weights_id != before.weights_id
    assert (after.model, after.mapping, after.build) == (before.model, before.mapping, before.build)
    assert (engine / "keep.txt").read_text().startswith("files other")
    assert json.loads((engine / "engine.json").read_text())["refit"]["checkpoint"] == str((root / "B").resolve())
    assert not staging_left(engine)

    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out = completions(run_cli("run", "--engine", str(engine), "--prompts-file", str(prompts), "--json",
                              "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", world=TP))
    got = [c["output_ids"] for c in out]
    assert got == [hf_greedy(model_b, p, NEW_TOKENS) for p in PROMPTS]
    assert got != [hf_greedy(model_a, p, NEW_TOKENS) for p in PROMPTS]  # the weights did change


def _without_tensor(src: Path, out: Path, drop: str) -> Path:
    shutil.copytree(src, out)
    [weights] = list(out.glob("*.safetensors"))
    tensors = load_file(weights)
    del tensors[drop]
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def _reshaped_tensor(src: Path, out: Path, name: str) -> Path:
    shutil.copytree(src, out)
    [weights] = list(out.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] // 2)
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


BAD = {
    "other architecture": (lambda root, tmp: (make_tiny_model(tmp / "C", "llama", num_hidden_layers=2), tmp / "C")[1],
                           "num_layers"),
    "missing tensor": (lambda root, tmp: _without_tensor(root / "B", tmp / "C", "model.layers.1.mlp.up_proj.weight"),
                       "lacks 1 weights"),
    "wrong shape": (lambda root, tmp: _reshaped_tensor(root / "B", tmp / "C", "model.layers.0.mlp.up_proj.weight"),
                    "does not have the shape its config.json implies"),
    "not a checkpoint": (lambda root, tmp: (tmp / "C").mkdir() or tmp / "C", "C"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_checkpoint_exits_2_and_leaves_the_engine_untouched(models, tmp_path, capfd, case):
    make, expected = BAD[case]
    checkpoint = make(models[0], tmp_path)
    engine = engine_copy(models, "bad")
    before = digests(engine)
    assert main(["refit", "--engine", str(engine), "--checkpoint", str(checkpoint), "--quiet"]) == 2
    err = capfd.readouterr().err
    errors = error_lines(err)
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert digests(engine) == before
    assert not staging_left(engine)


def test_other_architecture_names_the_fields_and_the_fix(models, tmp_path, capfd):
    make_tiny_model(tmp_path / "C", "llama", hidden_size=32, intermediate_size=64)
    engine = engine_copy(models, "arch")
    assert main(["refit", "--engine", str(engine), "--checkpoint", str(tmp_path / "C"), "--quiet"]) == 2
    [error] = error_lines(capfd.readouterr().err)
    assert "hidden_size: engine 64, checkpoint 32" in error and "intermediate_size" in error
    assert "build a new engine" in error


def test_a_directory_that_is_not_an_engine_exits_2(models, capfd):
    root = models[0]
    before = digests(root / "ckpt-A")
    assert main(["refit", "--engine", str(root / "ckpt-A"), "--checkpoint", str(root / "B"), "--quiet"]) == 2
    [error] = error_lines(capfd.readouterr().err)
    assert "is not a dist_infer engine" in error
    assert digests(root / "ckpt-A") == before


def test_sigterm_mid_refit_leaves_the_engine_untouched(models):
    """The CLI as its own process, slowed down inside partition, terminated there: exit 143, the
    engine byte-identical, the staging directory gone."""
    root = models[0]
    engine = engine_copy(models, "term")
    before = digests(engine)
    cmd = [sys.executable, "-m", "dist_infer", "refit", "--engine", str(engine), "--checkpoint", str(root / "B"),
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DIST_INFER_TEST_SLOW_S": "0.3"})
    deadline = time.monotonic() + 60
    while not staging_left(engine) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert staging_left(engine), f"no staging directory appeared: {proc.communicate()}"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert digests(engine) == before
    assert not staging_left(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_update_weights_reaches_the_cuda_graphs(tmp_path):
    """One GPU, bf16, decode and mixed-step graphs captured on A's weights: after
    LLMEngine.update_weights(refitted engine) the graphs' steps give exactly the tokens of an
    engine loaded from B (the copy into the captured parameters is what the graphs read)."""
    from dist_infer.comm import LocalCommunicator, ParallelGroups
    from dist_infer.engine.refit import refit
    from dist_infer.engine.runtime import load_rank_engine
    from dist_infer.partition import partition
    from dist_infer.workers.llm_engine import LLMEngine, Request
    from dist_infer.workers.worker import RankWorker

    engines = {}
    for name, seed in (("A", 0), ("B", 1)):
        make_tiny_model(tmp_path / name, "llama", seed=seed)
        partition(tmp_path / name, 1, 1, tmp_path / f"ckpt-{name}", progress=False)
        engines[name] = build_in_process(tmp_path / f"ckpt-{name}", tmp_path / f"engine-{name}", "--dtype", "bfloat16",
                                         *BUILD)
    shutil.copytree(engines["A"], tmp_path / "refitted")
    refit(tmp_path / "refitted", tmp_path / "B")
    requests = [Request(p, NEW_TOKENS, ignore_eos=True) for p in PROMPTS]

    def loaded(name: str):
        spec = EngineSpec.read(engines[name])
        groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
        engine = load_rank_engine(spec, groups, "cuda:0")
        assert engine.graphs
        return engine, LLMEngine(RankWorker(engine, groups), spec)

    def greedy(llm) -> list[list[int]]:
        return [c.output_ids for c in llm.generate(requests)]

    engine_b, llm_b = loaded("B")
    want_b = greedy(llm_b)
    engine_b.close()
    engine, llm = loaded("A")
    want_a = greedy(llm)
    pointers = [p.data_ptr() for p in engine.model.parameters()]
    done = llm.update_weights(tmp_path / "refitted")
    assert done.weights_id == EngineSpec.read(engines["B"]).weights_id
    assert [p.data_ptr() for p in engine.model.parameters()] == pointers  # in place: the graphs' addresses
    assert greedy(llm) == want_b != want_a
    engine.close()
