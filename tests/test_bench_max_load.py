"""bench's max-load mode (`--num-requests`): every request submitted at once through the real
LLMEngine, here on a one-rank CPU engine (the GPU figures are in docs/PERFORMANCE.md); and
`--output-json`, the figures for dashboards."""

from __future__ import annotations

import pytest

import json

from dist_infer.bench import (BenchReport, MaxLoad, MaxLoadResult, check_max_load, check_output_json, max_load_fields,
                              max_load_requests, run_max_load)
from dist_infer.cli import main
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig
from dist_infer.engine.random_engine import build_random_engine
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.errors import LaunchError
from dist_infer.workers.llm_engine import EngineOptions, LLMEngine
from dist_infer.workers.worker import RankWorker


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    out = tmp_path_factory.mktemp("max-load") / "engine"
    build_random_engine("tiny-llama", out, build=BuildConfig(dtype="float32", max_batch_size=8, max_seq_len=32,
                                                             kv_block_size=4), with_tokenizer=False, device="cpu")
    spec = EngineSpec.read(out)
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    engine = LLMEngine(RankWorker(load_rank_engine(spec, groups, "cpu"), groups), spec,
                       options=EngineOptions(64, False, max_num_seqs=3))
    yield engine
    engine.shutdown()


def test_every_request_runs_to_its_length_with_the_batch_capped(llm):
    requests = max_load_requests(10, input_len=6, output_len=5, vocab_size=llm.spec.model.vocab_size)
    running = []
    step = llm.step
    llm.step = lambda: (running.append(len(llm.scheduler.running)), step())[1]
    try:
        result = run_max_load(llm, requests)
    finally:
        del llm.step
    assert (result.num_requests, result.max_batch, result.output_tokens) == (10, 3, 50)
    assert max(running) == 3  # the batch filled up to --max-batch-size and no further
    assert len(result.ttft_s) == 10 and all(0 < t <= result.wall_s for t in result.ttft_s)
    assert result.steps >= 10 * 5 // 3  # decode steps of at most 3 sequences each


def test_random_prompts_are_reproducible_and_distinct():
    a, b = max_load_requests(4, 8, 2, 100), max_load_requests(4, 8, 2, 100)
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    assert len({tuple(r.prompt_ids) for r in a}) == 4 and all(r.ignore_eos and r.max_new_tokens == 2 for r in a)


def test_benchmark_line_fields():
    fields = max_load_fields(MaxLoadResult(num_requests=4, max_batch=2, wall_s=2.0, output_tokens=512,
                                           ttft_s=[0.1, 0.2, 0.3, 1.0], steps=70))
    assert fields["tokens_per_sec"] == "256.00" and fields["requests_per_sec"] == "2.000"
    assert fields["ttft_p50(ms)"] == "250.0" and fields["ttft_p99(ms)"] == "979.0"  # interpolated, inclusive


def test_batch_above_the_engine_is_refused_with_the_fix():
    check_max_load(MaxLoad(100, 64), 64)
    check_max_load(None, 8)
    with pytest.raises(LaunchError, match="--max-batch-size 1024"):
        check_max_load(MaxLoad(100, 1024), 512)


@pytest.mark.parametrize("args, message", [
    (["--max-batch-size", "4"], "add --num-requests"),
    (["--num-requests", "8", "--baseline", "hf"], "drop it with --num-requests"),
])
def test_bad_combinations_exit_2_before_loading(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_zero_requests_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--num-requests", "0"])
    assert exc.value.code == 2 and "--num-requests" in capsys.readouterr().err


def test_report_prints_each_line_and_writes_the_same_figures_as_json(tmp_path, capsys):
    report = BenchReport(tmp_path / "bench.json")
    report.emit({"model_name": "llama-3-8b", "batch_size": 64, **max_load_fields(
        MaxLoadResult(num_requests=4, max_batch=2, wall_s=2.0, output_tokens=512, ttft_s=[0.1, 0.2], steps=70))})
    report.emit({"model_name": "x", "tokens_per_sec": "1.50"})
    report.save()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[BENCHMARK] model_name llama-3-8b batch_size 64 num_requests 4")
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert rows[0]["tokens_per_sec"] == 256.0 and rows[0]["num_requests"] == 4 and rows[0]["model_name"] == "llama-3-8b"
    assert rows[1] == {"model_name": "x", "tokens_per_sec": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temp file left


def test_unwritable_output_json_is_refused_before_loading(tmp_path, capsys):
    check_output_json(None)
    check_output_json(tmp_path / "ok.json")
    with pytest.raises(LaunchError, match="is a directory"):
        check_output_json(tmp_path)
    assert main(["bench", "--output-json", str(tmp_path / "missing" / "b.json")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err


def test_an_engine_made_in_memory_runs(llm):
    """bench's random-weight presets build the engine in memory: its spec has no directory (so no
    generation_config.json to read EOS ids from). That once crashed `bench --model` before any step."""
    import dataclasses

    in_memory = LLMEngine(llm.worker, dataclasses.replace(llm.spec, directory=None),
                          options=EngineOptions(64, False, max_num_seqs=3))
    request = max_load_requests(1, input_len=4, output_len=3, vocab_size=llm.spec.model.vocab_size)
    assert len(in_memory.generate(request)[0].output_ids) == 3
