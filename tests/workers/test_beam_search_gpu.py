"""Beam search on a GPU (`pytest -m gpu`; skipped where no CUDA GPU is visible): a float32 tiny
Llama loaded on `cuda` in this process gives transformers' `generate(num_beams=k)` tokens, every
beam row the search used is the CPU reference's log-softmax, and the steps that ran beams were
replayed from CUDA graphs (no eager step); under `mpirun -n 2 dist-infer run --device cuda` (TP=2,
NCCL) too. The CPU suite (tests/workers/test_beam_search.py) covers the bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_in_process, completions, hf_beams, make_tiny_model, run_cli, write_prompts
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.engine.sampling import SamplingParams
from dist_infer.workers.llm_engine import LLMEngine, Request
from dist_infer.workers.worker import RankWorker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

DEVICE = "cuda:0"  # in this process (the CLI takes plain "cuda": each rank picks its own GPU)
VOCAB = 301
NEW = 12
BLOCK = 4  # small KV blocks: a fork shares its parent's full blocks and recomputes the partial one
# (num_beams, length_penalty, early_stopping, ignore_eos)
CASES = [(2, 1.0, False, False), (4, 0.5, True, False), (3, 2.0, "never", False), (4, 1.0, False, True)]
# A beam row's logprobs on the GPU against the CPU float32 reference. The decode kernel's tl.dot
# takes float32 operands as TF32 (Triton's default; attention_gpu.py's varlen kernel asks for
# "ieee"): rounding q, k, p, v to TF32 in every attention of the CPU reference moves this model's
# top-10 logprobs by up to 6e-3 (8.5e-3 truncating), and leaves its beam tokens unchanged.
LOGPROB_TOLERANCE = 2e-2


def _prompts(lengths, seed=2468) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = _prompts([5, 11, 7])


def _hf_beams(model, prompt, k, length_penalty, early_stopping, eos) -> list[int]:
    return hf_beams(model, prompt, NEW, k, length_penalty, early_stopping, eos)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float32 tiny Llama whose EOS is a token its beams produce early (hypotheses end before the
    length limit), built for TP=1 and TP=2 with 4-token KV blocks; and transformers' beams."""
    root = tmp_path_factory.mktemp("beams-gpu")
    model = make_tiny_model(root / "hf", "llama", seed=5)
    eos = _hf_beams(model, PROMPTS[0], 4, 1.0, False, None)[2]
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(root / "hf")  # the engine reads its EOS from here
    model.config.eos_token_id = model.generation_config.eos_token_id = None  # references pass theirs
    want = {case: [_hf_beams(model, p, *case[:3], None if case[3] else eos) for p in PROMPTS] for case in CASES}
    return model, eos, {tp: _engine(root, tp) for tp in (1, 2)}, want


def _engine(root: Path, tp: int) -> Path:
    from dist_infer.partition import partition

    ckpt = partition(root / "hf", tp, 1, root / f"ckpt-tp{tp}", progress=False)
    return build_in_process(ckpt, root / f"engine-tp{tp}", "--dtype", "float32", "--max-batch-size", "8",
                            "--max-seq-len", "64", "--kv-block-size", str(BLOCK))


def _requests() -> list[Request]:
    return [Request(p, NEW, SamplingParams(num_beams=k, length_penalty=lp, early_stopping=es), ignore_eos=ignore)
            for k, lp, es, ignore in CASES for p in PROMPTS]


class _Recorder:
    """What one in-process run did: each step's (pure decode?, sequences), each graph replay's (kind,
    sequences), eager steps, and each beam search step's (prompt, running beams' tokens, their rows:
    top ids [n] and top logprobs [n])."""

    def __init__(self, llm: LLMEngine):
        self.steps: list[tuple[bool, int]] = []
        self.replays: list[tuple[str, int]] = []
        self.eager_steps = 0
        self.beam_steps: list[tuple[list[int], list[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]] = []
        engine = llm.worker.engine
        engine.step = self._counted_step(engine.step)
        for graphs in engine.graphs:
            graphs.replay = self._counted_replay(graphs, graphs.replay)
        engine._eager_step = self._counted_eager(engine._eager_step)  # the graphs captured the original
        llm._advance_beams = self._recorded_advance(llm._advance_beams)

    def _counted_step(self, step):
        def run(x, batch):
            self.steps.append((batch.is_decode, batch.num_seqs))
            return step(x, batch)
        return run

    def _counted_replay(self, graphs, replay):
        def run(x, batch, bucket):
            self.replays.append((graphs.kind, batch.num_seqs))
            return replay(x, batch, bucket)
        return run

    def _counted_eager(self, eager_step):
        def run(x, batch):
            self.eager_steps += 1
            return eager_step(x, batch)
        return run

    def _recorded_advance(self, advance):
        def run(state):
            rows = [state.beam_rows[s.seq_id] for s in state.beam_seqs]
            self.beam_steps.append((state.request.prompt_ids, [list(o) for o in state.beam.outputs], rows))
            advance(state)
        return run


@pytest.fixture(scope="module")
def gpu_run(tiny):
    """Every case and prompt in one in-process batch on the GPU (12 requests of 39 beams overflow
    the 8-sequence batch, so beams also wait a step): (completions, recorder, no KV block leaked)."""
    spec = EngineSpec.read(tiny[2][1])
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    engine = load_rank_engine(spec, groups, DEVICE)
    llm = LLMEngine(RankWorker(engine, groups), spec)
    recorder = _Recorder(llm)
    try:
        done = llm.generate(_requests())
        return done, recorder, sum(llm.blocks.refcount) == 0 and llm.blocks.usage == 0.0
    finally:
        engine.close()


def test_beams_equal_transformers(tiny, gpu_run):
    done, _, no_leak = gpu_run
    want = [ids for case in CASES for ids in tiny[3][case]]
    assert [c.output_ids for c in done] == want
    ends_early = [c for c in done if c.finish_reason == "stop"]
    assert ends_early and all(c.output_ids[-1] == tiny[1] and len(c.output_ids) < NEW for c in ends_early)
    assert any(c.finish_reason == "length" for c in done)
    assert no_leak  # every fork's KV blocks came back


def test_every_beam_row_is_the_cpu_reference_logprobs(tiny, gpu_run):
    """Each row a search step used (a decode, or a fork's recomputed tail) holds the top logprobs of
    the CPU float32 transformers model for that beam's tokens: the graphs ran every beam's own KV."""
    model, beam_steps = tiny[0], gpu_run[1].beam_steps
    assert len(beam_steps) >= len(CASES) * len(PROMPTS) * 3
    worst = 0.0
    for prompt, outputs, rows in beam_steps:
        with torch.no_grad():  # every beam of a step has as many tokens: one batch
            lp = model(torch.tensor([prompt + o for o in outputs])).logits[:, -1].float().log_softmax(-1)
        for ref, (ids, got) in zip(lp, rows):
            n = len(ids)
            worst = max(worst, (ref[ids] - got).abs().max().item(), (ref.topk(n).values - got).abs().max().item())
    assert worst < LOGPROB_TOLERANCE, f"a beam row differs from the CPU reference by {worst:.2e}"


def test_beam_steps_replay_cuda_graphs(gpu_run):
    """No step ran eagerly: every pure decode step (8 beams on CPU: 19 of the run's 57 steps)
    replayed a decode graph, every step with a fork's recomputed tail or a prompt a mixed-step graph."""
    recorder = gpu_run[1]
    assert recorder.eager_steps == 0
    assert [(kind == "decode", n) for kind, n in recorder.replays] == recorder.steps
    beam_decodes = [n for kind, n in recorder.replays if kind == "decode" and n > 1]
    assert len(beam_decodes) >= 10 and max(beam_decodes) == 8
    assert any(kind == "mixed-step" for kind, _ in recorder.replays)


@needs_2_gpus
def test_tp2_under_mpirun_equals_transformers(tiny, tmp_path):
    """`mpirun -n 2 dist-infer run --device cuda --num-beams 4` (TP=2, all-reduces in the graphs)."""
    k, lp, es, _ = CASES[1]
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    proc = run_cli("run", "--engine", str(tiny[2][2]), "--prompts-file", str(path), "--json", "--device", "cuda",
                   "--max-new-tokens", str(NEW), "--num-beams", str(k), "--length-penalty", str(lp),
                   "--early-stopping", str(es).lower(), world=2, env=NCCL_ENV, timeout=300)
    assert [c["output_ids"] for c in completions(proc)] == tiny[3][CASES[1]]
