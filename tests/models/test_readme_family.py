"""The README's worked example of the model API ("Model families"): its `my_family.py` block is
written out as is and registered; a checkpoint in its layout is made from a transformers GPT-2's
tensors (Conv1D weights transposed to [out, in], c_attn kept fused as `qkv`), and its greedy
tokens must equal GPT-2's: in process at TP=2 x PP=2, and through the README's own shell
commands (partition, build, `mpirun -n 4 dist-infer run`), run literally."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file

from conftest import REPO, mpirun_prefix
from dist_infer.models import register
from models.runner import VOCAB, InProcessEngine, build_engine, hf_greedy, prompts, widen

MARKER = "<!-- readme-family-example -->"


def readme_blocks() -> tuple[str, str]:
    """(the python block after the marker, the first bash block after it)."""
    text = (REPO / "README.md").read_text().split(MARKER, 1)[1]
    python = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return python, bash


def tinygpt_checkpoint(directory, gpt2) -> None:
    sd, n = gpt2.state_dict(), gpt2.config.n_layer
    state = {"tok.weight": sd["transformer.wte.weight"], "pos.weight": sd["transformer.wpe.weight"],
             "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    names = {"norm1": "ln_1", "qkv": "attn.c_attn", "proj": "attn.c_proj", "norm2": "ln_2", "fc1": "mlp.c_fc",
             "fc2": "mlp.c_proj"}
    for i in range(n):
        for ours, theirs in names.items():
            w = sd[f"transformer.h.{i}.{theirs}.weight"]
            state[f"blocks.{i}.{ours}.weight"] = w.t() if w.ndim == 2 else w  # Conv1D [in, out] -> [out, in]
            state[f"blocks.{i}.{ours}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    directory.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"model_type": "tinygpt", "vocab": VOCAB, "dim": 64,
                                                       "layers": 4, "heads": 4, "context": 256}))


@pytest.fixture(scope="module")
def tinygpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinygpt")
    python, _ = readme_blocks()
    (root / "my_family.py").write_text(python)
    sys.path.insert(0, str(root))
    register("tinygpt", "my_family")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                                     bos_token_id=None, eos_token_id=None)
    transformers.set_seed(1)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    widen(gpt2)
    tinygpt_checkpoint(root / "tinygpt", gpt2)
    yield root, gpt2
    sys.path.remove(str(root))


def test_readme_family_in_process(tinygpt):
    root, gpt2 = tinygpt
    batch = prompts()
    engine = build_engine(root / "tinygpt", 2, 2, root)
    assert InProcessEngine(engine).greedy(batch, 10) == [hf_greedy(gpt2, p, 10) for p in batch]


def test_readme_family_commands(tinygpt):
    root, gpt2 = tinygpt
    _, bash = readme_blocks()
    # As root on 2 cores the README says to add --allow-run-as-root --oversubscribe: an `mpirun`
    # first on PATH adds them (conftest's prefix) and runs the real one.
    wrapper = root / "bin" / "mpirun"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(mpirun_prefix(0)[:-2]) + ' "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{wrapper.parent}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-ec", bash], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [c["output_ids"] for c in outs] == [hf_greedy(gpt2, [5, 17, 250], 8)]
