"""Tiny random models of each family, and a TP x PP engine run inside this process.

The TP ranks of a stage run as threads joined by a thread-backed group (collectives meet at a
barrier and sum in rank order); the stages run one after another, as tests/engine/test_quant.py
does for logits. Here the ranks keep their KV caches across steps, so greedy decoding of a
batch runs prefill then decode steps exactly as the worker does (paged KV, block tables)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from dist_infer.comm.base import LocalCommunicator
from thread_group import ThreadGroup
from dist_infer.config import BuildConfig
from dist_infer.engine.build import DTYPES, build, rank_weights_file
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch
from dist_infer.engine.model import StageModel, local_heads
from dist_infer.engine.runtime import EngineSpec, RankEngine
from dist_infer.partition import partition

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
BLOCK = 16
VOCAB = 301


def prompts(lengths=(3, 9, 17), seed=1234) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def widen(model, skip=("norm", "ln_")) -> None:
    """Weights wider than the default init, so greedy decoding does not collapse into one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.normal_(0, 0.15 if p.ndim > 1 else 0.3)


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def build_engine(model_dir: Path, tp: int, pp: int, root: Path) -> Path:
    """partition + build in this process (the functions the CLI sub-commands call)."""
    ckpt, engine = root / f"ckpt-tp{tp}pp{pp}", root / f"engine-tp{tp}pp{pp}"
    partition(model_dir, tp, pp, ckpt, progress=False)
    build(ckpt, engine, BuildConfig(), LocalCommunicator())
    return engine


NEW = 12  # greedy tokens per prompt
PROMPTS = prompts()


def reference(root: Path, model_cls, config, save=None) -> tuple[Path, object, list[list[int]]]:
    """A seeded tiny transformers model with widened weights, saved as the checkpoint root/"hf"
    (by `save(path, model)` when its on-disk layout is not transformers'), and its greedy answers."""
    import transformers

    transformers.set_seed(0)
    model = model_cls(config).eval()
    widen(model)
    if save is None:
        model.save_pretrained(root / "hf")
    else:
        save(root / "hf", model)
    return root, model, [hf_greedy(model, p, NEW) for p in PROMPTS]


def greedy_in_process(ref, tp: int, pp: int) -> list[list[int]]:
    """The family's answers at TP x PP, every rank in this process."""
    root = ref[0]
    return InProcessEngine(build_engine(root / "hf", tp, pp, root)).greedy(PROMPTS, NEW)


def greedy_under_mpirun(ref, tmp_path: Path) -> list[list[int]]:
    """The family's answers from `mpirun -n 4 dist-infer run` at TP=2 x PP=2."""
    from conftest import completions, run_cli, write_prompts

    root = ref[0]
    engine = root / "engine-tp2pp2"
    if not engine.exists():
        engine = build_engine(root / "hf", 2, 2, root)
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    outs = completions(run_cli("run", "--engine", str(engine), "--prompts-file", str(path), "--json",
                               "--max-new-tokens", str(NEW), "--ignore-eos", world=4, timeout=240))
    return [c["output_ids"] for c in outs]


class InProcessEngine:
    """Every rank of an engine directory, with its own paged KV cache."""

    def __init__(self, engine: Path, blocks: int = 32):
        spec = EngineSpec.read(engine)
        self.tp, self.pp = spec.mapping.tp, spec.mapping.pp
        groups = [ThreadGroup(self.tp) for _ in range(self.pp)]
        self.models, self.caches = [], []
        for rank in range(self.tp * self.pp):
            group = groups[rank // self.tp].member(rank % self.tp) if self.tp > 1 else LocalCommunicator()
            mapping = spec.mapping.with_rank(rank)
            model = StageModel(spec.model, mapping, group, spec.vocab_size_padded, DTYPES[spec.build.dtype])
            RankEngine._assign(SimpleNamespace(model=model, mapping=mapping), load_file(engine / rank_weights_file(rank)))
            _, kv_heads = local_heads(spec.model, self.tp)
            self.models.append(model)
            self.caches.append(PagedKVCache(len(model.layer_ids), blocks, BLOCK, kv_heads, spec.model.head_dim,
                                            model.dtype))

    def _rank_step(self, rank: int, x, batch: StepBatch, outs: list, errors: list) -> None:
        try:
            with torch.inference_mode():
                model = self.models[rank]
                hidden = model(x, batch, self.caches[rank])
                outs[rank % self.tp] = model.logits(hidden, batch) if model.lm_head is not None else hidden
        except BaseException as exc:  # a dead thread would hang its peers' barrier
            errors.append(exc)

    def step(self, batch: StepBatch) -> torch.Tensor:
        """float32 logits [B, vocab] of one step through every stage."""
        x = batch.input_ids
        for stage in range(self.pp):
            outs, errors = [None] * self.tp, []
            threads = [threading.Thread(target=self._rank_step, args=(stage * self.tp + t, x, batch, outs, errors))
                       for t in range(self.tp)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=120)
            if errors:
                raise errors[0]
            x = outs[0]
        return x

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """The batch prefilled in one step, then decoded together, one token per step."""
        tables = [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(len(prompts))]  # 4 blocks of 16 each
        batch = StepBatch.build([(p, 0, t) for p, t in zip(prompts, tables)], BLOCK)
        outs = [[] for _ in prompts]
        for _ in range(new_tokens):
            for out, token in zip(outs, self.step(batch).argmax(-1).tolist()):
                out.append(token)
            batch = StepBatch.build([([o[-1]], len(p) + len(o) - 1, t) for p, o, t in zip(prompts, outs, tables)], BLOCK)
        return outs
