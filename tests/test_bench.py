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
