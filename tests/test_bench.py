"""bench's transformers baseline beside a built engine (the GPU runs are on the device;
what is checked here is which model the baseline builds and how the line is computed)."""

from __future__ import annotations

import json

import pytest

from dist_infer.bench import HFResult, engine_hf_config, hf_fields
from dist_infer.config import BuildConfig
from dist_infer.engine.random_engine import build_random_engine
from dist_infer.errors import LaunchError
from dist_infer.presets import PRESETS


def test_baseline_of_a_random_engine_is_its_preset_at_its_vocabulary(tmp_path):
    engine = build_random_engine("tiny-llama", tmp_path / "e", build=BuildConfig(dtype="float32", max_seq_len=64),
                                 vocab_size=300, with_tokenizer=False, device="cpu")
    cfg = engine_hf_config(engine, 300)
    preset = PRESETS["tiny-llama"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == \
        (300, preset["hidden_size"], preset["num_hidden_layers"], preset["num_key_value_heads"])


def test_baseline_refuses_an_engine_built_from_a_checkpoint(tmp_path):
    engine = build_random_engine("tiny-llama", tmp_path / "e", build=BuildConfig(dtype="float32", max_seq_len=64),
                                 with_tokenizer=False, device="cpu")
    meta = json.loads((engine / "engine.json").read_text())
    meta.pop("random_weights")
    (engine / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(LaunchError, match="--random-weights"):
        engine_hf_config(engine, 512)


def test_benchmark_line_reports_the_reductions_against_transformers():
    fields = hf_fields(HFResult(tokens_per_sec=40.0, latency_s=2.0, peak_gb=16.0), tokens_per_sec=200.0,
                       latency_s=0.25, peak_gb=8.8)
    assert fields["speedup_vs_hf"] == "5.00" and fields["hf_latency(ms)"] == "2000.00"
    assert fields["latency_reduction_vs_hf"] == "0.875" and fields["peak_mem_reduction_vs_hf"] == "0.450"


@pytest.mark.parametrize("quant", [None, "fp8", "int8_wo", "int4_wo"])
def test_random_weights_of_every_mode_spread_like_dense_ones(quant):
    """bench/profile random weights: a quantized layer's codes and scales make weights ~(0, 0.02),
    as dense ones, so the activations of a quantized random model stay realistic."""
    import torch

    from dist_infer.bench import preset_config, random_rank_weights
    from dist_infer.comm import LocalCommunicator, ParallelGroups
    from dist_infer.config import Mapping, ModelConfig
    from dist_infer.engine import quant as q
    from dist_infer.engine.model import StageModel

    cfg = ModelConfig.from_hf(preset_config("tiny-llama"))
    build = BuildConfig(dtype="float32", max_batch_size=2, max_seq_len=64, quant=quant, quant_group_size=32)
    groups = ParallelGroups.build(LocalCommunicator(), Mapping(), "cpu")
    with torch.device("meta"):
        model = StageModel(cfg, groups.mapping, groups.tp, cfg.vocab_size, torch.float32, build.quant_config)
    w = random_rank_weights(model, torch.device("cpu"), seed=0)
    assert set(w) == {n for n, _ in model.named_parameters()} - ({"lm_head.weight"} if model.ties_lm_head else set())
    p = "layers.0.mlp.down_proj."
    dense = {None: lambda: w[p + "weight"], "fp8": lambda: q.dequantize_fp8(w[p + "qweight"], w[p + "scales"]),
             "int8_wo": lambda: q.dequantize_int8(w[p + "qweight"], w[p + "scales"]),
             "int4_wo": lambda: q.dequantize_int4(w[p + "qweight"], w[p + "scales"], w[p + "offsets"])}[quant]()
    assert abs(dense.float().mean().item()) < 2e-3 and 0.018 < dense.float().std().item() < 0.022
