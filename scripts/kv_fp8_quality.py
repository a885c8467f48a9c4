"""Quality of an FP8 KV cache (`--kv-cache-dtype fp8`) against the engine's own dtype, on CPU,
with real weights.

    .venv/bin/python scripts/kv_fp8_quality.py [--model DIR] [--text FILE] [--out DIR]

Partitions SmolLM2-135M-Instruct (or --model DIR, a HF safetensors directory) at TP=1,
builds one float32 engine, loads it twice through `load_rank_engine` (as `dist-infer run`
does), once per --kv-cache-dtype, and reports for each:
  - perplexity of tests/data/quality_text.txt (one sequence, one prefill step, every
    position scored: every query reads its keys and values back from the pool);
  - top-1 agreement of the next-token choices with the float32 pool's;
  - whether the greedy answers (32 tokens, chat template) to the README's prompts are unchanged.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig, KVCacheConfig
from dist_infer.engine.build import build
from dist_infer.engine.kv_cache import StepBatch
from dist_infer.engine.runtime import EngineSpec, RankEngine, load_rank_engine
from dist_infer.partition import partition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_quality import README_PROMPTS, quality_parser, report  # noqa: E402  (same text, prompts and arguments)


def load(spec: EngineSpec, kv_dtype: str) -> tuple[RankEngine, ParallelGroups]:
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    return load_rank_engine(spec, groups, "cpu", verify=False, kv_cache=KVCacheConfig(kv_dtype)), groups


def text_logits(engine: RankEngine, ids: list[int]) -> torch.Tensor:
    """Every position's next-token logits [N, vocab] from one prefill over blocks 1..."""
    blocks = list(range(1, 1 + -(-len(ids) // engine.spec.build.kv_block_size)))
    batch = StepBatch.build([(ids, 0, blocks)], engine.spec.build.kv_block_size)
    batch.last_token_index = torch.arange(len(ids))
    return engine.step(batch.input_ids, batch)


def greedy_answers(engine: RankEngine, groups: ParallelGroups, spec: EngineSpec, tok, new_tokens: int) -> list[str]:
    from dist_infer.workers.llm_engine import LLMEngine, Request
    from dist_infer.workers.prompts import tokenize
    from dist_infer.workers.worker import RankWorker

    llm = LLMEngine(RankWorker(engine, groups), spec, tok)
    return [c.text for c in llm.generate([Request(p, new_tokens) for p in tokenize(README_PROMPTS, tok, True)])]


def evaluate(spec: EngineSpec, kv_dtype: str, text_ids: list[int], new_tokens: int):
    from dist_infer.workers.prompts import load_tokenizer

    engine, groups = load(spec, kv_dtype)
    logits = text_logits(engine, text_ids)
    perplexity = math.exp(F.cross_entropy(logits[:-1], torch.tensor(text_ids[1:])).item())
    return perplexity, logits.argmax(-1), greedy_answers(engine, groups, spec, load_tokenizer(spec.directory),
                                                         new_tokens)


def main() -> int:
    args = quality_parser(__doc__).parse_args()
    if args.model:
        model_dir = Path(args.model)
    else:
        from dist_infer.partition.sources import default_gguf_path, import_gguf

        model_dir = import_gguf(default_gguf_path())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        if not (out / "engine").exists():
            partition(model_dir, 1, 1, out / "ckpt", progress=False, force=True)
            build(out / "ckpt", out / "engine", BuildConfig(dtype="float32", max_batch_size=4, max_seq_len=2048),
                  LocalCommunicator(), force=True)
        spec = EngineSpec.read(out / "engine")
        from dist_infer.workers.prompts import load_tokenizer

        text_ids = load_tokenizer(spec.directory)(Path(args.text).read_text())["input_ids"]
        results = {d: evaluate(spec, d, text_ids, args.new_tokens) for d in ("auto", "fp8")}
    report(results, len(text_ids), reference="auto", column="--kv-cache-dtype")
    return 0

if __name__ == "__main__":
    sys.exit(main())
