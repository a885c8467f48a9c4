"""GPT-2 (dist_infer/models/gpt2.py): greedy tokens equal transformers' at TP x PP in {1, 2}^2,
batch 3, in process; once under a real mpirun at TP=2 x PP=2."""

from __future__ import annotations

import pytest
import transformers

from models.runner import LAYOUTS, VOCAB, greedy_in_process, greedy_under_mpirun, reference



@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                                     bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    return reference(root, transformers.GPT2LMHeadModel, config)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_gpt2_greedy_matches_transformers(gpt2, tp, pp):
    assert greedy_in_process(gpt2, tp, pp) == gpt2[2]


def test_gpt2_config_and_weights(gpt2):
    from dist_infer.config import ModelConfig

    cfg = ModelConfig.from_hf(gpt2[1].config)
    assert (cfg.norm, cfg.activation, cfg.position_embedding, cfg.gated_mlp) == ("layer", "gelu_tanh", "learned", False)
    assert cfg.tie_word_embeddings and cfg.qkv_bias and cfg.rope_inv_freq == ()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_gpt2_under_mpirun(gpt2, tmp_path):
    assert greedy_under_mpirun(gpt2, tmp_path) == gpt2[2]


def test_a_prequantized_gpt2_is_refused_naming_the_families_that_read_one(gpt2, tmp_path):
    """GPT-2 declares no quantizable linears: a pre-quantized copy is refused for what it is
    (not as "a quantized LM head"), with the families that read one and the unquantized route."""
    import json
    import shutil

    from dist_infer.errors import CheckpointError
    from dist_infer.partition import partition
    from partition.test_prequantized import compressed_tensors_config

    source = tmp_path / "gpt2-fp8"
    shutil.copytree(gpt2[0] / "hf", source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = compressed_tensors_config()
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as exc:
        partition(source, 1, 1, tmp_path / "ckpt", progress=False)
    msg = str(exc.value)
    assert "pre-quantized" in msg and "gpt2 family reads unquantized weights only" in msg, msg
    assert "llama" in msg and "--quant" in msg and not (tmp_path / "ckpt").exists()
