"""Beam search: token-exact against transformers' `generate(num_beams=k)` (float32), in one
process at TP=1 (LLMEngine over a one-rank worker) and under `mpirun -n 2 dist-infer run` at
TP=2; the bookkeeping (forks share KV blocks, every reference returned) and bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_in_process, completions, hf_beams, make_tiny_model, run_cli, write_prompts
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.engine.sampling import SamplingParams
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.errors import RequestError
from dist_infer.scheduler import BlockManager, Scheduler, SchedulerConfig, Sequence
from dist_infer.workers.beam_search import BeamSearch, BeamSearchParams
from dist_infer.workers.llm_engine import LLMEngine, Request
from dist_infer.workers.worker import RankWorker

VOCAB = 301
NEW = 12
BLOCK = 4  # small KV blocks: forks share full blocks and recompute a partial one


def _prompts(lengths, seed=4321) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = _prompts([5, 11])
# (num_beams, length_penalty, early_stopping, ignore_eos); transformers' beam search takes ~0.5 s a prompt here
CASES = [(2, 1.0, False, False), (4, 0.5, True, False), (2, 2.0, "never", False), (3, -1.0, "never", True)]
_REFERENCES: dict = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """A tiny Llama whose EOS is a token its beams produce early (so hypotheses end before the
    length limit), with SmolLM2's tokenizer (so served answers are text), partitioned for TP=1,
    TP=2 and PP=2 and built with 4-token KV blocks."""
    import shutil

    root = tmp_path_factory.mktemp("beams")
    model = make_tiny_model(root / "hf", "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, root / "hf" / name)
    eos = _hf_beams(model, PROMPTS[0], 4, 1.0, False, None)[2]
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(root / "hf")  # the engine reads its EOS from here
    model.config.eos_token_id = model.generation_config.eos_token_id = None  # references pass theirs
    engines = {tp: _engine(root, tp) for tp in (1, 2)}
    engines["pp2"] = _engine(root, 1, pp=2)
    return model, eos, engines


def _engine(root: Path, tp: int, pp: int = 1) -> Path:
    from dist_infer.partition import partition

    ckpt = partition(root / "hf", tp, pp, root / f"ckpt-tp{tp}pp{pp}", progress=False)
    return build_in_process(ckpt, root / f"engine-tp{tp}pp{pp}", "--max-batch-size", "8", "--max-seq-len", "64",
                            "--kv-block-size", str(BLOCK))


def _hf_beams(model, prompt, k, length_penalty, early_stopping, eos) -> list[int]:
    return hf_beams(model, prompt, NEW, k, length_penalty, early_stopping, eos)


def _reference(tiny, prompt, case) -> list[int]:
    model, eos, _ = tiny
    k, lp, es, ignore_eos = case
    key = (tuple(prompt), case)
    if key not in _REFERENCES:
        _REFERENCES[key] = _hf_beams(model, prompt, k, lp, es, None if ignore_eos else eos)
    return _REFERENCES[key]


def _requests(cases=CASES) -> list[Request]:
    return [Request(p, NEW, _beams(k, lp, es), ignore_eos=ignore) for k, lp, es, ignore in cases for p in PROMPTS]


def _beams(k, length_penalty=1.0, early_stopping=False, **kwargs) -> SamplingParams:
    return SamplingParams(num_beams=k, length_penalty=length_penalty, early_stopping=early_stopping, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny):
    spec = EngineSpec.read(tiny[2][1])
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    return LLMEngine(RankWorker(load_rank_engine(spec, groups, "cpu"), groups), spec)


# ------------------------------------------------------------ equal to transformers

def test_beams_equal_transformers_in_one_batch(tiny, llm, monkeypatch):
    """Every case and prompt in one engine batch (beams of different requests share steps;
    8 requests of 22 beams overflow the 8-sequence batch, so beams also wait a step)."""
    step_sizes, launch = [], llm.worker.launch
    monkeypatch.setattr(llm.worker, "launch", lambda plan: step_sizes.append(len(plan.chunks)) or launch(plan))
    done = llm.generate(_requests())
    assert max(step_sizes) == 8  # full steps, never more sequences than the engine's batch
    got = [c.output_ids for c in done]
    want = [_reference(tiny, p, case) for case in CASES for p in PROMPTS]
    assert got == want
    ends_early = [c for c in done if c.finish_reason == "stop"]
    assert ends_early and all(c.output_ids[-1] == tiny[1] and len(c.output_ids) < NEW for c in ends_early)
    assert any(c.finish_reason == "length" for c in done)
    assert sum(llm.blocks.refcount) == 0 and llm.blocks.usage == 0.0  # no KV leaked by forks


def test_num_beams_1_is_greedy(llm):
    plain = llm.generate([Request(p, NEW) for p in PROMPTS])
    one = llm.generate([Request(p, NEW, _beams(1)) for p in PROMPTS])
    assert [c.output_ids for c in one] == [c.output_ids for c in plain]


def test_num_return_sequences_are_the_best_hypotheses(tiny, llm):
    [c] = llm.generate([Request(PROMPTS[1], NEW, _beams(4, 0.5, True, num_return_sequences=3))])
    assert len(c.beams) == 3 and c.beams[0] == c.output_ids == _reference(tiny, PROMPTS[1], CASES[1])
    assert len({tuple(b) for b in c.beams}) == 3


def test_step_api_returns_one_final_delta(tiny, llm):
    llm.add_request("b", Request(PROMPTS[0], NEW, _beams(2)))
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].new_token_ids == _reference(tiny, PROMPTS[0], CASES[0])


def test_abort_mid_search_frees_every_beam(llm):
    llm.add_request("a", Request(PROMPTS[1], NEW, _beams(4), ignore_eos=True))
    for _ in range(4):
        llm.step()
    assert len(llm.requests["a"].beam_seqs) == 4
    assert llm.abort("a")
    while llm.has_unfinished():
        llm.step()
    assert sum(llm.blocks.refcount) == 0


PRESSURE_REQUESTS = [Request(p, 24, _beams(k), ignore_eos=True) for p in _prompts([5, 11, 9, 14], seed=1)
                     for k in (2, 4)]


@pytest.fixture(scope="module")
def unpressured(llm):
    return [c.output_ids for c in llm.generate(PRESSURE_REQUESTS)]


@pytest.mark.parametrize("blocks", [17, 18])
def test_beams_under_kv_pressure_finish_with_the_same_tokens(tiny, unpressured, blocks):
    """A pool that holds one full-length sequence (17 blocks) or one block more: beams are
    preempted again and again, beams that wait for a preempted sibling give their KV back, and
    a fork preempted in the step that first scheduled it is announced again. Every search ends
    with the tokens of a pool that never runs dry. (Before: 17 stalled in empty steps forever;
    18 crashed on a fork whose sampling parameters the ranks had never been sent.)"""
    spec = EngineSpec.read(tiny[2][1])
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    tight = LLMEngine(RankWorker(load_rank_engine(spec, groups, "cpu", max_kv_blocks=blocks), groups), spec)
    assert [c.output_ids for c in tight.generate(PRESSURE_REQUESTS)] == unpressured
    assert tight.scheduler.num_preemptions > 50 and sum(tight.blocks.refcount) == 0


def test_a_scheduler_stall_fails_loudly_instead_of_spinning(tiny, monkeypatch):
    """Without the unblocking above, 17 blocks stall: the engine raises, naming the state,
    instead of running empty steps forever (a server's health then turns red)."""
    monkeypatch.setattr(Scheduler, "_unblock_waiting", lambda self, *args: None)
    spec = EngineSpec.read(tiny[2][1])
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    tight = LLMEngine(RankWorker(load_rank_engine(spec, groups, "cpu", max_kv_blocks=17), groups), spec)
    with pytest.raises(RuntimeError, match=r"scheduler stall: \d+ sequence\(s\) waiting and \d+ running"):
        tight.generate(PRESSURE_REQUESTS)


@pytest.mark.parametrize("layout", [2, "pp2"], ids=["tp2", "pp2"])
def test_under_mpirun(tiny, tmp_path, layout):
    """`mpirun -n 2 dist-infer run --num-beams 2` at TP=2, and at PP=2 (a pipeline keeps one step
    in flight while beam searches run: their beams step together), prints transformers' beams."""
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    proc = run_cli("run", "--engine", str(tiny[2][layout]), "--prompts-file", str(path), "--json", "--max-new-tokens",
                   str(NEW), "--num-beams", "2", "--length-penalty", "2.0", "--early-stopping", "never", world=2,
                   timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c["output_ids"] for c in completions(proc)] == [_reference(tiny, p, CASES[2]) for p in PROMPTS]


# ------------------------------------------------------------ bookkeeping

def test_fork_shares_full_blocks_and_recomputes_the_partial_one():
    blocks = BlockManager(16, BLOCK)
    parent = Sequence.from_prompt(0, list(range(1, 11)))  # 10 tokens: 2 full blocks + 2 tokens
    assert blocks.allocate(parent, 10)
    parent.num_computed = 10
    child = Sequence(1, parent.token_ids + [42], parent.num_prompt_tokens)
    blocks.fork(parent, child)
    assert child.block_ids == parent.block_ids[:2] and child.num_computed == 8  # tokens 8.. run again
    assert [blocks.refcount[b] for b in parent.block_ids] == [2, 2, 1]
    assert blocks.allocate(child, child.num_uncomputed) and child.block_ids[2] != parent.block_ids[2]
    blocks.free_sequence(parent)
    blocks.free_sequence(child)
    assert sum(blocks.refcount) == 0 and blocks.num_free == 15


def test_scheduler_runs_a_fork_from_its_first_unshared_token():
    sched = Scheduler(SchedulerConfig(4, 64, 64), BlockManager(32, BLOCK))
    parent = Sequence.from_prompt(0, list(range(1, 11)))
    sched.add(parent)
    [prefill] = sched.schedule().chunks
    sched.computed(prefill)
    child = Sequence(1, parent.token_ids + [42], parent.num_prompt_tokens)
    sched.fork(parent, child)
    parent.token_ids.append(43)
    chunks = {c.seq.seq_id: c for c in sched.schedule().chunks}
    assert (chunks[0].start, chunks[0].token_ids) == (10, [43])               # a decode
    assert (chunks[1].start, chunks[1].token_ids) == (8, [9, 10, 42]) and chunks[1].first
    assert chunks[1].new_block_ids[:2] == parent.block_ids[:2]                # the ranks' table: shared head


def test_a_beam_waiting_for_its_siblings_takes_no_batch_slot():
    sched = Scheduler(SchedulerConfig(1, 64, 64), BlockManager(32, BLOCK))
    idle = Sequence.from_prompt(0, [1, 2, 3])
    sched.add(idle)
    sched.computed(sched.schedule().chunks[0])  # computed, no new token yet: nothing to run
    sched.add(Sequence.from_prompt(1, [4, 5]))
    assert [c.seq.seq_id for c in sched.schedule().chunks] == [1]


def _rows(*beams) -> tuple[torch.Tensor, torch.Tensor]:
    """Each beam's (token, logprob) candidates -> (top ids, top logprobs) tensors."""
    ids = torch.tensor([[t for t, _ in b] for b in beams])
    return ids, torch.tensor([[lp for _, lp in b] for b in beams], dtype=torch.float32)


def test_search_keeps_the_best_and_finishes_eos_hypotheses():
    search = BeamSearch(BeamSearchParams(2), eos_ids={9}, max_new_tokens=5)
    assert search.num_candidates == 4  # max(2, 1 + one EOS) * num_beams
    first = search.step(*_rows([(5, -0.1), (9, -0.2), (6, -0.3), (7, -2.0), (8, -3.0), (4, -4.0)]))
    assert [(c.parent, c.token) for c in first] == [(0, 5), (0, 6)]  # EOS is not a running beam
    assert [h.output_ids for h in search.finished] == [[9]] and search.finished[0].score == pytest.approx(-0.2)
    second = search.step(*_rows([(9, -5.0), (1, -6.0), (2, -7.0), (3, -8.0), (4, -9.0), (6, -9.5)],
                                [(2, -0.1), (9, -0.15), (3, -0.2), (4, -4.0), (5, -5.0), (7, -6.0)]))
    assert [(c.parent, c.token) for c in second] == [(1, 2), (1, 3)]
    assert [h.output_ids for h in search.finished] == [[9], [6, 9]]
    assert search.finished[1].score == pytest.approx((-0.3 - 0.15) / 2)
    assert not search.done  # the best running beam (-0.4 / 2) still beats the worst hypothesis (-0.225)


# Step 2 of a 2-beam search after [9] finished (score -0.1) and [5] (-0.2), [6] (-0.3) run: [5, 9]
# finishes (-0.21 / 2 = -0.105, so two hypotheses are kept) beside a running [5, 1] at -0.205 or -0.22.
RUNNING_BEST = [(1, -0.005), (9, -0.01), (2, -5.0), (3, -6.0)]    # [5, 1]: -0.205 / 2 > -0.105
RUNNING_WORSE = [(9, -0.01), (1, -0.02), (2, -5.0), (3, -6.0)]    # [5, 1]: -0.22 / 2 < -0.105 < -0.22 / 8


@pytest.mark.parametrize("row,early_stopping,done", [
    (RUNNING_BEST, True, True),       # num_beams hypotheses are finished
    (RUNNING_BEST, False, False),     # the running beam could still beat the worst hypothesis
    (RUNNING_BEST, "never", False),
    (RUNNING_WORSE, True, True),
    (RUNNING_WORSE, False, True),     # heuristic at the current length: it cannot
    (RUNNING_WORSE, "never", False),  # bound at max_new_tokens (length_penalty > 0): it still could
])
def test_early_stopping_modes(row, early_stopping, done):
    search = BeamSearch(BeamSearchParams(2, early_stopping=early_stopping), eos_ids={9}, max_new_tokens=8)
    search.step(*_rows([(9, -0.1), (5, -0.2), (6, -0.3), (7, -2.0)]))
    assert not search.done
    search.step(*_rows(row, [(2, -3.0), (3, -3.1), (9, -3.3), (4, -4.0)]))
    assert [h.output_ids for h in search.finished] == [[9], [5, 9]]
    assert search.done is done
    assert [h.output_ids for h in search.best()] == [[9]]


@pytest.mark.parametrize("kwargs,match", [(dict(num_beams=0), "num_beams must be >= 1"),
                                          (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
                                          (dict(num_beams=2, num_return_sequences=3), "num_return_sequences")])
def test_bad_beam_params_are_refused(kwargs, match):
    with pytest.raises(RequestError, match=match):
        BeamSearchParams(**kwargs)


def test_engine_refuses_sampling_with_beams(llm):
    with pytest.raises(RequestError, match="temperature > 0, top_k or top_p"):
        llm.validate(Request(PROMPTS[0], NEW, _beams(2, temperature=0.7)))
    with pytest.raises(RequestError, match="num_beams <= 10"):
        llm.validate(Request(PROMPTS[0], NEW, _beams(11)))
    with pytest.raises(RequestError, match="num_beams must be >= 1"):
        llm.validate(Request(PROMPTS[0], NEW, _beams(0)))


@pytest.mark.parametrize("args,match", [(["--num-beams", "2", "--temperature", "0.7"], "--temperature"),
                                        (["--num-beams", "3", "--top-p", "0.9", "--top-k", "5"], "--top-k, --top-p"),
                                        (["--num-beams", "0"], "must be >= 1"),
                                        (["--num-beams", "11"], "over the most supported"),
                                        (["--num-beams", "2", "--early-stopping", "maybe"], "true, false or never")])
def test_bad_run_flags_exit_2(args, match, capsys):
    from dist_infer.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--engine", "nowhere", "--prompt", "hi", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


# ------------------------------------------------------------ serve: /v1/completions with num_beams

@pytest.fixture(scope="module")
def server(tiny):
    """`dist-infer serve` of the tiny model (TP=1)."""
    from serve.server import Server

    srv = Server(tiny[2][1], 1, "--served-model-name", "tiny").wait_healthy()
    yield srv
    srv.kill()


def test_openai_client_gets_the_best_beam(tiny, server, tokenizer_of_smollm2):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    case = CASES[2]
    k, lp, es, _ = case
    got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=NEW,
                                    extra_body={"num_beams": k, "length_penalty": lp, "early_stopping": es})
    want = _reference(tiny, PROMPTS[1], case)
    assert got.usage.completion_tokens == len(want)
    assert got.choices[0].text == tokenizer_of_smollm2.decode(want, skip_special_tokens=True)
    assert got.choices[0].finish_reason == ("stop" if want[-1] == tiny[1] else "length")


@pytest.mark.parametrize("extra,match", [(dict(stream=True), "does not support stream"),
                                         (dict(temperature=0.7), "drop temperature"),
                                         (dict(extra_body={"num_beams": 2, "early_stopping": "sometimes"}),
                                          "early_stopping"),
                                         (dict(extra_body={"num_beams": 11}), "num_beams")])
def test_bad_beam_bodies_are_400(server, extra, match):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=4, extra_body={"num_beams": 2}) | extra
    with pytest.raises(openai.BadRequestError, match=match):
        client.completions.create(**kwargs)


@pytest.fixture(scope="module")
def tokenizer_of_smollm2(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
