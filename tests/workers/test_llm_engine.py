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


def _tiny_worker(out, max_kv_blocks: int | None = None):
    """A one-rank CPU worker of tiny-llama: batch 4, 64 tokens, KV blocks of 4 tokens."""
    build_random_engine("tiny-llama", out, build=BuildConfig(dtype="float32", max_batch_size=4, max_seq_len=64,
                                                             kv_block_size=4), with_tokenizer=False, device="cpu")
    spec = EngineSpec.read(out)
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    return spec, RankWorker(load_rank_engine(spec, groups, "cpu", max_kv_blocks=max_kv_blocks), groups)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return _tiny_worker(tmp_path_factory.mktemp("llm-engine") / "engine")


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


# ---- async scheduling: step N+1 is launched before N's tokens are collected --------------------

def _count_overlap(engine: LLMEngine) -> list[int]:
    """Steps launched and not yet collected, seen at each launch."""
    w, seen = engine.worker, []
    launch = w.launch

    def launched(plan):
        launch(plan)
        seen.append(w.num_in_flight)

    w.launch = launched
    return seen


@pytest.fixture(scope="module")
def tight_worker(tmp_path_factory):
    """A KV pool of 24 blocks of 4 tokens for up to 4 sequences of up to 64: preemptions happen."""
    return _tiny_worker(tmp_path_factory.mktemp("llm-engine-tight") / "engine", max_kv_blocks=24)


def _mixed_requests() -> list[Request]:
    shared = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # a cached prefix for the later ones
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11)
    return [Request(shared + [7], 30), Request([8, 9, 10], 9, ignore_eos=True), Request(shared + [8, 9], 25, seeded),
            Request(list(range(40, 58)), 40), Request(shared, 1), Request([60, 61], 33, seeded, ignore_eos=True)]


def _completions(worker, eos: set[int] | None, **options):
    engine = _engine(worker, **options)
    if eos is not None:
        engine.eos_ids = eos
    seen = _count_overlap(engine)
    try:
        done = engine.generate(_mixed_requests())
    finally:
        del engine.worker.launch
    assert engine.blocks.usage == 0.0 and not engine.has_unfinished()
    return [(c.output_ids, c.finish_reason) for c in done], seen, engine


def test_async_scheduling_gives_the_same_tokens_as_planning_in_turn(tight_worker):
    """Chunked prefill, prefix hits, preemption under a tight pool, seeded sampling, length and
    EOS finishes (a token the sequential run samples mid-answer is made an EOS for both)."""
    plain, _, _ = _completions(tight_worker, None, async_scheduling=False, max_num_batched_tokens=8)
    eos = {plain[0][0][len(plain[0][0]) // 2]}
    sequential, in_turn, _ = _completions(tight_worker, eos, async_scheduling=False, max_num_batched_tokens=8)
    overlapped, ahead, engine = _completions(tight_worker, eos, max_num_batched_tokens=8)
    assert overlapped == sequential
    assert any(reason == "stop" for _, reason in sequential) and any(r == "length" for _, r in sequential)
    assert max(in_turn) == 1 and max(ahead) == 2  # the next step was queued behind the running one
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.hit_rate > 0


def test_a_chunked_prompt_gets_every_prompt_logprob_while_steps_are_queued_ahead(worker):
    """The second chunk is planned before the first chunk's logprobs are back: it must still ask."""
    prompt = list(range(5, 25))
    request = Request(prompt, 3, SamplingParams(prompt_logprobs=1), ignore_eos=True)
    got = {}
    for overlap in (False, True):
        engine = _engine(worker, max_num_batched_tokens=8, async_scheduling=overlap)
        engine.add_request("x", request)
        got[overlap] = [o.prompt_logprobs for o in _run(engine)["x"] if o.prompt_logprobs is not None][0]
    assert len(got[True]) == len(prompt) - 1 and got[True] == got[False]


def test_generate_under_kv_pressure_waits_for_the_finishes_of_the_step_in_flight(tmp_path):
    """Both running sequences have their last token pending and the next prompt has no blocks: the
    step queued ahead plans nothing, and the finishes collected next must still let it in."""
    spec, w = _tiny_worker(tmp_path / "engine", max_kv_blocks=17)
    requests = [Request(list(range(5, 45)), 20, ignore_eos=True), Request(list(range(3, 43)), 4, ignore_eos=True),
                Request(list(range(9, 30)), 5, ignore_eos=True)]
    outputs = [[c.output_ids for c in _engine((spec, w), async_scheduling=overlap,
                                              enable_prefix_caching=False).generate(requests)]
               for overlap in (False, True)]
    assert outputs[0] == outputs[1] and [len(o) for o in outputs[1]] == [20, 4, 5]


def test_the_ranks_forget_every_sequence_when_generate_returns(worker):
    """The last finishes reach the ranks before generate returns; a new LLMEngine on the same
    worker (seq ids from 0 again) must not find block tables of the last one's sequences."""
    spec, w = worker
    requests = [Request(p, 6, ignore_eos=True) for p in PROMPTS]
    first = [c.output_ids for c in _engine(worker).generate(requests)]
    assert w.block_tables == {} and w.params == {}
    again = [c.output_ids for c in _engine(worker).generate(list(reversed(requests)))]
    assert again == list(reversed(first)) and w.block_tables == {}


def test_the_watchdog_sees_a_step_in_progress_while_one_is_queued_behind_it(worker):
    """Rank 0 begins step N+1 before it ends step N: the step clock stays running until both end."""
    engine = _engine(worker)
    progress, seen = engine.worker.progress, []
    engine.add_request("a", Request(PROMPTS[0], 4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        seen.append((progress.in_flight, progress.since is not None))
    assert (1, True) in seen  # after a step() returned, the next was still in flight, and timed
    assert progress.in_flight == 0 and progress.since is None
