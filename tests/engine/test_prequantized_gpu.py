"""Pre-quantized checkpoints (AWQ INT4, compressed-tensors FP8) on the GPU: partition, build and
`run --device cuda` (the Triton INT4 kernel, FP8 GEMV / _scaled_mm, CUDA graphs) give the greedy
tokens of transformers holding the checkpoint's dequantized weights, except at near-ties of that
float32 reference: 0.1 for INT4 (test_gpu.LOGIT_TOLERANCE: fp16 rounding), 0.5 for FP8, whose
prefill steps also round every linear's input to e4m3 (3 mantissa bits: up to 6 % per element;
measured on the H100: a 0.34 margin at one position, on logits of ~3.4).
The CPU side of the same formats is tests/partition/test_prequantized.py."""

from __future__ import annotations

import pytest
import torch

from conftest import completions, hf_greedy, run_cli, write_prompts
from engine.test_gpu import NCCL_ENV
from partition.test_prequantized import (awq_config, awq_tensors, compressed_tensors_config, fp8_tensors, int4_linear,
                                         tiny_model, write_checkpoint)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[5, 17, 33, 2, 99, 100, 7], [8, 9, 10], list(range(40, 75))]
FORMATS = {  # name -> (quantize_linear, quantization_config, engine dtype, logit margin allowed at a difference)
    "awq-g32": (int4_linear(awq_tensors, 32), awq_config(32), "float16", 0.1),
    "fp8-compressed-tensors": (lambda w: fp8_tensors(w, per_channel=True), compressed_tensors_config(), "bfloat16",
                               0.5),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_prequantized_engine_answers_on_the_gpu(tmp_path, name):
    quantize_linear, config, dtype, margin_allowed = FORMATS[name]
    if name.startswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    model = tiny_model("llama")
    weights = write_checkpoint(tmp_path / "hf", model, quantize_linear, config)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)  # the dequantized model
    assert run_cli("partition", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                   "--quiet").returncode == 0
    proc = run_cli("build", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine"), "--dtype",
                   dtype, "--max-batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", "--engine", str(tmp_path / "engine"), "--prompts-file",
                   str(write_prompts(tmp_path / "p.jsonl", PROMPTS)), "--json", "--ignore-eos", "--max-new-tokens",
                   "24", "--device", "cuda", env=NCCL_ENV, timeout=300)
    got = [c["output_ids"] for c in completions(proc)]
    assert [len(t) for t in got] == [24] * len(PROMPTS)
    for prompt, ids in zip(PROMPTS, got):
        ref = hf_greedy(model, prompt, 24)
        k = next((i for i, (a, b) in enumerate(zip(ref, ids)) if a != b), None)
        if k is not None:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ref[:k]])).logits[0, -1]
            assert (logits[ref[k]] - logits[ids[k]]).abs().item() < margin_allowed, (name, prompt, k)
