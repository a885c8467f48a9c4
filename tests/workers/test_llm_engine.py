"""LLMEngine in one process (a one-rank engine, no launcher): the step-wise API,
abort, and a failing request that must not take the others down."""

from __future__ import annotations

import pytest

from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig
from dist_infer.engine.random_engine import build_random_engine
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.engine.sampling import SamplingParams
from dist_infer.workers.llm_engine import EngineOptions, LLMEngine, Request
from dist_infer.workers.worker import RankWorker

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27]]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-engine") / "engine"
    build_random_engine("tiny-llama", out, build=BuildConfig(dtype="float32", max_batch_size=4, max_seq_len=64,
                                                             kv_block_size=4), with_tokenizer=False, device="cpu")
    spec = EngineSpec.read(out)
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    return spec, RankWorker(load_rank_engine(spec, groups, "cpu"), groups)


def _engine(worker, **options) -> LLMEngine:
    spec, w = worker
    return LLMEngine(w, spec, options=EngineOptions(**options))


def _run(engine: LLMEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def test_step_deltas_equal_generate(worker):
    reference = [c.output_ids for c in _engine(worker).generate([Request(p, 6, ignore_eos=True) for p in PROMPTS])]
    engine = _engine(worker, max_num_batched_tokens=4)  # chunked prefill too
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", Request(p, 6, ignore_eos=True))
    outs = _run(engine)
    got = [[t for o in outs[f"r{i}"] for t in o.new_token_ids] for i in range(len(PROMPTS))]
    assert got == reference
    assert all(outs[f"r{i}"][-1].finished and outs[f"r{i}"][-1].finish_reason == "length" for i in range(3))
    assert engine.blocks.usage == 0.0


def test_abort_frees_blocks_and_others_continue(worker):
    engine = _engine(worker)
    engine.add_request("a", Request(PROMPTS[0], 20, ignore_eos=True))
    engine.add_request("b", Request(PROMPTS[1], 5, ignore_eos=True))
    engine.step()
    assert engine.abort("a") and not engine.abort("a")
    outs = _run(engine)
    assert "a" not in outs and len([t for o in outs["b"] for t in o.new_token_ids]) == 4
    assert engine.blocks.usage == 0.0 and not engine.requests


def test_a_failing_request_is_finished_with_an_error_and_frees_its_blocks(worker):
    class BrokenDetokenizer:
        stopped_at = None

        def add(self, token):
            raise UnicodeError("broken tokenizer")

    engine = _engine(worker)
    engine.add_request("bad", Request(PROMPTS[0], 8, ignore_eos=True))
    engine.add_request("good", Request(PROMPTS[1], 8, ignore_eos=True))
    engine.requests["bad"].detok = BrokenDetokenizer()
    outs = _run(engine)
    assert outs["bad"][-1].finish_reason == "error" and "broken tokenizer" in outs["bad"][-1].error
    assert len([t for o in outs["good"] for t in o.new_token_ids]) == 8
    assert engine.blocks.usage == 0.0 and not engine.requests


def test_duplicate_request_id_and_bad_requests_refused(worker):
    from dist_infer.errors import RequestError

    engine = _engine(worker)
    engine.add_request("x", Request(PROMPTS[0], 2))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("x", Request(PROMPTS[1], 2))
    for bad in (Request([], 2), Request([1] * 64, 2), Request([10**9], 2), Request([1], 0)):
        with pytest.raises(RequestError):
            engine.add_request("y", bad)
    assert list(engine.requests) == ["x"]


def test_unseeded_requests_get_distinct_streams(worker):
    engine = _engine(worker)
    params = SamplingParams(temperature=1.0)
    outs = engine.generate([Request(PROMPTS[0], 12, params, ignore_eos=True)] * 2)
    assert outs[0].output_ids != outs[1].output_ids


@pytest.fixture(scope="module")
def text_worker(tmp_path_factory):
    """tiny-llama with the embedded SmolLM2 tokenizer: requests with stop strings."""
    out = tmp_path_factory.mktemp("llm-engine-text") / "engine"
    build_random_engine("tiny-llama", out, build=BuildConfig(dtype="float32", max_batch_size=4, max_seq_len=64,
                                                             kv_block_size=4), device="cpu")
    spec = EngineSpec.read(out)
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    from transformers import AutoTokenizer
    return spec, RankWorker(load_rank_engine(spec, groups, "cpu"), groups), AutoTokenizer.from_pretrained(out)


def test_a_stop_string_found_while_the_next_step_runs_ends_the_request_exactly(text_worker):
    spec, w, tokenizer = text_worker
    prompts = [[40, 41, 42, 43], [50, 51]]
    plain = LLMEngine(w, spec, tokenizer).generate([Request(p, 24, ignore_eos=True) for p in prompts])
    text = plain[0].text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip() and text.find(text[i:i + 3]) == i)
    engine = LLMEngine(w, spec, tokenizer)
    engine.add_request("stopped", Request(prompts[0], 24, stop=(stop,), ignore_eos=True))
    engine.add_request("other", Request(prompts[1], 24, ignore_eos=True))
    outs = _run(engine)
    stopped = outs["stopped"]
    assert "".join(o.new_text for o in stopped) == text[:text.index(stop)]
    assert stopped[-1].finish_reason == "stop" and [o.finished for o in stopped].count(True) == 1
    assert [t for o in outs["other"] for t in o.new_token_ids] == plain[1].output_ids  # its neighbour unharmed
    assert engine.blocks.usage == 0.0 and not engine.requests and not engine.has_unfinished()
